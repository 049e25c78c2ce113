"""`crossval surgery` and `crossval prototxt`: the seed's net surgery, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from crossval_cli import run_crossval

from crossval.worker import CaffeWorker


@pytest.mark.parametrize("bins", [100, 101])
def test_surgery_writes_arange_kernel(tmp_path: Path, worker: CaffeWorker, bins: int) -> None:
    assert (
        run_crossval(
            "prototxt",
            "expectation",
            "--bins",
            str(bins),
            "--features",
            "32",
            "-o",
            "train_val.prototxt",
            cwd=tmp_path,
        ).returncode
        == 0
    )
    proto = (tmp_path / "train_val.prototxt").read_text()
    # The seed's layer, as written in the answer.
    assert 'name: "pred_age"\n  type: "Convolution"' in proto and "lr_mult: 0" in proto
    assert "bias_term: false" in proto and "kernel_size" not in proto
    done = run_crossval(
        "surgery", "train_val.prototxt", "-o", "init_weights.caffemodel", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert f"arange({bins})" in done.stdout
    # Fresh net: the kernel starts at zeros (filler constant 0): forgetting surgery is age 0.
    fresh = worker.params(proto, phase="TRAIN").params["pred_age"][0]
    assert not fresh.any()
    saved = worker.params(
        proto, phase="TRAIN", weights=str(tmp_path / "init_weights.caffemodel")
    ).params
    kernel = saved["pred_age"][0]
    assert kernel.dtype == np.float32 and kernel.shape == (1, bins)
    assert kernel.tobytes() == np.arange(bins, dtype=np.float32)[None].tobytes()


def test_existing_output_is_kept_without_force(tmp_path: Path) -> None:
    run_crossval("prototxt", "expectation", "--features", "8", "-o", "net.prototxt", cwd=tmp_path)
    out = tmp_path / "init.caffemodel"
    out.write_bytes(b"user's file")
    net_text = (tmp_path / "net.prototxt").read_text()
    refused = run_crossval("surgery", "net.prototxt", "-o", "init.caffemodel", cwd=tmp_path)
    assert refused.returncode == 2 and "use --force" in refused.stderr
    assert out.read_bytes() == b"user's file"
    forced = run_crossval(
        "surgery", "net.prototxt", "-o", "init.caffemodel", "--force", cwd=tmp_path
    )
    assert forced.returncode == 0, forced.stderr
    assert out.read_bytes() != b"user's file"
    same = run_crossval("surgery", "net.prototxt", "-o", "net.prototxt", "--force", cwd=tmp_path)
    assert same.returncode == 2 and "one of the inputs" in same.stderr
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
def test_bad_nets_get_clear_errors(tmp_path: Path, setup: str, message: str) -> None:
    extra: list[str] = []
    if setup == "sigmoid":
        run_crossval(
            "prototxt", "sigmoid_scale", "--features", "8", "-o", "net.prototxt", cwd=tmp_path
        )
    elif setup == "missing":
        pass
    else:
        deploy = ["--deploy"] if setup == "two-outputs" else []
        run_crossval(
            "prototxt",
            "expectation",
            "--features",
            "8",
            "-o",
            "net.prototxt",
            *deploy,
            cwd=tmp_path,
        )
        text = (tmp_path / "net.prototxt").read_text()
        if setup == "no-layer":
            text = text.replace('"pred_age"', '"age_out"')
        elif setup in ("two-outputs", "caffe-abort"):
            text = text.replace("num_output: 1\n", "num_output: 2\n")
        elif setup == "with-bias":
            text = text.replace("bias_term: false", "bias_term: true")
        elif setup == "malformed":
            text = 'layer {\n  name: "x"\n  tpye: "Input"\n}\n'
        elif setup == "truncated-weights":
            assert (
                run_crossval(
                    "surgery", "net.prototxt", "-o", "good.caffemodel", cwd=tmp_path
                ).returncode
                == 0
            )
            good = (tmp_path / "good.caffemodel").read_bytes()
            (tmp_path / "cut.caffemodel").write_bytes(good[: len(good) // 2])
            extra = ["--weights", "cut.caffemodel"]
        (tmp_path / "net.prototxt").write_text(text)
    proc = run_crossval("surgery", "net.prototxt", "-o", "out.caffemodel", *extra, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "out.caffemodel").exists()
    assert not list(tmp_path.glob(".out.caffemodel.*"))  # no partial file left behind
