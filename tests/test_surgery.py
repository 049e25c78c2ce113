"""`crossval surgery` and `crossval prototxt`: the seed's net surgery, and bad input.

The seed's workflow (K 100) runs both commands as a user types them, each a process of its
own; the other cases run the commands in this process (`main`, in the test's directory),
which spares a Python start and crossval's imports a call (each still starts its own Caffe
worker), and share the nets they start from (made once per module)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from crossval_cli import run_crossval

from crossval.cli import main
from crossval.worker import CaffeWorker

Command = Callable[..., tuple[int, str, str]]


@pytest.fixture
def command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Command:
    """crossval ARGS in process, in the test's directory: exit code, stdout, stderr."""
    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The nets the cases start from, made once by `crossval prototxt`."""
    d = tmp_path_factory.mktemp("made")
    for name, args in {
        "expectation": ("expectation", "--features", "8"),
        "deploy": ("expectation", "--features", "8", "--deploy"),
        "sigmoid": ("sigmoid_scale", "--features", "8"),
    }.items():
        assert main(["prototxt", *args, "-o", str(d / f"{name}.prototxt")]) == 0, name
    return d


@pytest.mark.parametrize("bins", [100, 101])
def test_surgery_writes_arange_kernel(
    tmp_path: Path, worker: CaffeWorker, command: Command, bins: int
) -> None:
    prototxt = ["prototxt", "expectation", "--bins", str(bins), "--features", "32"]
    surgery = ["surgery", "train_val.prototxt", "-o", "init_weights.caffemodel"]
    if bins == 100:  # the command line, as the seed's answer runs it
        made = run_crossval(*prototxt, "-o", "train_val.prototxt", cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        proc = run_crossval(*surgery, cwd=tmp_path)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        assert command(*prototxt, "-o", "train_val.prototxt")[0] == 0
        code, out, err = command(*surgery)
    proto = (tmp_path / "train_val.prototxt").read_text()
    # The seed's layer, as written in the answer.
    assert 'name: "pred_age"\n  type: "Convolution"' in proto and "lr_mult: 0" in proto
    assert "bias_term: false" in proto and "kernel_size" not in proto
    assert code == 0, err
    assert f"arange({bins})" in out
    # Fresh net: the kernel starts at zeros (filler constant 0): forgetting surgery is age 0.
    fresh = worker.params(proto, phase="TRAIN").params["pred_age"][0]
    assert not fresh.any()
    saved = worker.params(
        proto, phase="TRAIN", weights=str(tmp_path / "init_weights.caffemodel")
    ).params
    kernel = saved["pred_age"][0]
    assert kernel.dtype == np.float32 and kernel.shape == (1, bins)
    assert kernel.tobytes() == np.arange(bins, dtype=np.float32)[None].tobytes()


def test_existing_output_is_kept_without_force(
    tmp_path: Path, made: Path, command: Command
) -> None:
    shutil.copy(made / "expectation.prototxt", tmp_path / "net.prototxt")
    out = tmp_path / "init.caffemodel"
    out.write_bytes(b"user's file")
    net_text = (tmp_path / "net.prototxt").read_text()
    code, _, err = command("surgery", "net.prototxt", "-o", "init.caffemodel")
    assert code == 2 and "use --force" in err
    assert out.read_bytes() == b"user's file"
    code, _, err = command("surgery", "net.prototxt", "-o", "init.caffemodel", "--force")
    assert code == 0, err
    assert out.read_bytes() != b"user's file"
    code, _, err = command("surgery", "net.prototxt", "-o", "net.prototxt", "--force")
    assert code == 2 and "one of the inputs" in err
    assert (tmp_path / "net.prototxt").read_text() == net_text


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("sigmoid", "layer 'pred_age' is a Scale, not the Convolution"),
        ("no-layer", "the net has no layer 'pred_age'"),
        ("two-outputs", "has a kernel of shape (2, 100); the surgery needs (1, 100)"),
        # Caffe itself aborts on this net (EuclideanLoss CHECK): the caller gets its log line.
        ("caffe-abort", "Caffe killed by signal 6 during surgery: F"),
        ("with-bias", "has 2 param blobs"),
        (
            "malformed",
            'malformed prototxt: 3:3 : Message type "caffe.LayerParameter" has no '
            'field named "tpye"',
        ),
        ("truncated-weights", "is not a caffemodel (truncated"),
        ("missing", "no prototxt at"),
    ],
)
def test_bad_nets_get_clear_errors(
    tmp_path: Path, made: Path, command: Command, setup: str, message: str
) -> None:
    extra: list[str] = []
    if setup == "sigmoid":
        shutil.copy(made / "sigmoid.prototxt", tmp_path / "net.prototxt")
    elif setup != "missing":
        base = "deploy" if setup == "two-outputs" else "expectation"
        text = (made / f"{base}.prototxt").read_text()
        if setup == "no-layer":
            text = text.replace('"pred_age"', '"age_out"')
        elif setup in ("two-outputs", "caffe-abort"):
            text = text.replace("num_output: 1\n", "num_output: 2\n")
        elif setup == "with-bias":
            text = text.replace("bias_term: false", "bias_term: true")
        elif setup == "malformed":
            text = 'layer {\n  name: "x"\n  tpye: "Input"\n}\n'
        elif setup == "truncated-weights":
            (tmp_path / "net.prototxt").write_text(text)
            assert command("surgery", "net.prototxt", "-o", "good.caffemodel")[0] == 0
            good = (tmp_path / "good.caffemodel").read_bytes()
            (tmp_path / "cut.caffemodel").write_bytes(good[: len(good) // 2])
            extra = ["--weights", "cut.caffemodel"]
        (tmp_path / "net.prototxt").write_text(text)
    code, _, err = command("surgery", "net.prototxt", "-o", "out.caffemodel", *extra)
    assert code == 2, err
    assert message in err, err
    assert not (tmp_path / "out.caffemodel").exists()
    assert not list(tmp_path.glob(".out.caffemodel.*"))  # no partial file left behind
