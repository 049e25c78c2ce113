"""Batched properties (crossval.batched): the cases an example expands to, the vectorised
reference and bounds, the comparisons of many cases at once, and the split of a failing
batch to its failing case."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_heads import PINNED
from torch.func import vmap

from crossval import batched
from crossval import tolerances as tol
from crossval.batched import (
    BatchFailure,
    CaseBatch,
    Spec,
    check_batch,
    exact_each,
    expand,
    reference64,
    run_batch,
    run_torch_batch,
    three_way_each,
)
from crossval.checks import Harness
from crossval.compare import Comparison, three_way
from crossval.heads import COMBINATIONS, HEADS
from crossval.reference import losses as ref_losses
from crossval.strategies import build_case
from crossval.worker import CaffeWorker


@pytest.fixture(scope="module")
def harness(worker: CaffeWorker) -> Harness:
    return Harness(worker)


def _spec(head: str, loss: str, **kw: Any) -> Spec:
    labels = loss == "softmax_with_loss"
    base: dict[str, Any] = dict(batch=8, features=64, bins=100, spread=5.0, seed=7, count=12)
    if labels:
        base.update(targets="fractional", normalization="VALID", ignoring="some")
    base.update(kw)
    return Spec(head, loss, **base)


# ---- the cases an example expands to --------------------------------------------------------


@pytest.mark.parametrize("combo", COMBINATIONS, ids=["+".join(c) for c in COMBINATIONS])
def test_expand_makes_independent_cases_that_reach_the_spread(combo: tuple[str, str]) -> None:
    head, loss = combo
    spec = _spec(head, loss, spread=60.0)
    batch = expand(spec)
    again = expand(spec)
    assert batch.size == 12 and batch.x.shape == (12, 8, 64)
    assert np.array_equal(batch.x, again.x) and np.array_equal(batch.target, again.target)
    # Each case its own inputs, weights and targets.
    for arr in (batch.x, batch.target, *batch.weights.values()):
        flat = arr.reshape(12, -1)
        assert len({row.tobytes() for row in flat}) == 12
    # Each case scaled to the spread, as build_case scales one.
    for i in range(batch.size):
        case = batch.case(i)
        module = HEADS[head].reference(case, torch.float64)
        ip = HEADS[head].ip_layer(case)
        z = module(torch.from_numpy(case.x).double())[ip].detach().numpy()
        reach = np.abs(z).max() if head == "sigmoid_scale" else (z.max(1) - z.min(1)).max()
        assert reach == pytest.approx(60.0, rel=1e-5)


def test_expand_labels_follow_the_modes() -> None:
    batch = expand(_spec("expectation", "softmax_with_loss", ignoring="out-of-range"))
    assert batch.template.ignore_label == 255
    lab = batch.target
    assert ((lab == 255) | ((lab >= 0) & (lab < 100))).all() and (lab == 255).any()
    assert (np.trunc(lab) != lab).any()  # fractional labels, which Caffe truncates
    every = expand(_spec("expectation", "softmax_with_loss", ignoring="all"))
    assert (every.target == every.template.ignore_label).all()
    ends = expand(_spec("sigmoid_scale", "euclidean", targets="ends"))
    assert set(np.unique(ends.target)) == {0.0, 99.0}


def test_a_case_of_a_batch_round_trips() -> None:
    cases = [build_case("expectation", "euclidean", 4, 16, bins=10, seed=s) for s in range(3)]
    batch = CaseBatch.of(cases)
    for i, c in enumerate(cases):
        got = batch.case(i)
        assert np.array_equal(got.x, c.x) and np.array_equal(got.target, c.target)
        assert all(np.array_equal(got.weights[k], v) for k, v in c.weights.items())
    other = build_case("expectation", "euclidean", 4, 16, bins=11, seed=0)
    with pytest.raises(ValueError, match="cannot batch"):
        CaseBatch.of([cases[0], other])


# ---- the vectorised reference ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalization", ["VALID", "FULL", "BATCH_SIZE", "NONE"])
def test_vectorised_softmax_with_loss_is_the_checked_one_per_case(
    dtype: torch.dtype, normalization: str
) -> None:
    """The loss without its data-reading checks, under vmap, gives each case the value and
    gradient of the public (checked) function on that case alone, within the bounds of the
    same operations with their reductions in another order (the tolerance table's
    reordered_softmax_with_loss)."""
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(6, 8, 20, generator=g) * 40).to(dtype)
    labels = torch.randint(0, 20, (6, 8), generator=g).float() + 0.5
    labels[1, :3] = 7.0
    labels[2] = 7.0  # every label of case 2 ignored

    def each(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ref_losses.softmax_with_loss_unchecked(
            a, t, normalization=normalization, ignore_label=7
        )

    zb = z.clone().requires_grad_(True)
    values = vmap(each)(zb, labels)
    values.sum().backward()  # type: ignore[no-untyped-call]
    assert zb.grad is not None
    for i in range(6):
        zi = z[i].clone().requires_grad_(True)
        one = ref_losses.softmax_with_loss(
            zi, labels[i], normalization=normalization, ignore_label=7
        )
        one.backward()  # type: ignore[no-untyped-call]
        assert zi.grad is not None
        lab = np.trunc(labels[i].numpy()).astype(np.int64)
        valid = lab != 7
        norm = {"VALID": int(valid.sum()), "NONE": 1}.get(normalization, lab.size)
        e_loss, e_grad = tol.reordered.softmax_with_loss(
            z[i].double().numpy(), lab, valid, max(norm, 1), ref_losses.FLT_MIN, dtype
        )
        rule = "tolerances.reordered_softmax_with_loss"
        for blob, got, want, bound in (
            ("loss", values[i], one, np.asarray(e_loss)),
            ("d loss / d z", zb.grad[i], zi.grad, e_grad),
        ):
            a, d = (t.detach().double().numpy() for t in (got, want))
            c = Comparison(f"vmap case {i}", blob, a, d, bound, rule)
            assert c.passed, str(c)


# Specs reaching every branch of the closed forms: saturated sigmoids and softmaxes, SmoothL1
# on both sides of its kink, every normalization, ignored labels (some, all, out of range).
REFERENCE64_SPECS = [
    _spec("sigmoid_scale", "euclidean", spread=60.0, targets="ends"),
    _spec("sigmoid_scale", "smooth_l1", spread=2.0, sigma=3.0),
    _spec("sigmoid_scale", "smooth_l1", spread=60.0, sigma=0.5, targets="ends"),
    _spec("expectation", "euclidean", spread=300.0, targets="ends"),
    _spec("expectation", "smooth_l1", spread=5.0, sigma=2.0, targets="integers"),
    _spec("expectation", "smooth_l1", spread=120.0, sigma=0.3),
    *(
        _spec("expectation", "softmax_with_loss", spread=spread, normalization=norm, ignoring=ig)
        for spread, norm, ig in [
            (5.0, "VALID", "some"),
            (300.0, "FULL", "out-of-range"),
            (120.0, "BATCH_SIZE", "none"),
            (60.0, "NONE", "all"),
            (90.0, "VALID", "all"),
        ]
    ),
]


def _reference64_disagreements(spec: Spec) -> list[str]:
    """Where `reference64` (closed forms) and the reference modules run in float64 under vmap
    differ by more than float64 recomputation (the table's regenerated_f64)."""
    batch = expand(spec)
    head = HEADS[spec.head]
    module = head.reference(batch.template, torch.float64)
    mine = reference64(head, batch, lambda: module)
    theirs = run_torch_batch(head, batch, torch.float64, module)
    pairs = [(f"blob {k}", mine.blobs[k], v) for k, v in theirs.blobs.items()]
    pairs += [(f"grad {k}", mine.grads[k], v) for k, v in theirs.grads.items()]
    pairs.append(("loss", mine.loss, theirs.loss))
    return [
        name
        for name, a, b in pairs
        if a.shape != b.shape or not np.all(np.abs(a - b) <= tol.regenerated_f64(b))
    ]


@pytest.mark.parametrize("spec", REFERENCE64_SPECS, ids=lambda s: f"{s.head}+{s.loss}")
def test_reference64_is_the_reference_modules_in_float64(
    spec: Spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The float64 side of a batch in closed form gives every blob, loss and gradient the
    reference modules give under vmap, to float64 rounding; no head or loss of the tables
    falls back to vmap."""
    real = batched.run_torch_batch

    def no_fallback(head: Any, b: CaseBatch, dtype: torch.dtype, module: Any) -> Any:
        assert dtype == torch.float32, "reference64 fell back to the modules"
        return real(head, b, dtype, module)

    monkeypatch.setattr(batched, "run_torch_batch", no_fallback)
    assert _reference64_disagreements(spec) == []


def test_a_loss_without_closed_form_runs_the_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss the closed forms do not cover gets the reference modules' float64 values."""
    monkeypatch.delitem(batched._LOSSES64, "euclidean")
    batch = expand(_spec("expectation", "euclidean", count=3))
    head = HEADS["expectation"]
    module = head.reference(batch.template, torch.float64)
    built: list[int] = []

    def factory() -> torch.nn.Module:
        built.append(1)
        return module

    got = reference64(head, batch, factory)
    want = run_torch_batch(head, batch, torch.float64, module)
    assert built == [1] and np.array_equal(got.loss, want.loss)
    assert all(np.array_equal(got.grads[k], v) for k, v in want.grads.items())


@pytest.mark.parametrize(
    "loss, broken",
    [
        ("euclidean", lambda a, t, c: batched._euclidean64(a, t, c)[0] * 2),  # no 1/2
        ("smooth_l1", lambda a, t, c: batched._smooth_l1_64(a, t, replace(c, sigma=1.0))[0]),
        ("softmax_with_loss", lambda z, t, c: batched._softmax_with_loss64(-z, t, c)[0]),
    ],
)
def test_a_wrong_closed_form_is_seen(
    loss: str, broken: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agreement check above fails on a deliberately wrong loss: the value only (the
    gradients kept right), so the loss alone is named."""
    right = batched._LOSSES64[loss]

    def wrong(a: Any, t: Any, c: Any) -> Any:
        return broken(a, t, c), right(a, t, c)[1]

    monkeypatch.setitem(batched._LOSSES64, loss, wrong)
    spec = next(s for s in REFERENCE64_SPECS if s.loss == loss and s.spread < 100)
    assert _reference64_disagreements(spec) == ["loss"]


def test_label_checks_moved_to_the_generator_keep_their_messages() -> None:
    bad = torch.tensor([[0.0, 3.0], [1.0, 20.0]])
    with pytest.raises(ValueError, match=r"label 20.0 \(cast to 20\) at position \(1,\)"):
        ref_losses.softmax_with_loss(torch.zeros(2, 5), bad[1])
    with pytest.raises(ValueError, match=r"label 20.0 \(cast to 20\) at position \(1, 1\)"):
        ref_losses.check_labels(torch.zeros(2, 2, 5), bad, axis=2)
    with pytest.raises(ValueError, match="finite"):
        ref_losses.check_labels(torch.zeros(2, 5), torch.tensor([0.0, float("nan")]))


# ---- comparisons of many cases at once -------------------------------------------------------


def test_batch_comparisons_flag_exactly_the_broken_case() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((5, 4, 3))
    bound = np.full(ref.shape, 1e-6)
    good = ref.astype(np.float32)
    broken = good.copy()
    broken[3, 2, 1] += 1e-3  # case 3, one element, far over its bound
    c_ok, t_ok, cross = three_way_each("forward", "b", good, broken, ref, bound, "r", str)
    assert not c_ok.failed_each.any()
    assert list(np.flatnonzero(t_ok.failed_each)) == [3]
    assert list(np.flatnonzero(cross.failed_each)) == [3]
    one = t_ok.one(3)
    assert not one.passed and one.worst == (2, 1) and "1 of 12 elements over" in str(one)
    assert t_ok.one(2).passed
    assert t_ok.ratio_each[3] > 100 and t_ok.ratio_each[2] < 1
    # NaN against a number is an infinite error; NaN against NaN none.
    nan = good.copy()
    nan[1, 0, 0] = np.nan
    c = three_way_each("forward", "b", nan, good, ref, bound, "r", str)[0]
    assert list(np.flatnonzero(c.failed_each)) == [1] and c.max_abs_each[1] == np.inf


def test_exact_batch_comparison_sees_every_bit() -> None:
    want = np.zeros((4, 3), dtype=np.float32)
    got = want.copy()
    got[2, 1] = -0.0  # equal as numbers, not bit for bit
    cmp = exact_each("transfer", "w", got, want, str)
    assert list(np.flatnonzero(cmp.failed_each)) == [2]
    assert "should be exactly" in str(cmp.one(2)) and cmp.one(0).passed
    wrong_type = exact_each("transfer", "w", want.astype(np.float64), want, str)
    assert wrong_type.failed_each.all() and "dtype" in wrong_type.rule


# ---- against real Caffe ----------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBINATIONS, ids=["+".join(c) for c in COMBINATIONS])
def test_batched_path_agrees_with_the_per_case_path(
    harness: Harness, combo: tuple[str, str]
) -> None:
    """Same comparisons, same verdicts, and the same bounds (to float64 rounding: the
    float64 reference runs batched) as `Harness.run_case` on each case alone."""
    batch = expand(_spec(*combo, spread=120.0, count=4))
    result = run_batch(harness, batch)
    assert result.passed
    for i in range(batch.size):
        alone = harness.run_case(batch.case(i))
        mine = result.case_result(i)
        assert [(c.check, c.blob) for c in mine.comparisons] == [
            (c.check, c.blob) for c in alone.comparisons
        ]
        for a, b in zip(mine.comparisons, alone.comparisons, strict=True):
            assert a.passed == b.passed
            # float64 values computed again in another order: the table's regenerated_f64
            for mine_v, alone_v in ((a.bound, b.bound), (a.desired, b.desired)):
                alone_v = np.asarray(alone_v, dtype=np.float64)
                diff = np.abs(np.asarray(mine_v, dtype=np.float64) - alone_v)
                assert np.all(diff <= tol.regenerated_f64(alone_v)), (a.check, a.blob)


def test_pinned_cases_pass_both_paths(harness: Harness) -> None:
    pinned = [case for cases in PINNED.values() for case in cases]
    assert pinned
    for case in pinned:
        assert harness.run_case(case).passed, case.describe()
        assert run_batch(harness, CaseBatch.of([case])).passed, case.describe()


def test_a_broken_case_is_split_out_and_named(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Caffe given wrong weights for one case of twelve: that case, and only it, fails; the
    failure names it and says that it passes alone (the fault was in the batch)."""
    batch = expand(_spec("expectation", "euclidean"))
    real = batched.submit_run_many

    def corrupt(worker: Any, prototxt: str, inputs: Any, params: Any, surgery: str = "") -> Any:
        bad = {k: [v.copy() for v in vs] for k, vs in params.items()}
        bad["fc100"][0][5, 3, 2] *= 1.01
        return real(worker, prototxt, inputs, bad, surgery)

    monkeypatch.setattr(batched, "submit_run_many", corrupt)
    result = run_batch(harness, batch)
    assert result.failing == [5]
    kinds = {c.check for c in result.case_result(5).failures}
    assert {"transfer", "forward caffe~ref64"} <= kinds
    with pytest.raises(BatchFailure) as info:
        check_batch(harness, batch)
    text = str(info.value)
    assert "1 of 12 cases failed; the first, case 5" in text
    assert "ONLY IN THE BATCH" in text and "transfer: fc100/0[3, 2]" in text
    assert "expand(Spec(head='expectation'" in text and ".case(5)" in text


def test_a_wrong_float32_side_is_caught_per_case(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The float32 PyTorch side wrong in one case's age: torch~ref64 and torch~caffe fail for
    that case only, Caffe~ref64 nowhere."""
    batch = expand(_spec("sigmoid_scale", "smooth_l1", count=6))
    real = batched.run_torch_batch

    def skew(head: Any, b: CaseBatch, dtype: torch.dtype, module: Any) -> Any:
        out = real(head, b, dtype, module)
        if dtype == torch.float32:
            out.blobs["pred_age"][4, 0, 0] += 0.01
        return out

    monkeypatch.setattr(batched, "run_torch_batch", skew)
    result = run_batch(harness, batch)
    assert result.failing == [4]
    pairs = {c.check for c in result.case_result(4).failures}
    assert pairs == {"forward torch~ref64", "forward torch~caffe"}


def test_a_real_failure_is_found_alone_too(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong reference (the fixed scale 100 instead of Caffe's 99) fails in the batch and
    when the failing case runs alone: the split reports the lone run's failures."""
    head = HEADS["sigmoid_scale"]
    batch = expand(_spec("sigmoid_scale", "euclidean", count=3))
    monkeypatch.setattr(
        type(head), "fixed_value", lambda self, case: np.array([100.0], dtype=np.float32)
    )
    with pytest.raises(BatchFailure) as info:
        check_batch(harness, batch)
    text = str(info.value)
    assert "3 of 3 cases failed; the first, case 0, fails alone too" in text
    assert "fixed caffe: pred_age/0[0]=99, but should be exactly 100" in text


@pytest.mark.parametrize("chunk", [1, 7, 1 << 15])
def test_batch_verdicts_are_comparison_verdicts_in_any_chunking(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batched.BatchComparison, "CHUNK", chunk)
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((9, 5))
    bound = np.full(ref.shape, 0.5)
    got = (ref + rng.uniform(-0.6, 0.6, ref.shape)).astype(np.float32)
    got[2, 0], ref[2, 0] = np.nan, np.nan  # the same special value: no error
    got[6, 3] = np.inf
    for factor in (1.0, 2.0):
        c = batched.BatchComparison("f", "b", got, ref, bound, "r", str, factor=factor)
        want = [
            not Comparison("f", "b", got[i], ref[i], bound[i] * factor, "r").passed
            for i in range(9)
        ]
        assert c.failed_each.tolist() == want and any(want) and not all(want)
        assert [c.one(i).passed for i in range(9)] == [not w for w in want]


@pytest.mark.parametrize("chunk", [1, 7, 1 << 16])
def test_three_way_verdicts_are_three_way_comparisons(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The three verdicts of `three_way_each` (torch~caffe's derived from the other two where
    they pass with margin) are `compare.three_way`'s, case by case, in any chunking: with
    errors over, special values on one side or both, and errors at the bound exactly."""
    monkeypatch.setattr(batched.BatchComparison, "CHUNK", chunk)
    rng = np.random.default_rng(11)
    ref = rng.standard_normal((12, 4, 5))
    bound = np.full(ref.shape, 2.0**-10)
    caffe = (ref + rng.uniform(-0.9, 0.9, ref.shape) * 2.0**-10).astype(np.float32)
    torch32 = (ref + rng.uniform(-0.9, 0.9, ref.shape) * 2.0**-10).astype(np.float32)
    caffe[1, 0, 0] += 0.01  # caffe~ref64 and torch~caffe
    torch32[2, 1, 1] = np.nan  # torch~ref64 and torch~caffe
    caffe[3, 0, 0] = torch32[3, 0, 0] = ref[3, 0, 0] = np.inf  # the same special value
    caffe[4, 2, 2] = torch32[4, 2, 2] = np.inf  # the same inf, but the reference finite
    # At the bound exactly: |caffe - ref| = |torch - ref| = bound, |torch - caffe| = 2 bound,
    # all within (beyond the margin, so decided by Comparison's rules).
    ref[5, 0, 0], caffe[5, 0, 0], torch32[5, 0, 0] = 0.0, 2.0**-10, -(2.0**-10)
    # One float32 step past it on the caffe side: caffe~ref64 and torch~caffe fail.
    ref[6, 0, 0], torch32[6, 0, 0] = 0.0, -(2.0**-10)
    caffe[6, 0, 0] = np.nextafter(np.float32(2.0**-10), np.float32(1))
    got = three_way_each("forward", "b", caffe, torch32, ref, bound, "r", str)
    want = [
        [
            not c.passed
            for c in three_way("forward", "b", caffe[i], torch32[i], ref[i], bound[i], "r")
        ]
        for i in range(12)
    ]
    assert [[bool(c.failed_each[i]) for c in got] for i in range(12)] == want
    assert want[1] == [True, False, True] and want[2] == [False, True, True]
    assert want[3] == [False, False, False] and want[4] == [True, True, False]
    assert want[5] == [False, False, False] and want[6] == [True, False, True]
    assert not any(any(want[i]) for i in (0, 7, 8, 9, 10, 11))


def test_params_caffe_cannot_hold_come_back_as_read(harness: Harness) -> None:
    """The worker compares the params it was sent with Caffe's read-back bit for bit and
    returns the cases that differ: float64 weights come back as Caffe holds them (float32)."""
    batch = expand(_spec("sigmoid_scale", "euclidean", count=3, features=4))
    case = batch.template
    head = HEADS[case.head]
    proto = harness.prototxt(head, case)
    w = np.full((3, 1, 4), 0.5)
    w[1, 0, 2] = 0.1  # not a float32
    sent = [w, batch.weights["fc1.bias"].astype(np.float64)]
    inputs = {"pool5": batch.x, "true_age": batch.target}
    runs = batched.submit_run_many(harness.worker, proto, inputs, {"fc1": sent})()
    back = runs.params["fc1"][0]
    assert back.dtype == np.float32 and back[1, 0, 2] == np.float32(0.1) and back[0, 0, 0] == 0.5
    assert runs.params["pred_age"][0].shape == (3, 1) and (runs.params["pred_age"][0] == 99).all()
    wrong = exact_each("transfer", "fc1/0", back, w, str)
    assert wrong.failed_each.all() and "dtype" in wrong.rule


@pytest.mark.thorough  # about 10 s: every shrinking step runs a batch and its case alone
def test_a_failing_property_shrinks_its_spec(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong reference (scale 100) fails the batched property; hypothesis shrinks the spec
    (the smallest batch and features) and the failure names the first failing case, alone."""
    head = HEADS["sigmoid_scale"]
    monkeypatch.setattr(
        type(head), "fixed_value", lambda self, case: np.array([100.0], dtype=np.float32)
    )

    @settings(max_examples=20, database=None, derandomize=True, deadline=None)
    @given(
        batch=batched.case_batches(
            combos=(("sigmoid_scale", "euclidean"),),
            count=4,
            spreads=st.just(1.0),
            batches=st.integers(1, 3),
            features=st.integers(1, 3),
        )
    )
    def prop(batch: CaseBatch) -> None:
        check_batch(harness, batch)

    with pytest.raises(BatchFailure) as info:
        prop()
    text = str(info.value)
    assert "the first, case 0, fails alone too" in text
    assert "sigmoid_scale+euclidean N=1 D=1 " in text and "batch=1, features=1" in text
