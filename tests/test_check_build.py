"""`crossval check-build` against real builds of the pinned source: the default, the reference
BLAS, one with a deliberate regression in Softmax's backward, one without the Python layer,
and a build that does not import. The variants are built once and cached."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from crossval_cli import run_crossval
from hypothesis import given
from profiles import thorough

from crossval import golden, provision
from crossval import localize as localization
from crossval.buildcheck import BuildChecker, Value
from crossval.cli import main
from crossval.heads import Case
from crossval.net import NetLayer, NetParam
from crossval.provision.progress import Progress
from crossval.reference.layers import LayerSpec
from crossval.strategies import cases
from crossval.transfer import state_dict_key
from crossval.worker import CaffeWorker


def _variant(name: str) -> provision.CaffeInstall:
    """Build (first time only; several minutes) and return a variant of the pinned Caffe."""
    return provision.ensure(variant=name, progress=Progress(quiet=True), install_runtime=False)


@pytest.fixture(scope="module")
def regression_build() -> provision.CaffeInstall:
    return _variant("softmax-backward-regression")


@pytest.fixture(scope="module")
def reference_blas_build() -> provision.CaffeInstall:
    return _variant("reference-blas")


# Examples of each head x loss row per build: 8 in `thorough`; 2 in the other profiles, where
# the regression is still named by every check below (the golden cases and Caffe's gradient
# checker name it whatever the count; the gradient rows fail on their first example).
EXAMPLES = "8" if thorough() else "2"


def check_build(*paths: Path, out: Path, extra: tuple[str, ...] = ()) -> tuple[int, str, dict]:
    args = ["check-build"]
    for p in paths:
        args += ["--caffe", str(p)]
    json_out = out / "check.json"
    args += ["--profile", "dev", "--examples", EXAMPLES, "--json", str(json_out), *extra]
    proc = run_crossval(*args, timeout=1800)
    data = json.loads(json_out.read_text()) if json_out.exists() else {}
    return proc.returncode, proc.stdout + proc.stderr, data


@pytest.mark.slow
def test_builds_side_by_side_and_the_regression_named(
    tmp_path: Path,
    caffe_install: provision.CaffeInstall,
    reference_blas_build: provision.CaffeInstall,
    regression_build: provision.CaffeInstall,
) -> None:
    builds = (caffe_install, reference_blas_build, regression_build)
    rc, text, data = check_build(*(b.python_path for b in builds), out=tmp_path)
    assert rc == 1, text
    default, netlib, broken = data["builds"]
    assert default["status"] == "clean", text
    assert netlib["status"] == "clean", text
    # The reference build really runs the Netlib BLAS bundled in its entry, not OpenBLAS.
    assert "openblas" in default["caffe"]["blas_library"]
    assert netlib["caffe"]["blas_library"].startswith(str(reference_blas_build.python_path))
    assert "libblas.so" in netlib["caffe"]["blas_library"]

    assert broken["status"] == "regression"
    # Named by the heads' golden cases at prob, and by the Softmax layer's own golden cases;
    # nothing else (every other layer type's golden cases pass on this build).
    regressed = set(broken["regressed_layers"])
    assert "backward of layer prob (Softmax)" in regressed, text
    assert any(r.startswith("backward of layer softmax-") for r in regressed), text
    assert all(r.startswith("backward of layer ") and r.endswith("(Softmax)") for r in regressed)
    assert "REGRESSED: backward of layer prob (Softmax)" in text
    # Its forward passes; the gradient rows and Caffe's own gradient checker fail.
    failing = set(broken["failing_checks"])
    assert "expectation+euclidean gradient" in failing
    assert "expectation+euclidean caffe gradient checker" in failing
    assert not any(c.endswith(" forward") or c.startswith("sigmoid_scale") for c in failing)
    assert broken["golden"]["failing_cases"], broken["golden"]

    pairs = {(p["a"], p["b"]): p for p in data["pairs"]}
    assert pairs[("[1]", "[2]")]["differing_layers"] == {}
    assert set(pairs[("[1]", "[3]")]["differing_layers"]) == regressed
    assert pairs[("[1]", "[3]")]["bit_identical"] < pairs[("[1]", "[3]")]["values"]
    assert "[1] vs [3]" in text and "DIFFER at backward of layer prob (Softmax)" in text


@pytest.mark.slow
def test_unusable_builds_are_named_and_each_is_checked(
    tmp_path: Path, caffe_install: provision.CaffeInstall
) -> None:
    """A build without the Python layer (--variant), then one that does not import: each is
    unusable for its own reason, the second still checked after the first (one run of the
    command: a usable build beside them would add its whole check, about 25 s; the builds'
    side-by-side checks are the test above)."""
    no_python = _variant("no-python-layer")
    broken = tmp_path / "broken"
    shutil.copytree(caffe_install.python_path / "caffe", broken / "caffe")
    so = broken / "caffe" / "_caffe.so"
    so.write_bytes(so.read_bytes()[:4096])  # a truncated copy, as a failed install leaves
    rc, text, data = check_build(broken, out=tmp_path, extra=("--variant", "no-python-layer"))
    assert rc == 2, text
    first, second = data["builds"]  # the --variant builds come first
    assert first["path"] == str(no_python.python_path)
    assert first["status"] == "unusable" and first["reason"] == "layer types missing: Python", text
    assert second["path"] == str(broken)
    assert second["status"] == "unusable" and second["reason"].startswith("import fails"), text
    assert "_caffe.so" in second["reason"]
    assert data["pairs"] == []


def test_a_caffe_abort_is_reported_with_its_log_line(
    tmp_path: Path, caffe_install: provision.CaffeInstall
) -> None:
    """A case Caffe aborts on (targets of another width than pred_age: EuclideanLoss's CHECK)
    makes the build unusable, with Caffe's own message; the command itself survives."""
    ref = golden.load_file(golden.GOLDEN_DIR / "sigmoid-euclidean.npz")
    wide = np.repeat(ref.case.target, 2, axis=1)
    ref.case = dataclasses.replace(ref.case, target=wide)
    bad = tmp_path / "golden"
    bad.mkdir()
    np.savez(bad / "sigmoid-euclidean.npz", **golden.encode(ref))
    extra = ("--golden", str(bad))
    rc, text, data = check_build(caffe_install.python_path, out=tmp_path, extra=extra)
    assert rc == 2, text
    reason = data["builds"][0]["reason"]
    assert reason.startswith("Caffe aborted during golden case sigmoid-euclidean"), reason
    assert "Check failed: bottom[0]->count(1) == bottom[1]->count(1)" in reason


def test_check_build_needs_a_build(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check-build"])  # in process: refused before any build is looked at
    err = capsys.readouterr().err
    assert code == 2 and "--caffe PATH or --variant NAME" in err, err


@pytest.fixture(scope="module")
def checker(caffe_install: provision.CaffeInstall) -> BuildChecker:
    return BuildChecker(CaffeWorker(caffe_install))


@given(case=cases())
def test_blob_by_blob_check_passes_on_the_default_build(checker: BuildChecker, case: Case) -> None:
    """No false alarms: every blob, the loss, and every diff (intermediate blobs' included)
    of the provisioned build within its bound, on the whole generated space."""
    got = checker.check(golden.live(case))
    assert not got.culprit, got.evidence or got.culprit


def test_the_golden_vectors_pass_on_the_default_build(checker: BuildChecker) -> None:
    for ref in golden.load():
        got = checker.check(ref)
        assert not got.failures, f"{ref.name}: {got.failures[0]}"


# ---- localization, on the heads' own layer structure ---------------------------------------


def _layer(
    name: str, kind: str, bottoms: tuple[str, ...], tops: tuple[str, ...], n: int
) -> NetLayer:
    return NetLayer(
        LayerSpec(name, kind, bottoms, tops), tuple(NetParam(i, (1,), 1.0) for i in range(n))
    )


LAYERS = [
    _layer("input", "Input", (), ("pool5", "true_age"), 0),
    _layer("fc100", "InnerProduct", ("pool5",), ("fc100",), 2),
    _layer("prob", "Softmax", ("fc100",), ("prob",), 0),
    _layer("pred_age", "Convolution", ("prob",), ("pred_age",), 1),
    _layer("loss", "EuclideanLoss", ("pred_age", "true_age"), ("loss",), 0),
]


def localize(layers: list[NetLayer], failing: list[Value]) -> tuple[str, set[str]]:
    """crossval.localize with check-build's names for params (state_dict keys)."""
    return localization.localize(
        layers, failing, param_key=lambda lay, i: state_dict_key(lay.name, i)
    )


def _bad(kind: str, key: str) -> Value:
    z = np.zeros(1)
    return Value(kind, key, z, z, z, "")


def test_localize_blames_the_first_wrong_forward_then_the_first_wrong_backward() -> None:
    assert localize(LAYERS, []) == ("", set())
    # A wrong prob makes pred_age, the loss and every diff wrong: prob's forward is to blame.
    every = [_bad("forward", b) for b in ("prob", "pred_age", "loss")]
    every += [_bad("backward", k) for k in ("fc100", "pool5", "fc100.weight")]
    assert localize(LAYERS, every)[0] == "forward of layer prob (Softmax)"
    # Right forward; fc100's diff wrong while prob's is right: Softmax's backward.
    grads = [_bad("backward", k) for k in ("fc100", "pool5", "fc100.weight", "fc100.bias")]
    assert localize(LAYERS, grads) == ("backward of layer prob (Softmax)", {"fc100"})
    # Only the weight gradient wrong: InnerProduct's backward (its param diff).
    assert localize(LAYERS, [_bad("backward", "fc100.weight")])[0] == (
        "backward of layer fc100 (InnerProduct)"
    )
    # The loss's own gradient wrong: the loss layer.
    assert localize(LAYERS, [_bad("backward", "pred_age"), *grads])[0] == (
        "backward of layer loss (EuclideanLoss)"
    )
    assert localize(LAYERS, [_bad("fixed", "pred_age.weight")])[0] == (
        "fixed param of layer pred_age (Convolution)"
    )
