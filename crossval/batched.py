"""Batched properties: many independent cases per hypothesis example, checked vectorised.

One hypothesis example draws a `Spec`: the head and loss, the shapes, the hard-region choices
and a seed. `expand` turns it into a `CaseBatch` of `count` independent cases, each with its
own features, weights and targets (drawn together with numpy, one generator per spec). Then
`run_batch`:

- Caffe runs the cases back to back on one cached net in the worker (``run_many``);
- meanwhile PyTorch runs the reference on all of them at once, float32 and float64, under
  ``torch.func.vmap`` (the reference modules and losses themselves, with the loss's
  data-reading checks done here, where the cases are made);
- the bounds of every case come from the same tolerance functions, on arrays with a leading
  case axis (``Head.bounds_each``), and every comparison is made for all cases at once
  (`BatchComparison`).

A failing batch is split to its first failing case (`CaseBatch.case`), a plain `Case` that
the per-case path (``Harness.run_case``) runs again for the report; `check_batch` raises
with both, and hypothesis shrinks the spec as it shrinks any example.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from numpy.typing import NDArray
from torch.func import functional_call, vmap

from crossval.reference import losses as ref_losses
from crossval.reference.losses import check_labels

from . import transfer
from .checks import REFERENCE, CaseResult, Harness
from .compare import Comparison
from .heads import COMBINATIONS, HEADS, LOSSES, Case, Head, label_blob
from .strategies import BATCHES, BINS, FEATURES, SIGMAS, SPREADS, label_choices
from .tolerances import cross
from .worker import ManyRuns, submit_run_many

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]

_ZERO: F64 = np.zeros(())

# Cases per hypothesis example, by default, and the work (N * D * K, each case's
# multiply-adds in one matrix product) above which an example takes fewer: large shapes
# gain little from batching, their cost being the arithmetic itself.
COUNT = 16
MAX_WORK = 2**20


# glibc's malloc, left to itself, serves each array of a batch's size (a few MB: the weights
# and weight gradients of 64 cases) with a fresh mmap, or returns the freed heap top to the
# kernel, so that every such array costs its pages' faults again, batch after batch: about a
# third of the parent's time (measured: 388 against 260 us of CPU a case, expectation head).
# `steady_allocator` keeps arrays up to 32 MB (glibc's ceiling for the threshold) on the heap
# and up to 64 MB of freed heap top for the next batch.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_steady = False


def steady_allocator() -> None:
    """Keep the batches' arrays' memory in the process between batches (glibc's mallopt; a
    no-op elsewhere). Batched runs start here (`expand`, `run_batch`), as `Harness` starts
    with `checks.single_threaded` for torch's threads: importing crossval leaves the
    allocator alone."""
    global _steady
    if _steady:
        return
    _steady = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def batched_examples(profile_examples: int) -> int:
    """Hypothesis examples of a batched head x loss property for a profile's count of
    examples per property: a quarter (at least 5), each of up to `COUNT` cases, so about 2
    to 4 times the profile's count of cases in less time than one case per example took."""
    return max(5, profile_examples // 4)


@dataclass(frozen=True)
class Spec:
    """What one hypothesis example draws; `expand` makes the cases (see `build_case` for the
    meaning of each field: the batch shares all but the seed's draws)."""

    head: str
    loss: str
    batch: int
    features: int
    bins: int = 100
    spread: float = 1.0
    seed: int = 0
    sigma: float = 1.0
    targets: str = "uniform"
    normalization: str | None = None
    ignoring: str = "none"
    count: int = COUNT


@dataclass(frozen=True)
class CaseBatch:
    """Independent cases of one head, loss and shape: `template` holds what they share, the
    arrays hold each case's own values along a leading case axis."""

    template: Case
    x: F32  # (cases, N, D)
    target: F32  # (cases, N, 1) ages, or (cases, N) labels
    weights: dict[str, F32]  # by state_dict key, (cases, ...)
    label: str = ""  # where the cases came from (a Spec), for reports

    @property
    def size(self) -> int:
        return int(self.x.shape[0])

    def case(self, i: int) -> Case:
        """Case `i` alone, as the per-case path takes it."""
        return dataclasses.replace(
            self.template,
            x=self.x[i],
            target=self.target[i],
            weights={k: v[i] for k, v in self.weights.items()},
        )

    def only(self, i: int) -> CaseBatch:
        """A batch of case `i` alone (to pin it with ``@example``)."""
        return CaseBatch.of([self.case(i)], f"case {i} of {self.label}")

    def describe(self, i: int) -> str:
        return f"{self.template.describe()}; case {i} of {self.size} ({self.label})"

    @classmethod
    def of(cls, cases: Sequence[Case], label: str = "") -> CaseBatch:
        """Cases made one by one (`build_case`, pinned examples) as a batch. They must share
        head, loss, shapes and loss parameters."""
        first = cases[0]

        def shared(c: Case) -> tuple[Any, ...]:
            arrays = (c.x, c.target, *c.weights.values())
            fields = (c.head, c.loss, c.bins, c.scale, c.sigma, c.normalization, c.ignore_label)
            return (*fields, tuple(c.weights), *(a.shape for a in arrays))

        for c in cases:
            if shared(c) != shared(first):
                raise ValueError(f"cannot batch {c.describe()} with {first.describe()}")
        return cls(
            first,
            np.stack([c.x for c in cases]),
            np.stack([c.target for c in cases]),
            {k: np.stack([c.weights[k] for c in cases]) for k in first.weights},
            label or f"{len(cases)} given cases",
        )


def expand(spec: Spec) -> CaseBatch:
    """The `spec.count` cases of `spec`, drawn with numpy from `spec.seed` (deterministic),
    as `build_case` draws one: standard normal features, weights (uniform, of the same
    variance) scaled so that each case reaches the spread, targets or labels by the targets
    mode, ignored labels by the ignoring mode (one ignore_label for the batch, as it is part
    of the net)."""
    steady_allocator()
    head, loss, m, n, d = spec.head, spec.loss, spec.count, spec.batch, spec.features
    if m < 1:
        raise ValueError(f"a batch needs at least one case, got count={spec.count}")
    row = HEADS[head]
    k = row.ip_outputs(spec.bins)
    rng = np.random.default_rng(spec.seed)
    x = rng.standard_normal((m, n, d)).astype(np.float32)
    # Uniform weights with build_case's variance (1 / D): a quarter of the cost of normal ones
    # to draw, and they are scaled to the spread below all the same. In float32 throughout
    # (the spread is a region to reach, not a value to hit exactly).
    w = rng.random((m, k, d), dtype=np.float32)
    w -= np.float32(0.5)
    w *= np.float32(np.sqrt(12.0 / d))
    b = rng.standard_normal((m, k))
    z = (x @ w.transpose(0, 2, 1)).astype(np.float64) + b[:, None, :]
    reach = row.reach(z)
    factor = np.where(reach > 0, spec.spread / np.where(reach > 0, reach, 1.0), 1.0)
    w *= factor.astype(np.float32)[:, None, None]
    b = b * factor[:, None]
    ip = row.default_ip_name(k)
    weights = {f"{ip}.weight": w, f"{ip}.bias": b.astype(np.float32)}

    ignore: int | None = None
    normalization = spec.normalization
    top = row.top_of(k, Case.scale)
    if LOSSES[loss].labels:
        if spec.targets == "ends":
            lab = rng.choice([0, k - 1], size=(m, n)).astype(np.float64)
        elif spec.targets == "fractional":  # Caffe truncates (static_cast<int>)
            lab = rng.integers(0, k, size=(m, n)) + rng.uniform(0, 0.999, size=(m, n))
        else:
            lab = rng.integers(0, k, size=(m, n)).astype(np.float64)
        if spec.ignoring != "none":
            ignore = 255 if spec.ignoring == "out-of-range" else int(rng.integers(0, k))
            all_ = spec.ignoring == "all"
            mask = np.ones((m, n), dtype=bool) if all_ else rng.random((m, n)) < 0.4
            lab = np.where(mask, ignore, lab)
        target = lab.astype(np.float32)
        # The loss's label checks, here where the labels are made, on every case at once (the
        # vectorised reference does not read its labels back into Python). They read only the
        # logits' shape: one zero, broadcast to it (allocating them cost 1.6 ms of CPU).
        logits = torch.zeros(()).expand(m, n, k)
        check_labels(logits, torch.from_numpy(target), axis=2, ignore_label=ignore)
    else:
        normalization = None
        if spec.targets == "ends":
            t = rng.choice([0.0, top], size=(m, n, 1))
        elif spec.targets == "integers":
            t = rng.integers(0, int(top) + 1, size=(m, n, 1)).astype(np.float64)
        else:
            t = rng.uniform(0.0, top, size=(m, n, 1))
        target = t.astype(np.float32)
    template = Case(
        head=head,
        loss=loss,
        x=x[0],
        target=target[0],
        weights={key: v[0] for key, v in weights.items()},
        bins=row.case_bins(spec.bins),
        sigma=spec.sigma,
        normalization=normalization,
        ignore_label=ignore,
        region=row.region(spec.spread),
    )
    return CaseBatch(template, x, target, weights, repr(spec))


@st.composite
def case_batches(
    draw: st.DrawFn,
    combos: tuple[tuple[str, str], ...] = COMBINATIONS,
    count: int = COUNT,
    spreads: st.SearchStrategy[float] = SPREADS,
    sigmas: st.SearchStrategy[float] = SIGMAS,
    batches: st.SearchStrategy[int] = BATCHES,
    features: st.SearchStrategy[int] = FEATURES,
    bins: st.SearchStrategy[int] = BINS,
    max_work: int | None = MAX_WORK,
) -> CaseBatch:
    """`count` cases of one drawn spec (fewer, down to one, where N * D * K exceeds
    `max_work` / count): the same labelled draws as `strategies.cases`."""
    head, loss = draw(st.sampled_from(combos), label="head+loss")
    labels = LOSSES[loss].labels
    n = draw(batches, label="batch")
    d = draw(features, label="features")
    k = draw(bins, label="bins") if HEADS[head].has_bins else Case.bins
    if max_work is not None:
        count = max(1, min(count, max_work // (n * d * HEADS[head].ip_outputs(k))))
    spec = Spec(
        head,
        loss,
        batch=n,
        features=d,
        bins=k,
        spread=draw(spreads, label="spread"),
        seed=draw(st.integers(0, 2**32 - 1), label="seed"),
        sigma=draw(sigmas, label="sigma") if LOSSES[loss].has_sigma else Case.sigma,
        **label_choices(draw, labels),
        count=count,
    )
    return expand(spec)


# ---- comparisons of many cases at once -----------------------------------------------------


def _shaped(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`a` broadcast to `shape` (as is when it has it: broadcast_to costs 20 us a call, and a
    batch makes dozens of these)."""
    return a if np.shape(a) == shape else np.broadcast_to(a, shape)


def _failed_each(
    actual: np.ndarray, desired: np.ndarray, bound: np.ndarray, factor: float, chunk: int
) -> NDArray[np.bool_]:
    """Which cases (leading axis) of `actual` against `desired` fail, by `Comparison`'s rules:
    every element's error |actual - desired| (float64) within `factor` times its `bound`
    (factor 2: `cross`). A few cases at a time (`chunk` elements), through one buffer. An
    element passes when err <= bound, which a NaN error never does: a case with an error not
    finite, or an element over, is flagged and decided again with `Comparison`'s rules for
    special values (the same values on both sides are no error, anything else an infinite
    one); flagged cases are failures or special values, few."""
    if factor not in (1.0, 2.0):
        raise ValueError(f"a comparison's factor is 1 or 2 (cross), got {factor}")
    shape = np.shape(desired)
    cases, per = int(shape[0]), math.prod(shape[1:])
    out = np.zeros(cases, dtype=bool)
    if cases == 0 or per == 0:
        return out
    limit = _shaped(cross(bound) if factor == 2.0 else bound, shape)
    step = max(1, chunk // per)
    axes = tuple(range(1, len(shape)))
    diff = np.empty((min(step, cases), *shape[1:]))
    ok = np.empty(diff.shape, dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):
        for lo in range(0, cases, step):
            part, n = slice(lo, lo + step), min(step, cases - lo)
            err = np.subtract(actual[part], desired[part], out=diff[:n], dtype=np.float64)
            np.abs(err, out=err)
            np.less_equal(err, limit[part], out=ok[:n])
            out[part] = ~ok[:n].all(axis=axes)
        for i in np.flatnonzero(out):
            exact = Comparison("", "", actual[i], desired[i], _ZERO, "").err
            out[i] = bool((exact > limit[i]).any())
    return out


# Within this fraction of their bound, the errors of caffe~ref64 and torch~ref64 imply that
# torch~caffe passes (see `_three_verdicts`).
_MARGIN = 1.0 - 2.0**-50


def _three_verdicts(
    caffe: np.ndarray, torch32: np.ndarray, ref: np.ndarray, bound: np.ndarray, chunk: int
) -> list[NDArray[np.bool_]]:
    """Which cases fail caffe~ref64, torch~ref64 and torch~caffe (against twice the bound),
    each by `Comparison`'s rules, from the differences of the first two only.

    Where both |caffe - ref| and |torch - ref| are within `_MARGIN` times the bound, so is
    torch~caffe within twice it. Each error computed in float64 is the true one rounded once
    (relative error at most 2^-53; exact in the subnormal range), as is `_MARGIN` times the
    bound, so the true errors are below bound (1 - 2^-50)(1 + 2^-51) < bound (1 - 2^-51); by
    the triangle inequality the true |torch - caffe| is below 2 bound (1 - 2^-51) < 2 bound,
    a float64 number (or inf), and rounding is monotone: the float64 |torch - caffe| is not
    over it. So torch~caffe costs no pass of its own: the cases flagged by the other two (an
    element beyond the margin, or an error not finite: failures and special values, few) have
    all three comparisons made again with `Comparison`'s rules."""
    pairs = [(caffe, ref, 1.0), (torch32, ref, 1.0), (torch32, caffe, 2.0)]
    shape = np.shape(ref)
    cases, per = int(shape[0]), math.prod(shape[1:])
    out = [np.zeros(cases, dtype=bool) for _ in pairs]
    if cases == 0 or per == 0:
        return out
    limit = _shaped(bound, shape)
    flagged = np.zeros(cases, dtype=bool)
    step = max(1, chunk // per)
    axes = tuple(range(1, len(shape)))
    diff = np.empty((min(step, cases), *shape[1:]))
    tight = np.empty(diff.shape)
    ok = np.empty(diff.shape, dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):
        for lo in range(0, cases, step):
            part, n = slice(lo, lo + step), min(step, cases - lo)
            np.multiply(limit[part], _MARGIN, out=tight[:n])
            for actual in (caffe, torch32):
                err = np.subtract(actual[part], ref[part], out=diff[:n], dtype=np.float64)
                np.abs(err, out=err)
                np.less_equal(err, tight[:n], out=ok[:n])
                flagged[part] |= ~ok[:n].all(axis=axes)
        for i in np.flatnonzero(flagged):
            for j, (actual, desired, factor) in enumerate(pairs):
                exact = Comparison("", "", actual[i], desired[i], _ZERO, "").err
                out[j][i] = bool((exact > (cross(limit[i]) if factor == 2.0 else limit[i])).any())
    return out


class BatchComparison:
    """`Comparison` for every case of a batch at once (arrays with a leading case axis): the
    same error, bound and verdict per element; `one(i)` is case i's own `Comparison`.

    Made by `three_way_each` (within `factor` times a bound: 1, or 2 for `cross`) or
    `exact_each` (bit for bit). The arrays are kept as given (float32 stays float32) and
    compared in float64 a few cases at a time (`_failed_each`, unless the verdicts are
    given: `failed_each`); only the verdict of each case is kept, the error array being made
    again when asked for (reports, a failing case)."""

    CHUNK = 1 << 16  # elements per step of the verdict

    def __init__(
        self,
        check: str,
        blob: str,
        actual: np.ndarray,
        desired: np.ndarray,
        bound: F64,
        rule: str,
        describe: Callable[[int], str],
        *,
        factor: float = 1.0,
        differs: NDArray[np.bool_] | None = None,
        failed_each: NDArray[np.bool_] | None = None,
    ) -> None:
        self.check, self.blob, self.rule, self.describe = check, blob, rule, describe
        self.actual, self.desired = actual, desired
        self._base = _shaped(bound, desired.shape)
        self._factor = factor
        self._differs = differs
        self._err: F64 | None = None
        self._bound: F64 | None = None
        cases = int(desired.shape[0])
        self.failed_each: NDArray[np.bool_]
        if differs is not None:
            self.failed_each = np.asarray(differs.reshape(cases, -1).any(1), dtype=bool)
        elif failed_each is not None:
            self.failed_each = failed_each
        else:
            self.failed_each = _failed_each(actual, desired, bound, factor, self.CHUNK)

    @property
    def bound(self) -> F64:
        if self._bound is None:
            self._bound = cross(self._base) if self._factor == 2.0 else self._base
        return self._bound

    @property
    def over(self) -> NDArray[np.bool_]:
        return np.asarray(self.err > self.bound)

    @property
    def err(self) -> F64:
        if self._err is None:
            if self._differs is None:
                self._err = Comparison(
                    self.check, self.blob, self.actual, self.desired, _ZERO, self.rule
                ).err
            else:
                a = self.actual.astype(np.float64)
                d = self.desired.astype(np.float64)
                with np.errstate(invalid="ignore"):
                    gap = np.abs(a - d)
                gap = np.where(np.isnan(gap), np.inf, gap)
                tiny = np.finfo(np.float64).tiny
                self._err = np.where(self._differs, np.maximum(gap, tiny), 0.0)
        return self._err

    @property
    def cases(self) -> int:
        return int(self.desired.shape[0])

    def _flat(self, v: np.ndarray) -> np.ndarray:
        return v.reshape(self.cases, -1)

    @property
    def ratio_each(self) -> F64:
        """(cases,): the largest err / bound of each case (`Comparison.ratio`)."""
        if self.desired[0].size == 0:
            return np.zeros(self.cases)
        err = self.err
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(self.bound > 0, err / self.bound, np.where(err > 0, np.inf, 0.0))
        out: F64 = self._flat(ratio).max(1)
        return out

    @property
    def max_abs_each(self) -> F64:
        if self.desired[0].size == 0:
            return np.zeros(self.cases)
        out: F64 = self._flat(self.err).max(1)
        return out

    def scale_each(self) -> F64:
        """(cases,): the largest finite |value| on either side, per case."""
        both = np.concatenate(
            [self._flat(self.actual.astype(np.float64)), self._flat(self.desired)], axis=1
        )
        both = np.where(np.isfinite(both), np.abs(both), 0.0)
        out: F64 = both.max(1, initial=0.0)
        return out

    def one(self, i: int) -> Comparison:
        c = Comparison(
            self.check,
            self.blob,
            self.actual[i],
            self.desired[i],
            self.bound[i],
            self.rule,
            self.describe(i),
        )
        c.err = self.err[i]  # carries bit-exact differences (see `exact_each`)
        return c


def three_way_each(
    kind: str,
    name: str,
    caffe: np.ndarray,
    torch32: np.ndarray,
    ref: np.ndarray,
    bound: Any,
    rule: str,
    describe: Callable[[int], str],
) -> list[BatchComparison]:
    """`compare.three_way` for every case at once: caffe~ref64, torch~ref64 and torch~caffe,
    their verdicts made together (`_three_verdicts`)."""
    b = _shaped(np.asarray(bound, dtype=np.float64), np.shape(ref))
    c = caffe.reshape(np.shape(ref))
    pairs = [(c, ref, 1.0), (torch32, ref, 1.0), (torch32, c, 2.0)]
    failed = _three_verdicts(c, torch32, ref, b, BatchComparison.CHUNK)
    names = ("caffe~ref64", "torch~ref64", "torch~caffe")
    return [
        BatchComparison(
            f"{kind} {pair}", name, a, d, b, rule, describe, factor=f, failed_each=verdicts
        )
        for pair, (a, d, f), verdicts in zip(names, pairs, failed, strict=True)
    ]


def exact_each(
    check: str, blob: str, actual: np.ndarray, desired: np.ndarray, describe: Callable[[int], str]
) -> BatchComparison:
    """`compare.exact` (bit for bit) for every case at once."""
    a = np.ascontiguousarray(actual)
    d = np.ascontiguousarray(np.broadcast_to(desired, np.shape(actual)))
    zero = np.zeros((), dtype=np.float64)
    if a.dtype != d.dtype:
        differs = np.ones(d.shape, dtype=bool)
        rule = f"bit-exact copy; dtype {a.dtype} is not {d.dtype}"
        cmp = BatchComparison(check, blob, a, d, zero, rule, describe, differs=differs)
        cmp._err = np.full(d.shape, np.inf)
        return cmp
    differs = a.view(f"u{a.itemsize}") != d.view(f"u{d.itemsize}")
    return BatchComparison(check, blob, a, d, zero, "bit-exact copy", describe, differs=differs)


@dataclass
class BatchResult:
    batch: CaseBatch
    comparisons: list[BatchComparison] = field(default_factory=list)

    @property
    def failed_each(self) -> NDArray[np.bool_]:
        out = np.zeros(self.batch.size, dtype=bool)
        for c in self.comparisons:
            out |= c.failed_each
        return out

    @property
    def passed(self) -> bool:
        return not bool(self.failed_each.any())

    @property
    def failing(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.failed_each)]

    def case_result(self, i: int) -> CaseResult:
        """Case i's comparisons, as the per-case path reports them."""
        return CaseResult(self.batch.case(i), [c.one(i) for c in self.comparisons])


# ---- running a batch -------------------------------------------------------------------------


@dataclass
class TorchBatch:
    blobs: dict[str, np.ndarray]  # (cases, ...)
    loss: np.ndarray  # (cases,)
    grads: dict[str, np.ndarray]  # d loss / d (pool5, learnable params, blobs), per case
    fixed: np.ndarray  # the module's fixed blob (one module serves every case)


def run_torch_batch(
    head: Head, batch: CaseBatch, dtype: torch.dtype, module: torch.nn.Module
) -> TorchBatch:
    """Forward and backward of the reference `module` on every case of `batch` in `dtype`,
    vectorised with ``torch.func.vmap`` (each case's learnable weights swapped in with
    ``functional_call``); the loss is the loss row's vectorisable reference."""
    case = batch.template
    keys = head.learnable(case)
    w = torch.from_numpy(batch.weights[keys[0]]).to(dtype).requires_grad_(True)
    b = torch.from_numpy(batch.weights[keys[1]]).to(dtype).requires_grad_(True)
    x = torch.from_numpy(batch.x).to(dtype).requires_grad_(True)
    target = torch.from_numpy(batch.target).to(dtype)

    def forward(w_: torch.Tensor, b_: torch.Tensor, x_: torch.Tensor) -> Any:
        return functional_call(module, {keys[0]: w_, keys[1]: b_}, (x_,))

    row = LOSSES[case.loss]

    def loss_of(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return row.reference_each(a, t, case)

    blobs: dict[str, torch.Tensor] = vmap(forward)(w, b, x)
    loss = vmap(loss_of)(blobs[head.consumed(case)], target)
    # Each case's loss depends on its own inputs only: the gradient of the sum is every
    # case's gradient. autograd.grad hands them over as computed; the weight's comes
    # transposed by the batched product, and is copied into the parameter's layout here, once:
    # compared with Caffe's, the reference's and its bound, all in that layout, it would
    # otherwise cost every comparison a strided pass (2 to 3 times the time).
    names = [name for name, t in blobs.items() if t.requires_grad]
    wrt = [x, w, b, *(blobs[name] for name in names)]
    got = torch.autograd.grad(loss.sum(), wrt, allow_unused=True)
    grads: dict[str, np.ndarray] = {
        "pool5": _np(got[0]),
        keys[0]: np.ascontiguousarray(_np(got[1])),
        keys[1]: _np(got[2]),
    }
    for name, t in blobs.items():
        g = got[3 + names.index(name)] if name in names else None
        grads[name] = _np(g) if g is not None else np.zeros(tuple(t.shape))
    fixed_key = transfer.state_dict_key(head.fixed_layer, 0)
    state = module.state_dict()
    fixed = _np(state[fixed_key]) if fixed_key in state else np.zeros(0)
    return TorchBatch({k: _np(v) for k, v in blobs.items()}, _np(loss), grads, fixed)


# ---- the float64 reference in closed form ---------------------------------------------------
#
# The float64 side gives each case's reference values (blobs, loss, gradients) that the bounds
# are computed from and every comparison measures against. Run as the float32 side is (the
# modules under vmap and autograd) it cost 4.6 to 5.9 ms a batch of 64 cases of the bench's
# shape, more than the float32 side itself (Python overhead of functorch, and SoftmaxWithLoss's
# custom autograd.Function batched by functorch's generated rule); written out here with
# numpy, forward and backward, for the heads' chains and the losses of the tables, 1.2 to
# 1.5 ms. They are the reference's own formulas term by term (its softmax with the max
# shifted out, Caffe's double-precision sigmoid through tanh and tanh's derivative
# 1 - tanh^2 as autograd takes it, the SmoothL1 branches, SoftmaxWithLoss's FLT_MIN clamp and
# Caffe's backward that ignores it, each normalization and ignore_label), with the
# reference's exp, tanh and log (`_libm`), so they agree with the reference modules run in
# float64 to float64 rounding: checked for every head x loss and branch in
# tests/test_batched.py, against the vmapped modules and against the per-case path. A chain
# or loss not written here falls back to the reference modules under vmap.

LossGrad = tuple[F64, F64]  # the loss of each case, and d loss / d (the consumed blob)


def _euclidean64(a: F64, t: F64, case: Case) -> LossGrad:
    d = a - t.reshape(a.shape)
    n = a.shape[1]
    loss: F64 = (d * d).sum(axis=(1, 2)) / n / 2
    return loss, d / n


def _smooth_l1_64(a: F64, t: F64, case: Case) -> LossGrad:
    d = a - t.reshape(a.shape)
    n, s2 = a.shape[1], case.sigma * case.sigma
    ad = np.abs(d)
    inner = ad < 1.0 / s2
    loss: F64 = np.where(inner, 0.5 * d * d * s2, ad - 0.5 / s2).sum(axis=(1, 2)) / n
    return loss, np.where(inner, s2 * d, np.sign(d)) / n


def _softmax_with_loss64(z: F64, t: F64, case: Case) -> LossGrad:
    m, n = z.shape[:2]
    lab = np.trunc(t.reshape(m, n)).astype(np.int64)
    valid = (
        np.ones(lab.shape, dtype=bool) if case.ignore_label is None else lab != case.ignore_label
    )
    norm = case.normalization or "VALID"
    if norm == "VALID":
        normalizer = np.maximum(valid.sum(axis=1), 1).astype(np.float64)
    else:
        normalizer = np.full(m, float(max({"FULL": n, "BATCH_SIZE": n, "NONE": 1}[norm], 1)))
    p = _softmax64(z)
    index = np.where(valid, lab, 0)[..., None]
    picked = np.maximum(np.take_along_axis(p, index, -1)[..., 0], ref_losses.FLT_MIN)
    loss: F64 = np.where(valid, -_libm(torch.log, picked), 0.0).sum(axis=1) / normalizer
    weight = valid.astype(np.float64)[..., None]
    diff = p.copy()
    np.put_along_axis(diff, index, np.take_along_axis(diff, index, -1) - weight, -1)
    return loss, diff * weight * (1.0 / normalizer)[:, None, None]


_LOSSES64: dict[str, Callable[[F64, F64, Case], LossGrad]] = {
    "euclidean": _euclidean64,
    "smooth_l1": _smooth_l1_64,
    "softmax_with_loss": _softmax_with_loss64,
}


def _libm(fn: Callable[[torch.Tensor], torch.Tensor], a: F64) -> F64:
    """`fn` (torch.exp, tanh, log) of `a`, as the reference evaluates it: another libm (numpy's
    own) may round some values the other way, and at a saturated sigmoid one ulp of tanh
    is the difference between a tiny age gradient and exactly 0."""
    out: F64 = fn(torch.from_numpy(a)).numpy()
    return out


def _softmax64(z: F64) -> F64:
    e = _libm(torch.exp, z - z.max(axis=-1, keepdims=True))
    out: F64 = e / e.sum(axis=-1, keepdims=True)
    return out


def _expectation64(
    z: F64, fixed: F64, case: Case, loss_of: Callable[[F64], LossGrad]
) -> tuple[dict[str, F64], F64, dict[str, F64]]:
    """<ip> -> Softmax prob -> Convolution pred_age (kernel `fixed`, (1, K))."""
    p = _softmax64(z)
    age = p @ fixed.T
    ip = HEADS[case.head].ip_layer(case)
    loss, g = loss_of(z if LOSSES[case.loss].labels else age)
    if LOSSES[case.loss].labels:
        g_z, g_p, g_age = g, np.zeros_like(p), np.zeros_like(age)
    else:
        g_age = g
        g_p = g_age * fixed
        g_z = p * (g_p - (g_p * p).sum(axis=-1, keepdims=True))
    return {ip: z, "prob": p, "pred_age": age}, loss, {ip: g_z, "prob": g_p, "pred_age": g_age}


def _sigmoid_scale64(
    z: F64, fixed: F64, case: Case, loss_of: Callable[[F64], LossGrad]
) -> tuple[dict[str, F64], F64, dict[str, F64]]:
    """fc1 -> Sigmoid pred01 (0.5 tanh(0.5 z) + 0.5) -> Scale pred_age (scale `fixed`)."""
    tanh = _libm(torch.tanh, 0.5 * z)
    p01 = 0.5 * tanh + 0.5
    age = p01 * fixed
    loss, g_age = loss_of(age)
    g_p01 = g_age * fixed
    g_z = g_p01 * 0.5 * (1.0 - tanh * tanh) * 0.5
    return (
        {"fc1": z, "pred01": p01, "pred_age": age},
        loss,
        {"fc1": g_z, "pred01": g_p01, "pred_age": g_age},
    )


_CHAINS64 = {
    ("InnerProduct", "Softmax", "Convolution"): _expectation64,
    ("InnerProduct", "Sigmoid", "Scale"): _sigmoid_scale64,
}


def reference64(
    head: Head,
    batch: CaseBatch,
    module: Callable[[], torch.nn.Module],
    weights64: dict[str, F64] | None = None,
) -> TorchBatch:
    """The float64 reference of every case of `batch`: its blobs, loss and gradients (d loss
    / d pool5, the learnable params and each blob), from the closed forms above; a head or
    loss they do not cover runs `module()` (the reference in float64) under vmap.
    `weights64`: the batch's weights in float64, if the caller has them."""
    case = batch.template
    chain = _CHAINS64.get(head.layer_types)
    loss_fn = _LOSSES64.get(case.loss)
    if chain is None or loss_fn is None:
        return run_torch_batch(head, batch, torch.float64, module())
    keys = head.learnable(case)
    if weights64 is None:
        weights64 = {k: batch.weights[k].astype(np.float64) for k in keys}
    x, w = batch.x.astype(np.float64), weights64[keys[0]]
    z = np.matmul(x, w.transpose(0, 2, 1))
    z += weights64[keys[1]][:, None, :]
    target = batch.target.astype(np.float64)
    fixed = head.fixed_value(case).astype(np.float64)
    blobs, loss, g = chain(z, fixed, case, lambda a: loss_fn(a, target, case))
    g_z = g[head.ip_layer(case)]
    grads = {
        "pool5": np.matmul(g_z, w),
        keys[0]: np.matmul(g_z.transpose(0, 2, 1), x),
        keys[1]: g_z.sum(axis=1),
        **g,
    }
    return TorchBatch(blobs, loss, grads, np.zeros(0))


def _np(t: torch.Tensor | None) -> np.ndarray:
    assert t is not None
    return t.detach().cpu().numpy()


def run_batch(harness: Harness, batch: CaseBatch) -> BatchResult:
    """Every comparison of ``Harness.run_case`` for every case of `batch`, at once."""
    steady_allocator()
    case = batch.template
    head = HEADS[case.head]
    proto = harness.prototxt(head, case)
    ip = head.ip_layer(case)
    keys = head.learnable(case)
    sent = [batch.weights[k] for k in keys]
    layout = harness._layouts[proto][ip]
    for value, shape in zip(sent, layout, strict=True):
        if value.shape[1:] != tuple(shape):
            raise ValueError(f"{ip}: Caffe shape {shape}, the batch's {value.shape[1:]}")
    pending = submit_run_many(
        harness.worker,
        proto,
        {"pool5": batch.x, label_blob(case): batch.target},
        {ip: sent},
        surgery=head.surgery,
    )  # Caffe runs while PyTorch does
    t32 = run_torch_batch(
        head, batch, torch.float32, harness.module(REFERENCE, head, case, torch.float32)
    )
    # The float64 weights, made once for the reference and its bounds.
    weights64 = {k: v.astype(np.float64) for k, v in batch.weights.items()}
    module64 = partial(harness.module, REFERENCE, head, case, torch.float64)  # if it falls back
    t64 = reference64(head, batch, module64, weights64)
    b = head.bounds_each(case, batch.x, batch.target, weights64, t64.blobs, t64.grads)
    desc = batch.describe
    grad_rule = f"tolerances.{b.loss_rule}_grad -> backward chain"
    triples: list[tuple[str, str, str, np.ndarray, np.ndarray, Any, str]] = [
        (
            "forward",
            blob,
            blob,
            t32.blobs[blob],
            b.ref[blob],
            b.forward[blob],
            b.forward_rules[blob],
        )
        for blob in head.blobs(case)
    ]
    triples.append(
        ("loss", "loss", "loss", t32.loss, t64.loss, b.loss, "tolerances." + b.loss_rule)
    )
    triples += [
        ("gradient", f"d loss/d {k}", k, t32.grads[k], t64.grads[k], b.backward[k], grad_rule)
        for k in head.gradient_keys(case)
    ]
    caffe: ManyRuns = pending()
    out = BatchResult(batch)
    add = out.comparisons.append

    # Copies, bit for bit: weights into Caffe and back, and the fixed blob on both sides.
    for i, value in enumerate(sent):
        add(exact_each("transfer", f"{ip}/{i}", caffe.params[ip][i], value, desc))
    fixed, want = head.fixed_layer, head.fixed_value(case)
    add(exact_each("fixed caffe", f"{fixed}/0", caffe.params[fixed][0], want[None], desc))
    if t32.fixed.size:
        key = transfer.state_dict_key(fixed, 0)
        every = np.broadcast_to(t32.fixed.astype(np.float32), (batch.size, *want.shape))
        add(exact_each("fixed torch", key, every, want[None], desc))

    caffe_grads = {"pool5": caffe.diffs["pool5"]}
    for i, k in enumerate(keys):
        caffe_grads[k] = caffe.param_diffs[ip][i]
    caffe_side = {
        "forward": caffe.blobs,
        "loss": {"loss": caffe.blobs["loss"].reshape(batch.size)},
        "gradient": caffe_grads,
    }
    for kind, name, key, t, r, bd, rule in triples:
        out.comparisons += three_way_each(kind, name, caffe_side[kind][key], t, r, bd, rule, desc)
    return out


class BatchFailure(AssertionError):
    """A batch failed: the message names its first failing case and that case's failures."""


def check_batch(harness: Harness, batch: CaseBatch) -> BatchResult:
    """`run_batch`, raising `BatchFailure` if any case fails: the batch is split to its first
    failing case, which runs again alone through the per-case path (``Harness.run_case``),
    and the message gives that run's failures (or the batch's, should the lone run pass)."""
    result = run_batch(harness, batch)
    failing = result.failing
    if not failing:
        return result
    i = failing[0]
    alone = harness.run_case(batch.case(i))
    shown = alone.failures or result.case_result(i).failures
    how = (
        "alone too"
        if alone.failures
        else "ONLY IN THE BATCH (the lone run passes): the batched path disagrees"
    )
    lines = [str(c) for c in shown]
    text = "\n  ".join(lines[:6]) + (f"\n  ... and {len(lines) - 6} more" if len(lines) > 6 else "")
    made = batch.label.startswith("Spec(")
    again = f"crossval.batched.expand({batch.label}).case({i})" if made else batch.label
    raise BatchFailure(
        f"{len(failing)} of {batch.size} cases failed; the first, case {i}, fails {how}:\n"
        f"  {text}\ncase: {batch.describe(i)}\nreproduce: {again}"
    )


__all__ = [
    "COUNT",
    "MAX_WORK",
    "BatchComparison",
    "BatchFailure",
    "BatchResult",
    "CaseBatch",
    "Spec",
    "batched_examples",
    "case_batches",
    "check_batch",
    "expand",
    "run_batch",
    "run_torch_batch",
]
