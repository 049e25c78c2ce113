"""`crossval validate-port`: exit codes, weight mapping, localization, replay, fixed params,
gradients, and a full-size DEX-style net."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import PROFILE
from crossval_cli import run_crossval

from crossval import provision
from crossval.cli import main


@pytest.fixture(scope="module")
def nets(
    tmp_path_factory: pytest.TempPathFactory, caffe_install: provision.CaffeInstall
) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("nets")
    made = {
        "expectation": ("expectation", "--features", "16", "--deploy"),
        "sigmoid": ("sigmoid_scale", "--features", "16", "--deploy"),
        "expectation_train": ("expectation", "--features", "16", "--loss", "euclidean"),
        "tiny": ("tiny_cnn", "--bins", "7"),
        "dex48": ("dex_vgg16", "--bins", "101", "--size", "48"),
        "dex224": ("dex_vgg16", "--bins", "101"),
    }
    out = {}
    for name, args in made.items():
        path = d / f"{name}.prototxt"
        proc = run_crossval("prototxt", *args, "-o", str(path))
        assert proc.returncode == 0, proc.stderr
        out[name] = path
    # The seed's workflow: the expectation head's kernel comes from net surgery.
    for name in ("expectation", "expectation_train"):
        init = d / f"{name}.caffemodel"
        proc = run_crossval("surgery", str(out[name]), "-o", str(init))
        assert proc.returncode == 0, proc.stderr
        out[name + ".init"] = init
    return out


# Examples a correct port must pass through the command (the many-example search for false
# alarms is tests/test_port_campaign.py's, on the engine): ci 20, thorough 100.
CLEAN = {"thorough": "100"}.get(PROFILE, "20")


def with_init(nets: dict[str, Path], net: str) -> list[str]:
    """--weights for a net that needs the surgery's kernel (learnable weights generated)."""
    init = nets.get(net + ".init")
    return ["--weights", str(init), "--generate"] if init else []


def first_failing(stdout: str) -> str:
    """The name of the layer the report blames (a segment's first layer)."""
    m = re.search(r"first failing layer: (\S+)", stdout)
    return m.group(1) if m else ""


