"""Bad inputs are exit-2 errors naming the thing at fault (crossval.inputs), a validation
that compares nothing is a finding (exit 1); in-process through `crossval.cli.main`, with
real Caffe. The user's files stay byte for byte unchanged; no traceback.

validate-port's cases run its engine (`portcheck.command.validate`) on the shared Caffe
worker, where the command would start a child process importing PyTorch for each; the exit
code is the command's (the report's, or the error's). The command line's own refusals and
its passing of the child's errors are tests/test_validate_port.py's and tests/test_fuzz.py's."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from crossval import cli
from crossval.errors import EXIT_FINDING, EXIT_USAGE, CrossvalError
from crossval.portcheck.command import validate
from crossval.worker import CaffeWorker

PORTS = Path(__file__).resolve().parent / "ports"

MYPORT_EXTRA = '''

def make_empty() -> nn.Module:
    """forward returns {}: nothing to compare."""
    port = make()
    port.forward = lambda **blobs: {}
    return port


def make_int() -> int:
    """A factory that returns no module."""
    return 7


def make_not_tensors() -> nn.Module:
    """forward returns a list where a tensor belongs."""
    port = make()
    port.forward = lambda **blobs: {"prob": [0.5, 0.5]}
    return port


def make_changes_input() -> nn.Module:
    """Returns its input blob changed (as an in-place op on the input would)."""
    port = make()
    inner = port.forward

    def forward(data: Tensor) -> dict[str, Tensor]:
        out = inner(data=data)
        out["data"] = data + 1.0
        return out

    port.forward = forward
    return port
'''


SMALL = """layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 1 dim: 3 dim: 2 dim: 2 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 } }
"""


def crossval(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    return code, out, err


def validate_port(
    worker: CaffeWorker, net: str, port: str, **options: object
) -> tuple[int, str, str]:
    """validate-port NET --port PORT (options by validate()'s names) in this process, in the
    current directory: the command's exit code, its report (stdout) and its error (stderr)."""
    if "weights" in options:  # the shared worker runs in another directory than the test
        options["weights"] = Path.cwd() / str(options["weights"])
    try:
        report = validate(worker, Path(net), port, **options)  # type: ignore[arg-type]
    except CrossvalError as exc:
        return exc.exit_code, "", str(exc)
    return report.exit_code, report.text(), ""


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nets and weights made once by crossval itself."""
    d = tmp_path_factory.mktemp("made")
    for argv in (
        ["prototxt", "tiny_cnn", "--bins", "7", "-o", str(d / "tiny.prototxt")],
        ["prototxt", "expectation", "--features", "8", "--bins", "10", "-o", str(d / "a.prototxt")],
        [
            "prototxt",
            "expectation",
            "--features",
            "16",
            "--bins",
            "10",
            "-o",
            str(d / "b.prototxt"),
        ],
        ["surgery", str(d / "a.prototxt"), "-o", str(d / "a.caffemodel")],
    ):
        assert cli.main(argv) == 0, argv
    return d


@pytest.fixture
def user(tmp_path: Path, made: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for f in made.iterdir():
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(PORTS / "tiny.py", tmp_path / "myport.py")
    with open(tmp_path / "myport.py", "a") as f:
        f.write(MYPORT_EXTRA)
    (tmp_path / "binary.prototxt").write_bytes(b"\x08\x01\x12\x00\xff" * 20)
    (tmp_path / "latin1.prototxt").write_bytes('name: "caf\xe9"\n'.encode("latin-1"))
    (tmp_path / "empty.prototxt").write_text('name: "nothing"\n')
    (tmp_path / "adir.prototxt").mkdir()
    a = (tmp_path / "a.prototxt").read_text()
    (tmp_path / "dup.prototxt").write_text(a.replace('name: "fc10"', 'name: "pool5"', 1))
    (tmp_path / "zero.prototxt").write_text(a.replace("dim: 8", "dim: 0", 1))
    tiny = (tmp_path / "tiny.prototxt").read_text()
    second = tiny.index("layer {", tiny.index("layer {") + 1)
    (tmp_path / "noinput.prototxt").write_text(tiny[second:])
    (tmp_path / "bad.npz").write_text("not an npz")
    (tmp_path / "small.prototxt").write_text(SMALL)
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["validate-port", "n", "--port", "m:f", "--examples", "0"], "0 is not a positive integer"),
        (["validate-port", "n", "--port", "m:f", "--examples", "-5"], "-5 is not a positive"),
        (["validate-port", "n", "--port", "m:f", "--seed", "-1"], "-1 is negative"),
        (["validate-port", "n", "--port", "m:f", "--batch", "0"], "--batch: 0 is not a positive"),
        (["train", "expectation", "--out", "d", "--steps", "0"], "--steps: 0 is not a positive"),
        (["train", "expectation", "--out", "d", "--batch", "-1"], "--batch: -1 is not a positive"),
        (["train", "expectation", "--out", "d", "--snapshot", "0"], "--snapshot: 0 is not"),
        (["prototxt", "expectation", "--bins", "0"], "--bins: 0 is not a positive"),
        (["prototxt", "expectation", "--features", "x"], "'x' is not an integer"),
        (["mutants", "--max-examples", "0"], "--max-examples: 0 is not"),
        (["report", "--examples", "0"], "--examples: 0 is not"),
        (["caffe", "ensure", "--jobs", "0"], "--jobs: 0 is not"),
        (["train", "expectation", "--out", "d", "--lr", "nan"], "--lr: nan is not a finite number"),
        (["train", "expectation", "--out", "d", "--momentum", "inf"], "inf is not a finite"),
    ],
)
def test_counts_must_be_positive(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = crossval(capsys, *argv)
    assert code == EXIT_USAGE and message in err, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["surgery", "binary.prototxt", "-o", "o.caffemodel"], "is a binary file"),
        (["surgery", "latin1.prototxt", "-o", "o.caffemodel"], "is not UTF-8 text: byte 0xe9"),
        (["surgery", "adir.prototxt", "-o", "o.caffemodel"], "is a directory, not a prototxt"),
        (["surgery", "missing.prototxt", "-o", "o.caffemodel"], "no prototxt at missing"),
        (["export-onnx", "latin1.prototxt", "a.caffemodel", "-o", "o.onnx"], "is not UTF-8"),
        (["surgery", "empty.prototxt", "-o", "o.caffemodel"], "has no layers: the net is empty"),
        (["surgery", "dup.prototxt", "-o", "o.caffemodel"], "layer names used more than once"),
        (
            ["surgery", "noinput.prototxt", "-o", "o.caffemodel"],
            r"layer 'conv1' reads blob 'data', which no layer before it writes \(the net has no "
            r"Input layer\)",
        ),
        (["surgery", "a.prototxt", "-o", "o.caffemodel", "--layer", ""], "--layer must name"),
        (
            ["surgery", "small.prototxt", "-o", "o.caffemodel"],
            r"Caffe aborted making the net \('Check failed: data_'\): a blob has a zero dim",
        ),
        (
            ["surgery", "zero.prototxt", "-o", "o.caffemodel"],
            r"input 'pool5' has shape \(1, 0\); every dimension",
        ),
        (
            ["surgery", "b.prototxt", "-o", "o.caffemodel", "--weights", "a.caffemodel"],
            r"caffemodel a\.caffemodel does not fit b\.prototxt: it has 'fc10' with shapes "
            r"\[\(10, 8\), \(10,\)\], where the net has \[\(10, 16\), \(10,\)\]",
        ),
        (
            ["surgery", "b.prototxt", "-o", "o.caffemodel", "--weights", "missing.caffemodel"],
            "no caffemodel at missing.caffemodel",
        ),
    ],
)
def test_bad_files_named(
    user: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    before = snapshot(user)
    code, _, err = crossval(capsys, *argv)
    assert code == EXIT_USAGE, err
    assert re.search(message, err), err
    assert snapshot(user) == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"mapping": {"fc_1/0": "fc1.weight"}},
            r"--map key 'fc_1/0' names no Caffe param .*closest: fc1/0",
        ),
        ({"replay": Path("missing.npz")}, "--replay missing.npz does not exist"),
        ({"replay": Path("bad.npz")}, r"--replay bad\.npz is not a saved example"),
        (
            {"weights": "a.caffemodel"},
            r"a\.caffemodel does not fit tiny\.prototxt: it has no ",
        ),
    ],
)
def test_validate_port_bad_input(
    user: Path, worker: CaffeWorker, options: dict[str, object], message: str
) -> None:
    before = snapshot(user)
    code, _, err = validate_port(worker, "tiny.prototxt", "myport:make", **options)
    assert code == EXIT_USAGE, err
    assert re.search(message, err), err
    assert snapshot(user) == before


def test_empty_net_is_named_as_such(user: Path, worker: CaffeWorker) -> None:
    code, _, err = validate_port(worker, "empty.prototxt", "myport:make")
    assert code == EXIT_USAGE and "empty.prototxt has no layers: the net is empty" in err, err
    assert "map" not in err


def test_net_without_input_layer(user: Path, worker: CaffeWorker) -> None:
    code, _, err = validate_port(worker, "noinput.prototxt", "myport:make")
    assert code == EXIT_USAGE and "noinput.prototxt has no Input layer" in err, err


def test_port_returning_nothing_is_a_finding(user: Path, worker: CaffeWorker) -> None:
    code, out, err = validate_port(worker, "tiny.prototxt", "myport:make_empty", examples_n=2)
    assert code == EXIT_FINDING, out + err
    assert "MATCH:" not in out and "MISMATCH" in out
    assert "first failing layer: conv1 (Convolution)" in out  # the first unverified layer
    assert "not verified: the port returns none of the blobs conv1, relu1, pool1" in out
    assert "blobs the port did not return: conv1, relu1, pool1, fc1" in out


def test_port_returning_non_tensors_is_a_finding(user: Path, worker: CaffeWorker) -> None:
    code, out, err = validate_port(worker, "tiny.prototxt", "myport:make_not_tensors")
    assert code == EXIT_FINDING, out + err
    assert "PORT FAILURE: the port's forward returned values that are not tensors" in out
    assert "('prob': list) in its forward while running example 1" in out


def test_factory_returning_no_module_is_a_finding(user: Path, worker: CaffeWorker) -> None:
    code, out, err = validate_port(worker, "tiny.prototxt", "myport:make_int")
    assert code == EXIT_FINDING, out + err
    assert "PORT FAILURE: --port 'myport:make_int' returned int, not a torch.nn.Module" in out


def test_input_blob_divergence_is_named_as_an_input(user: Path, worker: CaffeWorker) -> None:
    code, out, err = validate_port(worker, "tiny.prototxt", "myport:make_changes_input")
    assert code == EXIT_FINDING, out + err
    assert "first failing layer: input data" in out
    assert "the port returned its input 'data' changed (does it modify its input in place?)" in out
    assert "written by ;" not in out and "its inputs []" not in out


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_unusable_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    where = tmp_path / "cache"
    if kind == "file":
        where.write_text("a file")
        given, message = str(where), "is a file, not a directory"
    else:
        given, message = "/proc/crossval-cache", "cannot be used for the build"
    monkeypatch.setenv("CROSSVAL_CACHE_DIR", given)
    code, _, err = crossval(capsys, "caffe", "ensure", "--quiet")
    assert code == EXIT_USAGE and f"CROSSVAL_CACHE_DIR={given} {message}" in err, err
