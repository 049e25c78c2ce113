"""`crossval report`: the whole matrix, its files, and its exit status."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from profiles import thorough

from crossval import provision
from crossval.batched import three_way_each
from crossval.cli import main
from crossval.compare import Comparison
from crossval.report import Row, relative_error, table


def test_report_runs_the_matrix_and_writes_its_files(
    tmp_path: Path, caffe_install: provision.CaffeInstall, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rep"
    # 3 examples a row (10 in `thorough`): every row runs and is asserted on below. The
    # command in process (`main`; as a process of its own in test_fuzz's signal tests).
    count = "10" if thorough() else "3"
    code = main(["report", "--profile", "dev", "--examples", count, "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stdout + stderr
    assert "every check passes" in stdout
    assert "[crossval report]" in stderr  # progress while it runs
    data = json.loads((out / "report.json").read_text())
    assert data["passed"] is True
    checks = [r["check"] for r in data["rows"]]
    for needed in (
        "sigmoid_scale+euclidean forward",
        "expectation+softmax_with_loss gradient",
        "expectation+euclidean fixed",
        "expectation+smooth_l1 caffe gradient checker",
        "training Adam",
        "expectation onnx (onnxruntime)",
    ):
        assert needed in checks, checks
    assert all(r["verdict"] == "pass" and r["examples"] > 0 for r in data["rows"])
    # the error scale is measured on every row that has an error (the gradient checker's too)
    unscaled = [r["check"] for r in data["rows"] if r["max_abs"] > 0 and r["max_rel"] == 0]
    assert not unscaled, unscaled
    assert data["caffe"]["caffe_version"] == "1.0.0"
    md = (out / "report.md").read_text()
    assert "| training SGD |" in md and "![expectation](expectation.png)" in md
    for head in ("sigmoid_scale", "expectation"):
        png = (out / f"{head}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_a_failing_comparison_fails_its_row() -> None:
    row = Row("demo forward")
    row.examples = 1
    good = Comparison(
        "forward torch~caffe",
        "prob",
        np.array([0.5]),
        np.array([0.5]),
        np.array([1e-6]),
        "tolerances.softmax",
    )
    bad = Comparison(
        "forward torch~caffe",
        "prob",
        np.array([0.6]),
        np.array([0.5]),
        np.array([1e-6]),
        "tolerances.softmax",
    )
    row.add(good)
    assert row.verdict == "pass"
    row.add(bad)
    assert row.verdict == "FAIL" and row.failures == 1
    assert row.first_failure.startswith("forward torch~caffe: prob[0]=0.6")
    assert "| demo forward | 1 |" in table([row]) and "FAIL |" in table([row])
    assert Row("nothing ran").verdict == "FAIL"  # a check with no examples is no pass


def test_a_batch_adds_to_a_row_as_its_cases_one_by_one() -> None:
    """Row.add_each (the batched head rows) keeps the figures Row.add keeps per case."""
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((6, 3, 4)) * 50
    bound = np.abs(ref) * 1e-6
    got = (ref + rng.uniform(-1, 1, ref.shape) * bound * 0.9).astype(np.float32)
    got[4, 1, 2] = np.float32(ref[4, 1, 2] * 1.01)  # case 4 over its bound
    batch = three_way_each("forward", "prob", got, got, ref, bound, "tolerances.softmax", str)[0]
    each, one = Row("batched"), Row("one by one")
    each.add_each(batch, keep_ratio=True)
    for i in range(6):
        one.add(batch.one(i), keep_ratio=True)
    assert each.failures == one.failures == 1 and each.comparisons == one.comparisons == 6
    assert each.max_abs == one.max_abs and each.max_rel == one.max_rel
    assert each.max_ratio == one.max_ratio > 1 and each.rule == one.rule
    assert each.first_failure == one.first_failure and "prob[1, 2]" in each.first_failure
    assert each.ratios == one.ratios


def test_relative_error_is_measured_against_the_value_or_its_bound() -> None:
    """The error scale column: a plain relative error where the value stands clear of its
    bound; against the bound where the value is below it (cancellation, a saturated sigmoid's
    gradient), so a passing row never shows an error as large as the value as an alarm."""
    clear = Comparison("forward", "x", np.array([2.0 + 2e-7]), np.array([2.0]), 1e-6, "r")
    assert relative_error(clear.err, clear.desired, clear.bound) == pytest.approx(1e-7)
    tiny = Comparison("gradient", "g", np.array([6e-7]), np.array([3e-7]), 1e-5, "r")
    assert tiny.passed and tiny.err[0] / abs(tiny.desired[0]) == pytest.approx(1.0)
    assert relative_error(tiny.err, tiny.desired, tiny.bound) == pytest.approx(0.03)
    # and it still shows a failure: an error over the bound reads above 1 there
    wrong = Comparison("gradient", "g", np.array([1e-4]), np.array([3e-7]), 1e-5, "r")
    assert not wrong.passed and relative_error(wrong.err, wrong.desired, wrong.bound) > 1
    exact_zero = Comparison("transfer", "w", np.zeros(3), np.zeros(3), 0.0, "exact")
    assert relative_error(exact_zero.err, exact_zero.desired, exact_zero.bound) == 0.0
    off_zero = Comparison("transfer", "w", np.ones(1), np.zeros(1), 0.0, "exact")
    assert relative_error(off_zero.err, off_zero.desired, off_zero.bound) == float("inf")