@pytest.mark.parametrize(
    ("net", "port"),
    [
        ("expectation", "ports.heads:expectation"),
        ("sigmoid", "ports.heads:sigmoid"),
        ("tiny", "ports.tiny:make"),
        # made in training mode: run in eval(), as deployed (the report says so)
        ("tiny", "ports.tiny:make_dropout_active"),
    ],
)
def test_correct_ports_match(nets: dict[str, Path], net: str, port: str) -> None:
    proc = run_crossval(
        "validate-port", str(nets[net]), "--port", port, "--examples", CLEAN, *with_init(nets, net)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MATCH" in proc.stdout and re.search(r"\b[1-9]\d* comparisons", proc.stdout)
    assert "run in eval()" in proc.stdout


@pytest.mark.parametrize(
    ("net", "port", "blob"),
    [
        ("expectation", "ports.heads:expectation_kernel_from_one", "pred_age"),
        ("expectation", "ports.heads:expectation_softmax_over_batch", "prob"),
        ("sigmoid", "ports.heads:sigmoid_scale_100", "pred_age"),
        ("tiny", "ports.tiny:make_softmax_dim0", "prob"),
        ("tiny", "ports.tiny:make_functional_dropout", "drop1"),
    ],
)
def test_buggy_ports_fail_at_the_right_blob(
    nets: dict[str, Path], net: str, port: str, blob: str
) -> None:
    proc = run_crossval(
        "validate-port", str(nets[net]), "--port", port, "--examples", "60", *with_init(nets, net)
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert first_failing(proc.stdout) == blob, proc.stdout


def test_softmax_over_batch_needs_batch_above_one(nets: dict[str, Path]) -> None:
    one = run_crossval(
        "validate-port",
        str(nets["tiny"]),
        "--port",
        "ports.tiny:make_softmax_dim0",
        "--batch",
        "1",
        "--examples",
        "20",
    )
    assert one.returncode == 0, one.stdout  # invisible at batch 1: why the default is > 1


def test_loss_and_gradients_are_checked(nets: dict[str, Path]) -> None:
    ok = run_crossval(
        "validate-port",
        str(nets["expectation_train"]),
        "--port",
        "ports.heads:expectation_with_loss",
        "--examples",
        "40",
        *with_init(nets, "expectation_train"),
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verified layer by layer: fc100, prob, pred_age, loss;" in ok.stdout, ok.stdout
    bad = run_crossval(
        "validate-port",
        str(nets["expectation_train"]),
        "--port",
        "ports.heads:expectation_with_mse",
        "--examples",
        "40",
        *with_init(nets, "expectation_train"),
    )
    assert bad.returncode == 1, bad.stdout
    assert first_failing(bad.stdout) == "loss"
    # MSE's mean over the batch is half Caffe's 1/(2N) sum: the loss and its gradient
    assert "forward port~ref64: loss=" in bad.stdout
    assert "backward port~ref64: d/d pred_age" in bad.stdout


def test_forgotten_surgery_is_reported(nets: dict[str, Path]) -> None:
    """The seed's net without its init weights: Caffe's kernel is the filler's zeros."""
    proc = run_crossval(
        "validate-port",
        str(nets["expectation"]),
        "--port",
        "ports.heads:expectation",
        "--examples",
        "5",
    )
    assert proc.returncode == 1
    assert "fixed: fixed port~caffe: pred_age.weight vs Caffe pred_age/0" in proc.stdout
    assert first_failing(proc.stdout) == "pred_age"


def test_port_training_a_constant_is_reported(nets: dict[str, Path]) -> None:
    proc = run_crossval(
        "validate-port",
        str(nets["expectation"]),
        "--port",
        "ports.heads:expectation_trainable_kernel",
        "--examples",
        "10",
        *with_init(nets, "expectation"),
    )
    assert proc.returncode == 1
    assert first_failing(proc.stdout) == "pred_age", proc.stdout
    assert (
        "Caffe pred_age/0 has lr_mult 0, but the port's 'pred_age.weight' is a trainable parameter"
    ) in proc.stdout


def test_map_and_singleton_axes(nets: dict[str, Path], tmp_path: Path) -> None:
    bare = run_crossval("validate-port", str(nets["expectation"]), "--port", "ports.heads:renamed")
    assert bare.returncode == 2
    assert "Caffe param fc100/0 (100, 16) has no port tensor 'fc100.weight'" in bare.stderr
    mapping = tmp_path / "map.json"
    mapping.write_text(
        json.dumps({"fc100/0": "logits_w", "fc100/1": "logits_b", "pred_age/0": "ages"})
    )
    ok = run_crossval(
        "validate-port",
        str(nets["expectation"]),
        "--port",
        "ports.heads:renamed",
        "--map",
        str(mapping),
        "--examples",
        "30",
        *with_init(nets, "expectation"),
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_pool_floor_port_is_caught_at_pool1(nets: dict[str, Path]) -> None:
    """The wrong shape is a finding at the layer that made it, not at fc1 whose weight it
    no longer fits."""
    proc = run_crossval("validate-port", str(nets["tiny"]), "--port", "ports.tiny:make_pool_floor")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert first_failing(proc.stdout) == "pool1", proc.stdout
    assert "pool1: (N, 4, 4, 4), Caffe (N, 4, 5, 5); Caffe rounds pooled sizes up" in proc.stdout
    assert "Caffe param fc1/0 has shape (16, 100), the port's 'fc1.weight' (16, 64)" in (
        proc.stdout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no/such.prototxt", "--port", "ports.tiny:make"], "no prototxt at no/such.prototxt"),
        (["{tiny}", "--port", "ports.tiny"], "expected MODULE:CALLABLE"),
        (["{tiny}", "--port", "nosuchmodule:make"], "cannot import 'nosuchmodule'"),
        (["{tiny}", "--port", "ports.tiny:nothing"], "has no callable 'nothing'"),
        (["{tiny}", "--port", "ports.tiny:make", "--head", "expectation"], "needs --bins K"),
        (
            ["{tiny}", "--port", "ports.tiny:make", "--head", "expectation", "--bins", "101"],
            "--bins 101, but the net's Softmax output 'prob' has 7 bins",
        ),
        (["{tiny}", "--port", "ports.tiny:make", "--map", "{bad}"], "--map"),
        (
            ["{tiny}", "--port", "ports.tiny:make", "--weights", "nope.caffemodel"],
            "no caffemodel at nope.caffemodel",
        ),
    ],
)
def test_bad_input_exits_2(
    nets: dict[str, Path],
    tmp_path: Path,
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In process (the command line's own exit-2 path is run by the other tests here)."""
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    filled = [a.replace("{tiny}", str(nets["tiny"])).replace("{bad}", str(bad)) for a in args]
    # the port child the command starts imports the tests' ports as the CLI tests do
    paths = [str(Path(__file__).parent), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
    monkeypatch.setenv("PYTHONPATH", ":".join(paths))
    code = main(["validate-port", *filled])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err


def test_saved_failure_replays_and_json(nets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = run_crossval(
        "validate-port",
        str(nets["tiny"]),
        "--port",
        "ports.tiny:make_softmax_dim0",
        "--save-failure",
        str(tmp_path / "fail"),
        "--json",
        str(out),
    )
    assert proc.returncode == 1
    saved = list((tmp_path / "fail").glob("*.npz"))
    assert len(saved) == 1
    report = json.loads(out.read_text())
    assert report["verdict"] == "mismatch" and report["fault"]["layer"].startswith("prob ")
    replay = report["replay"]
    assert replay.startswith("crossval validate-port ") and f"--replay {saved[0]}" in replay
    again = run_crossval(*replay.split()[1:])
    assert again.returncode == 1 and first_failing(again.stdout) == "prob"
    fixed = run_crossval(
        "validate-port", str(nets["tiny"]), "--port", "ports.tiny:make", "--replay", str(saved[0])
    )
    assert fixed.returncode == 0, fixed.stdout  # the same example passes on a correct port


@pytest.mark.parametrize(
    ("port", "blob"),
    [
        ("ports.dex48:with_age", ""),
        pytest.param("ports.dex48:age_from_one", "pred_age", marks=pytest.mark.thorough),
        ("ports.dex48:flatten_nhwc", "fc6"),
        pytest.param("ports.dex48:bgr_swap", "conv1_1", marks=pytest.mark.thorough),
    ],
)
def test_dex_style_net_with_expectation_head(nets: dict[str, Path], port: str, blob: str) -> None:
    proc = run_crossval(
        "validate-port",
        str(nets["dex48"]),
        "--port",
        port,
        "--head",
        "expectation",
        "--bins",
        "101",
        "--examples",
        "2",
    )
    assert proc.returncode == (1 if blob else 0), proc.stdout + proc.stderr
    assert first_failing(proc.stdout) == blob, proc.stdout


@pytest.mark.thorough
def test_full_size_dex_with_expectation_head(nets: dict[str, Path]) -> None:
    """Input 1x3x224x224, VGG-16, fc8-101, Softmax, and the seed's pred_age on top."""
    proc = run_crossval(
        "validate-port",
        str(nets["dex224"]),
        "--port",
        "ports.dex:make_with_age",
        "--head",
        "expectation",
        "--bins",
        "101",
        "--examples",
        "2",
        "--batch",
        "1",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pred_age" in proc.stdout and "fc8-101" in proc.stdout
