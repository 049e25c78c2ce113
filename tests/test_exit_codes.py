"""Exit codes and messages of `crossval` (in-process through `crossval.cli.main`): 0 pass,
1 finding, 2 bad usage or input, 3 internal error, 130 interrupted; outputs refused before
any work, the user's files byte for byte unchanged, never a traceback."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from crossval import cli, errors
from crossval import onnx as ox
from crossval.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE

PORTS = Path(__file__).resolve().parent / "ports"
VP = ["validate-port", "net.prototxt", "--port", "myport:make"]


def crossval(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


@pytest.fixture
def user_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's directory: a net, a port (myport.py), a map, a result file, a directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text('name: "n"\nlayer { name: "data" type: "Input" }\n')
    shutil.copy(PORTS / "tiny.py", tmp_path / "myport.py")
    (tmp_path / "map.json").write_text("{}")
    (tmp_path / "result.json").write_text('{"mine": true}')
    (tmp_path / "adir").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prototxt", "sigmoid_scale", "-o", "result.json"], r"-o result\.json exists; .*--force"),
        (["prototxt", "sigmoid_scale", "-o", "adir"], "-o adir is a directory"),
        (["prototxt", "sigmoid_scale", "-o", "nodir/x.prototxt"], "its directory nodir does not"),
        (["surgery", "net.prototxt", "-o", "net.prototxt", "--force"], "one of the inputs"),
        (["surgery", "net.prototxt", "-o", "adir"], "-o adir is a directory"),
        (["report", "--out", "result.json"], "--out result.json is a file, not a directory"),
        (["train", "expectation", "--out", "result.json"], "is a file, not a directory"),
        (["train", "expectation", "--out", "."], r"--out \. is not empty"),
        (["golden", "--out", "result.json"], "is a file, not a directory"),
        (["check-build", "--variant", "default", "--json", "result.json"], "exists"),
        (["check-build", "--variant", "default", "--out", "result.json"], "is a file"),
        (
            ["validate-port", "net.prototxt", "--port", "myport:make", "--json", "result.json"],
            "exists",
        ),
        (
            ["validate-port", "net.prototxt", "--port", "myport:make", "--json", "net.prototxt"],
            r"--json net\.prototxt is one of the inputs",
        ),
        (
            ["validate-port", "net.prototxt", "--port", "myport:make", "--json", "myport.py"],
            r"--json myport\.py is one of the inputs",
        ),
        (
            [*VP, "--map", "map.json", "--json", "map.json", "--force"],
            r"--json map\.json is one of the inputs",
        ),
        (
            [*VP, "--save-failure", "result.json"],
            "--save-failure result.json is a file, not a directory",
        ),
    ],
)
def test_bad_outputs_refused_before_any_work(
    user_files: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    before = snapshot(user_files)
    start = time.perf_counter()
    code, _out, err = crossval(capsys, *argv)
    elapsed = time.perf_counter() - start
    assert code == EXIT_USAGE, err
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1
    assert elapsed < 1.0, f"refused only after {elapsed:.1f} s of work"
    assert snapshot(user_files) == before


def test_bad_usage_returns_2_without_raising(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = crossval(capsys, "report", "--profile", "nonsense")
    assert code == EXIT_USAGE and "invalid choice: 'nonsense'" in err


def test_internal_error_is_one_line_and_a_saved_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def broken(args: Any) -> int:
        return {}["missing key"]  # type: ignore[no-any-return]

    monkeypatch.setattr(cli, "_golden", broken)
    code, out, err = crossval(capsys, "golden", "--out", str(tmp_path))
    assert code == EXIT_INTERNAL == 3
    assert len(err.strip().splitlines()) == 1 and out == ""
    found = re.fullmatch(
        r"crossval: internal error: KeyError: 'missing key' \(traceback in (\S+)\)\n", err
    )
    assert found is not None, err
    saved = Path(found.group(1))
    try:
        text = saved.read_text()
        assert text.startswith("Traceback") and "in broken" in text and "KeyError" in text
    finally:
        saved.unlink()


def test_sigterm_is_an_interruption(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def terminated(args: Any) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        return 0

    monkeypatch.setattr(cli, "_golden", terminated)
    before = signal.getsignal(signal.SIGTERM)
    start = time.perf_counter()
    code, _out, err = crossval(capsys, "golden", "--out", str(tmp_path))
    assert code == EXIT_INTERRUPTED == 130 and err == "crossval: interrupted\n"
    assert time.perf_counter() - start < 5
    assert signal.getsignal(signal.SIGTERM) is before
    errors.raise_if_interrupted()  # the remembered signal ends with main, not after it


SPEC = ox.HeadSpec("sigmoid_scale", 8)


def test_ctrl_c_inside_the_exporter_is_an_interruption(monkeypatch: pytest.MonkeyPatch) -> None:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("\x1b[1;31mexport failed\x1b[0m") from exc

    monkeypatch.setattr(torch.onnx, "export", wrapped)
    with pytest.raises(KeyboardInterrupt):
        ox.export(SPEC)

    def swallowed(*args: Any, **kwargs: Any) -> Any:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            pass
        raise RuntimeError("\x1b[1;31mexport failed\x1b[0m")

    monkeypatch.setattr(torch.onnx, "export", swallowed)
    with pytest.raises(KeyboardInterrupt):
        ox.export(SPEC)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_exporter_failure_text_has_no_colour_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("\x1b[1;31mConversion failed\x1b[0m: op \x1b[33mFoo\x1b[0m\nmore")

    monkeypatch.setattr(torch.onnx, "export", failing)
    with pytest.raises(ox.OnnxInputError) as info:
        ox.export(SPEC)
    assert "\x1b" not in str(info.value)
    assert str(info.value).endswith("RuntimeError: Conversion failed: op Foo")


@pytest.mark.parametrize(
    "argv",
    [
        ["report", "--out", "result.json"],
        ["check-build", "--variant", "default", "--json", "adir"],
        ["check-build", "--variant", "default", "--out", "result.json"],
        ["train", "expectation", "--out", "result.json"],
        ["golden", "--out", "result.json"],
        ["export-onnx", "net.prototxt", "w.caffemodel", "-o", "adir"],
        ["surgery", "net.prototxt", "-o", "adir"],
        ["prototxt", "expectation", "-o", "adir"],
        [*VP, "--json", "net.prototxt"],
    ],
)
def test_bad_outputs_refused_before_torch_is_imported(user_files: Path, argv: list[str]) -> None:
    """In a fresh interpreter: the refusal comes before the heavy imports (seconds)."""
    code = (
        "import sys\nfrom crossval import cli\n"
        f"rc = cli.main({argv!r})\nprint(rc, 'torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=user_files, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.split() == [str(EXIT_USAGE), "False"], proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("crossval: error: ")
