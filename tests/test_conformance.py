"""`crossval conformance`: the reference converter scores 100 %, the deliberately faulty
converter (tests/converters/faulty.py) gets exactly the verdicts its faults imply, and a
converter that crashes, exits, hangs, prints megabytes or refuses a net costs only its own
cases. Real Caffe throughout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from crossval_cli import TESTS, run_crossval

from crossval.cli import main
from crossval.conformance import cases as grid
from crossval.conformance import command
from crossval.conformance.cases import Case
from crossval.conformance.options import PROFILES
from crossval.errors import EXIT_FINDING, EXIT_PASS, EXIT_USAGE
from crossval.layercheck.run import LAYER
from crossval.reference import layers as ref
from crossval.reference.layers import LayerSpec
from crossval.worker import CaffeWorker

sys.path.insert(0, str(TESTS))
from converters import faulty

REFERENCE = "crossval.conformance.reference:convert"
FAULTY = "converters.faulty:convert"
MISBEHAVING = "converters.misbehaving:convert"


def _verdicts(result: command.Conformance) -> dict[str, str]:
    return {r.id: r.outcome.verdict for r in result.rows}


def test_reference_converter_passes_every_case(worker: CaffeWorker) -> None:
    types = ["BatchNorm", "Pooling", "Deconvolution"]
    result = command.run(worker, REFERENCE, layers=[*types, "zoo:resnet_block"])
    assert len(result.rows) == 3 * len(types) + 1
    failed = [(r.id, r.outcome.detail) for r in result.rows if r.outcome.verdict != "pass"]
    assert not failed
    assert all(r.outcome.comparisons > 0 for r in result.rows)
    assert result.exit_code == EXIT_PASS
    assert result.score() == f"{len(result.rows)} of {len(result.rows)} cases pass (100.0 %)"


@pytest.mark.thorough
@pytest.mark.parametrize("profile", ["ci", "thorough"])
def test_reference_converter_passes_the_whole_grid(worker: CaffeWorker, profile: str) -> None:
    result = command.run(worker, REFERENCE, profile=profile)
    per_type = PROFILES[profile].per_type
    assert len(result.rows) == per_type * len(grid.CASES) + len(grid.ZOO_NETS)
    failed = [(r.id, r.outcome.detail) for r in result.rows if r.outcome.verdict != "pass"]
    assert not failed
    assert result.exit_code == EXIT_PASS


def _t64(arrays: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in arrays]


def implied(worker: CaffeWorker, case: Case) -> str:
    """The verdict the faulty converter's faults imply for a one-layer case: fail when it
    adds a bias Caffe does not have, or when its faulty forward, in float64 on the case's
    own example, is not bit for bit the reference's (another shape, other values: each
    fault changes a value it touches by a large factor, or drops or adds a row); pass
    otherwise."""
    specs = worker.layer_specs(case.prototxt)
    spec = LayerSpec.from_caffe(next(s for s in specs if s.name == LAYER))
    if spec.type in faulty.BIASED:
        return "fail" if faulty.bias_added(spec) else "pass"
    fault = faulty.FAULTS.get(spec.type)
    if fault is None:
        return "pass"
    (_, arrays) = case.examples[0]
    assert arrays is not None
    inputs, params = arrays
    bottoms = _t64([inputs[b] for b in spec.bottoms])
    blobs = _t64(params.get(LAYER, []))
    want = ref.forward(spec, bottoms, blobs)
    with torch.no_grad():
        got = fault(spec, bottoms, blobs)
    same = len(got) == len(want) and all(
        g.shape == w.shape and torch.equal(g.nan_to_num(7.0), w.nan_to_num(7.0))
        for g, w in zip(got, want, strict=True)
    )
    return "pass" if same else "fail"


def test_faulty_converter_gets_exactly_the_verdicts_of_its_faults(worker: CaffeWorker) -> None:
    faulted = ["Pooling", "Eltwise", "Softmax", "Dropout", "InnerProduct"]
    controls = ["SoftmaxWithLoss"]  # no fault (its softmax is its own): every case passes
    result = command.run(worker, FAULTY, layers=[*faulted, *controls, "zoo:resnet_block"])
    built = {r.id: r.case for r in result.rows if r.case is not None and r.type != grid.ZOO}
    expected = {cid: implied(worker, c) for cid, c in built.items()}
    # ResNet's convolutions have no bias and its Eltwise SUM weighs the branch by -0.5
    expected["zoo/resnet_block"] = "fail"
    assert _verdicts(result) == expected
    # not vacuous: each fault is exposed by some case, and faulted types pass elsewhere
    failing = {r.type for r in result.rows if r.outcome.verdict == "fail"}
    assert set(faulted) <= failing
    assert any(expected[cid] == "pass" for cid in built if built[cid].type in faulted)
    for r in result.rows:
        if r.outcome.verdict == "fail" and r.type != grid.ZOO:
            assert f"layer ({r.type})" in r.outcome.detail  # localised to the layer
            assert "\n" not in r.outcome.detail
    resnet = next(r for r in result.rows if r.id == "zoo/resnet_block")
    assert "conv1" in resnet.outcome.detail and "unmapped" in resnet.outcome.detail
    assert result.exit_code == EXIT_FINDING


@pytest.mark.thorough
def test_faulty_converter_over_the_thorough_grid(worker: CaffeWorker) -> None:
    types = sorted(grid.CASES)
    result = command.run(worker, FAULTY, layers=types, profile="thorough")
    built = [r.case for r in result.rows if r.case is not None]
    assert len(built) == 10 * len(types)
    assert _verdicts(result) == {c.id: implied(worker, c) for c in built}


def test_misbehaving_converter_costs_only_its_own_cases(worker: CaffeWorker) -> None:
    """One case per type: ReLU aborts in convert, Sigmoid hangs past the limit, TanH prints
    50 MB, AbsVal's module exits in its forward, ELU is refused, PReLU's slopes are loaded
    wrong (which only the check of the loaded weights sees: the engine sets the learnable
    params itself); Power converts correctly. Each is reported, and the next case runs."""
    types = ["ReLU", "Sigmoid", "TanH", "AbsVal", "ELU", "PReLU", "Power"]
    ids = [grid.layer_cases(worker, t, PROFILES["ci"])[0].id for t in types]
    result = command.run(worker, MISBEHAVING, cases=ids, timeout=2.0)
    got = {r.type: r.outcome for r in result.rows}
    shown = "\n".join(f"{t}: {o.verdict} {o.detail}" for t, o in got.items())
    assert {t: o.verdict for t, o in got.items()} == {
        "ReLU": "crash",
        "Sigmoid": "timeout",
        "TanH": "pass",
        "AbsVal": "crash",
        "ELU": "unsupported",
        "PReLU": "fail",
        "Power": "pass",
    }, shown
    assert "SIGABRT" in got["ReLU"].detail and "its convert()" in got["ReLU"].detail
    assert "2 s" in got["Sigmoid"].detail and "its convert()" in got["Sigmoid"].detail
    assert got["TanH"].output_bytes == 50 * 1024 * 1024
    assert "exited with status 3" in got["AbsVal"].detail and "forward" in got["AbsVal"].detail
    assert "ELU is not supported" in got["ELU"].detail
    assert "does not hold the caffemodel's layer/0" in got["PReLU"].detail
    assert result.exit_code == EXIT_FINDING


def test_no_case_is_no_pass() -> None:
    assert command.Conformance("x:y", "ci").exit_code == EXIT_FINDING


def test_cli_table_json_kept_failures_and_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, keep = tmp_path / "table.json", tmp_path / "kept"
    done = run_crossval(
        "conformance",
        "--converter",
        FAULTY,
        "--layers",
        "Eltwise",
        "--json",
        str(out),
        "--out",
        str(keep),
        cwd=tmp_path,
    )
    assert done.returncode == EXIT_FINDING, done.stderr
    assert "| case | parameters | verdict | detail |" in done.stdout
    assert "| Eltwise | 3 | 1 | 2 | 0 | 0 | 0 |" in done.stdout
    data = json.loads(out.read_text())
    assert data["total"] == 3 and data["passed"] == 1 and data["exit_code"] == EXIT_FINDING
    failing = [c for c in data["cases"] if c["verdict"] == "fail"]
    assert len(failing) == 2
    for c in failing:
        kept = Path(c["kept"])
        assert (kept / "net.prototxt").read_text().count('type: "Eltwise"') == 1
        assert (kept / "weights.caffemodel").is_file()
        replay = (kept / "replay.txt").read_text()
        assert f"--case {c['id']}" in replay and FAULTY in replay
    # usage errors, in process (the same main): exit 2 before any case runs
    taken = ["conformance", "--converter", FAULTY, "--layers", "Eltwise", "--json", str(out)]
    assert main(taken) == EXIT_USAGE  # an existing --json is never overwritten
    assert main(["conformance", "--converter", "no_such_module:convert"]) == EXIT_USAGE
    assert main(["conformance", "--converter", REFERENCE, "--layers", "Pooling,Nope"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--json" in err and "no_such_module" in err and "'Nope'" in err
