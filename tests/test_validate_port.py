"""`crossval validate-port`: exit codes, weight mapping, localization, replay, fixed params,
gradients, and a full-size DEX-style net.

Most tests run the command's engine in this process (`portcheck.command.validate` on the
shared Caffe worker; its report's text and exit code are what the command prints and
returns): each run of the command starts a child (forked from the warm process) with a Caffe
worker of its own. The command runs through `main` in test_correct_ports_match's first case
(exit 0, --weights and --generate), the replay of test_saved_failure_replays_and_json and
test_bad_input_exits_2 (exit 2); as a process of its own in test_saved_failure_replays_and_json
(exit 1, --save-failure, --json, the replay line); its isolation of the port in
tests/test_port_isolation.py."""

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
from crossval.errors import CrossvalError
from crossval.portcheck.command import validate
from crossval.worker import CaffeWorker


@pytest.fixture(scope="module")
def nets(
    tmp_path_factory: pytest.TempPathFactory, caffe_install: provision.CaffeInstall
) -> dict[str, Path]:
    """The nets, made by crossval's own commands in this process (a child process each cost
    seconds of imports); the full-size DEX net only in `thorough`, its only user."""
    d = tmp_path_factory.mktemp("nets")
    made = {
        "expectation": ("expectation", "--features", "16", "--deploy"),
        "sigmoid": ("sigmoid_scale", "--features", "16", "--deploy"),
        "expectation_train": ("expectation", "--features", "16", "--loss", "euclidean"),
        "tiny": ("tiny_cnn", "--bins", "7"),
        "dex48": ("dex_vgg16", "--bins", "101", "--size", "48"),
    }
    if PROFILE == "thorough":
        made["dex224"] = ("dex_vgg16", "--bins", "101")
    out = {}
    for name, args in made.items():
        path = d / f"{name}.prototxt"
        assert main(["prototxt", *args, "-o", str(path)]) == 0, name
        out[name] = path
    # The seed's workflow: the expectation head's kernel comes from net surgery.
    for name in ("expectation", "expectation_train"):
        init = d / f"{name}.caffemodel"
        assert main(["surgery", str(out[name]), "-o", str(init)]) == 0, name
        out[name + ".init"] = init
    return out


def ports_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' ports importable by the port child the command starts in process (as
    run_crossval makes them for a process of its own)."""
    paths = [str(Path(__file__).parent), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
    monkeypatch.setenv("PYTHONPATH", ":".join(paths))


def engine(
    worker: CaffeWorker,
    nets: dict[str, Path],
    net: str,
    port: str,
    examples: int = 25,
    init: bool = True,
    **options: object,
) -> tuple[int, str]:
    """validate-port NET --port PORT --examples N (with the surgery's kernel where the net
    needs it, unless not `init`) in this process: the command's exit code and report."""
    weights = nets.get(net + ".init") if init else None
    try:
        report = validate(
            worker,
            nets[net],
            port,
            examples_n=examples,
            weights=weights,
            generate=weights is not None,
            **options,  # type: ignore[arg-type]
        )
    except CrossvalError as exc:
        return exc.exit_code, str(exc)
    return report.exit_code, report.text()


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
def test_correct_ports_match(
    worker: CaffeWorker,
    nets: dict[str, Path],
    net: str,
    port: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if net == "expectation":  # the command (`main`): --weights and --generate, exit 0
        ports_importable(monkeypatch)
        capsys.readouterr()
        argv = ["validate-port", str(nets[net]), "--port", port, "--examples", CLEAN]
        code = main([*argv, *with_init(nets, net)])
        got = capsys.readouterr()
        out = got.out + got.err
    else:
        code, out = engine(worker, nets, net, port, int(CLEAN))
    assert code == 0, out
    assert "MATCH" in out and re.search(r"\b[1-9]\d* comparisons", out)
    assert "run in eval()" in out


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
    worker: CaffeWorker, nets: dict[str, Path], net: str, port: str, blob: str
) -> None:
    code, out = engine(worker, nets, net, port, 60)
    assert code == 1, out
    assert first_failing(out) == blob, out


def test_softmax_over_batch_needs_batch_above_one(
    worker: CaffeWorker, nets: dict[str, Path]
) -> None:
    code, out = engine(worker, nets, "tiny", "ports.tiny:make_softmax_dim0", 20, batch=1)
    assert code == 0, out  # invisible at batch 1: why the default is > 1


def test_loss_and_gradients_are_checked(worker: CaffeWorker, nets: dict[str, Path]) -> None:
    code, out = engine(worker, nets, "expectation_train", "ports.heads:expectation_with_loss", 40)
    assert code == 0, out
    assert "verified layer by layer: fc100, prob, pred_age, loss;" in out, out
    code, bad = engine(worker, nets, "expectation_train", "ports.heads:expectation_with_mse", 40)
    assert code == 1, bad
    assert first_failing(bad) == "loss"
    # MSE's mean over the batch is half Caffe's 1/(2N) sum: the loss and its gradient
    assert "forward port~ref64: loss=" in bad
    assert "backward port~ref64: d/d pred_age" in bad


