"""The output policy (crossval.outputs): nothing the user owns is replaced or damaged."""

from __future__ import annotations

import errno
import multiprocessing
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from crossval import outputs
from crossval.outputs import OutputError


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_new_file_written_whole_with_the_usual_mode(tmp_path: Path) -> None:
    t = outputs.target(tmp_path / "out.json", "--json")
    outputs.write_text(t, '{"a": 1}\n')
    assert (tmp_path / "out.json").read_text() == '{"a": 1}\n'
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o666 & ~mask
    assert leftovers(tmp_path) == []


def test_existing_file_kept_without_force_replaced_with_it(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    out.write_bytes(b"the user's file")
    with pytest.raises(
        OutputError, match=r"-o .*out\.txt exists; not overwriting it \(use --force\)"
    ):
        outputs.target(out, "-o")
    assert out.read_bytes() == b"the user's file"
    outputs.write_bytes(outputs.target(out, "-o", force=True), b"new")
    assert out.read_bytes() == b"new"
    assert leftovers(tmp_path) == []


def test_existing_file_appearing_during_the_work_is_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    t = outputs.target(out, "-o")
    out.write_bytes(b"made meanwhile")
    with pytest.raises(OutputError, match="exists; not overwriting it"):
        outputs.write_bytes(t, b"mine")
    assert out.read_bytes() == b"made meanwhile"
    assert leftovers(tmp_path) == []


def test_an_input_is_refused_even_with_force(tmp_path: Path) -> None:
    net = tmp_path / "net.prototxt"
    net.write_bytes(b"layer {}")
    (tmp_path / "link.prototxt").symlink_to(net)
    os.link(net, tmp_path / "hard.prototxt")
    for name in ("net.prototxt", "link.prototxt", "hard.prototxt", "./net.prototxt"):
        with pytest.raises(OutputError, match="is one of the inputs of this command"):
            outputs.target(tmp_path / name, "--json", force=True, inputs=[net])
    with pytest.raises(OutputError, match="is one of the inputs of this command"):
        outputs.directory(tmp_path, "--out", force=True, inputs=[net], names=["net.prototxt"])
    assert net.read_bytes() == b"layer {}"


def test_bad_places_refused_up_front(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    cases = {
        tmp_path: "is a directory; give a file path",
        tmp_path / "missing" / "out.json": r"its directory .*missing does not exist",
        tmp_path / "afile" / "out.json": r"its directory .*afile is not a directory",
        Path("/proc/out.json"): r"cannot write in /proc",
    }
    for path, message in cases.items():
        with pytest.raises(OutputError, match=message):
            outputs.target(path, "--json", force=True)
    with pytest.raises(OutputError, match="is a file, not a directory"):
        outputs.directory(tmp_path / "afile", "--out")
    with pytest.raises(OutputError, match=r"parent directory .* does not exist"):
        outputs.directory(tmp_path / "missing" / "deeper", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_directory_outputs(tmp_path: Path) -> None:
    d = outputs.directory(tmp_path / "report", "--out", names=["report.json"])
    outputs.write_text(d.sub("build-1").file("report.json"), "{}")
    assert (tmp_path / "report" / "build-1" / "report.json").read_text() == "{}"
    with pytest.raises(OutputError, match=r"report\.json exists; not overwriting it"):
        outputs.directory(tmp_path / "report" / "build-1", "--out", names=["report.json"])
    with pytest.raises(OutputError, match="is not empty; not writing into it"):
        outputs.directory(tmp_path / "report", "--out", empty=True)
    outputs.directory(tmp_path / "report", "--out", empty=True, force=True)


def _failing(call: str, code: int) -> Any:
    real = getattr(os, call)

    def fail(fd: int, *rest: Any) -> Any:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".out"):
            raise OSError(code, os.strerror(code))
        return real(fd, *rest)

    return fail


@pytest.mark.parametrize(
    "call, code", [("write", errno.ENOSPC), ("fsync", errno.EIO), ("write", errno.EDQUOT)]
)
def test_failed_text_write_changes_nothing_and_prints_the_content(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    call: str,
    code: int,
) -> None:
    out = tmp_path / "out.json"
    out.write_bytes(b"old content, whole")
    t = outputs.target(out, "--json", force=True)
    monkeypatch.setattr(os, call, _failing(call, code))
    with pytest.raises(OutputError) as info:
        outputs.write_text(t, '{"result": 42}')
    monkeypatch.undo()
    assert os.strerror(code) in str(info.value) and "printed to stdout" in str(info.value)
    assert "--json" in str(info.value) and str(out) in str(info.value)
    assert '{"result": 42}' in capsys.readouterr().out
    assert out.read_bytes() == b"old content, whole"
    assert leftovers(tmp_path) == []


def test_failed_binary_write_keeps_the_content_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = outputs.target(tmp_path / "out.onnx", "-o")
    monkeypatch.setattr(os, "write", _failing("write", errno.ENOSPC))
    with pytest.raises(OutputError, match=r"kept in (.*) instead") as info:
        outputs.write_bytes(t, b"\x00model bytes")
    monkeypatch.undo()
    match = re.search(r"kept in (\S+) instead", str(info.value))
    assert match is not None
    kept = Path(match.group(1))
    try:
        assert kept.read_bytes() == b"\x00model bytes"
    finally:
        kept.unlink()
    assert not (tmp_path / "out.onnx").exists() and leftovers(tmp_path) == []


def test_staged_writer_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "w.caffemodel"
    out.write_bytes(b"old weights")
    t = outputs.target(out, "-o", force=True)
    with pytest.raises(RuntimeError, match="the writer broke"), outputs.staged(t) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer broke")
    assert out.read_bytes() == b"old weights" and leftovers(tmp_path) == []
    outputs.write_with(t, lambda p: p.write_bytes(b"new weights"))
    assert out.read_bytes() == b"new weights" and leftovers(tmp_path) == []


def _race(path: str, data: bytes, start: Any, results: Any) -> None:
    t = outputs.target(path, "-o")
    start.wait()
    try:
        outputs.write_bytes(t, data)
        results.put(("won", data[:1]))
    except OutputError as exc:
        results.put(("lost", str(exc)))


def test_two_processes_racing_for_a_new_path_exactly_one_wins(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for round_ in range(10):
        path = tmp_path / f"out{round_}.bin"
        start, results = ctx.Barrier(2), ctx.Queue()
        datas = [bytes([i]) * 100_000 for i in (1, 2)]
        procs = [ctx.Process(target=_race, args=(str(path), d, start, results)) for d in datas]
        for p in procs:
            p.start()
        got = sorted(results.get(timeout=30) for _ in procs)
        for p in procs:
            p.join(30)
        assert [g[0] for g in got] == ["lost", "won"]
        # The loser is refused when it checks the path again or when it links into place,
        # whichever the winner beat it to; either way its content is kept.
        refused = ("created by something else while crossval worked", "exists; not overwriting")
        assert any(r in got[0][1] for r in refused), got[0][1]
        assert path.read_bytes() == got[1][1] * 100_000
        kept = re.search(r"kept in (\S+) instead", got[0][1])
        assert kept is not None
        assert Path(kept.group(1)).read_bytes() in datas
        Path(kept.group(1)).unlink()
    assert leftovers(tmp_path) == []