def test_forgotten_surgery_is_reported(worker: CaffeWorker, nets: dict[str, Path]) -> None:
    """The seed's net without its init weights: Caffe's kernel is the filler's zeros."""
    code, out = engine(worker, nets, "expectation", "ports.heads:expectation", 5, init=False)
    assert code == 1, out
    assert "fixed: fixed port~caffe: pred_age.weight vs Caffe pred_age/0" in out
    assert first_failing(out) == "pred_age"


def test_port_training_a_constant_is_reported(worker: CaffeWorker, nets: dict[str, Path]) -> None:
    code, out = engine(worker, nets, "expectation", "ports.heads:expectation_trainable_kernel", 10)
    assert code == 1, out
    assert first_failing(out) == "pred_age", out
    assert (
        "Caffe pred_age/0 has lr_mult 0, but the port's 'pred_age.weight' is a trainable parameter"
    ) in out


def test_map_and_singleton_axes(worker: CaffeWorker, nets: dict[str, Path]) -> None:
    code, bare = engine(worker, nets, "expectation", "ports.heads:renamed", init=False)
    assert code == 2, bare
    assert "Caffe param fc100/0 (100, 16) has no port tensor 'fc100.weight'" in bare
    mapping = {"fc100/0": "logits_w", "fc100/1": "logits_b", "pred_age/0": "ages"}
    code, out = engine(worker, nets, "expectation", "ports.heads:renamed", 30, mapping=mapping)
    assert code == 0, out


def test_pool_floor_port_is_caught_at_pool1(worker: CaffeWorker, nets: dict[str, Path]) -> None:
    """The wrong shape is a finding at the layer that made it, not at fc1 whose weight it
    no longer fits."""
    code, out = engine(worker, nets, "tiny", "ports.tiny:make_pool_floor")
    assert code == 1, out
    assert first_failing(out) == "pool1", out
    assert "pool1: (N, 4, 4, 4), Caffe (N, 4, 5, 5); Caffe rounds pooled sizes up" in out
    assert "Caffe param fc1/0 has shape (16, 100), the port's 'fc1.weight' (16, 64)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no/such.prototxt", "--port", "ports.tiny:make"], "no prototxt at no/such.prototxt"),
        (["{tiny}", "--port", "ports.tiny"], "expected MODULE:CALLABLE"),
        # refused in the port's child process, the error passed on to the command
        (["{tiny}", "--port", "nosuchmodule:make"], "cannot import 'nosuchmodule'"),
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
    """The command in process (`main`; its port child is a process of its own). The other
    usage errors found in the child are the engine's, below."""
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    filled = [a.replace("{tiny}", str(nets["tiny"])).replace("{bad}", str(bad)) for a in args]
    ports_importable(monkeypatch)
    code = main(["validate-port", *filled])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err


@pytest.mark.parametrize(
    ("port", "options", "message"),
    [
        ("ports.tiny:nothing", {}, "has no callable 'nothing'"),
        ("ports.tiny:make", {"head": "expectation"}, "needs --bins K"),
        (
            "ports.tiny:make",
            {"head": "expectation", "bins": 101},
            "--bins 101, but the net's Softmax output 'prob' has 7 bins",
        ),
    ],
)
def test_bad_port_or_head_is_a_usage_error(
    worker: CaffeWorker, nets: dict[str, Path], port: str, options: dict[str, object], message: str
) -> None:
    code, out = engine(worker, nets, "tiny", port, **options)
    assert code == 2, out
    assert message in out, out


def test_saved_failure_replays_and_json(
    worker: CaffeWorker,
    nets: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The command line, exit 1; its replay line run by the command in process."""
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
    ports_importable(monkeypatch)
    capsys.readouterr()
    again = main(replay.split()[1:])
    stdout = capsys.readouterr().out
    assert again == 1 and first_failing(stdout) == "prob", stdout
    # the same example passes on a correct port
    code, text = engine(worker, nets, "tiny", "ports.tiny:make", replay=saved[0])
    assert code == 0, text


@pytest.mark.parametrize(
    ("port", "blob"),
    [
        ("ports.dex48:with_age", ""),
        pytest.param("ports.dex48:age_from_one", "pred_age", marks=pytest.mark.thorough),
        ("ports.dex48:flatten_nhwc", "fc6"),
        pytest.param("ports.dex48:bgr_swap", "conv1_1", marks=pytest.mark.thorough),
    ],
)
def test_dex_style_net_with_expectation_head(
    worker: CaffeWorker, nets: dict[str, Path], port: str, blob: str
) -> None:
    # A correct port: 1 example (at scale 1) in `ci`, 2 in `thorough` (about 8 s an example)
    n = 2 if PROFILE == "thorough" or blob else 1
    code, out = engine(worker, nets, "dex48", port, n, head="expectation", bins=101)
    assert code == (1 if blob else 0), out
    assert first_failing(out) == blob, out


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
