"""One result type for every comparison, with a one-line text a reader understands alone.

Grammar: ``<check>: <blob><index>=<actual>, but should be roughly <desired> (|err| <abs> >
<bound> allowed, rel <rel>, <ulp> ulp; <k> of <n> elements over; <rule>) [<case>]``, with
"exactly" for bit-exact copies. Actual is Caffe or the port, desired is the reference (or
Caffe, when a port is checked against it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray


def ulp_distance(actual: NDArray[np.float64], desired: NDArray[np.float64]) -> NDArray[np.float64]:
    """|actual - desired| in units of float32 spacing at `desired`."""
    spacing = np.spacing(np.abs(desired).astype(np.float32)).astype(np.float64)
    out: NDArray[np.float64] = np.abs(actual - desired) / spacing
    return out


@dataclass
class Comparison:
    """`actual` against `desired`, element by element, each within its own `bound`."""

    check: str
    blob: str
    actual: NDArray[np.float64]
    desired: NDArray[np.float64]
    bound: NDArray[np.float64]
    rule: str
    case: str = ""
    # a sample of a bigger array: the flat index of each element in an array of `shape`
    positions: NDArray[np.int64] | None = None
    shape: tuple[int, ...] = ()
    err: NDArray[np.float64] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.actual = np.asarray(self.actual, dtype=np.float64)
        self.desired = np.asarray(self.desired, dtype=np.float64)
        if self.actual.shape != self.desired.shape:
            raise ValueError(
                f"{self.check} {self.blob}: shape {self.actual.shape} compared "
                f"with {self.desired.shape}"
            )
        self.bound = np.broadcast_to(np.asarray(self.bound, dtype=np.float64), self.desired.shape)
        with np.errstate(all="ignore"):
            diff = self.actual - self.desired
        if np.isfinite(diff).all():
            self.err = np.abs(diff)
            return
        with np.errstate(invalid="ignore"):
            err = np.abs(diff)
        same_special = (np.isnan(self.actual) & np.isnan(self.desired)) | (
            np.isinf(self.actual) & (self.actual == self.desired)
        )
        self.err = np.where(same_special, 0.0, np.where(np.isnan(err), np.inf, err))

    @property
    def over(self) -> NDArray[np.bool_]:
        result: NDArray[np.bool_] = self.err > self.bound
        return result

    @property
    def mismatches(self) -> int:
        return int(self.over.sum())

    @property
    def passed(self) -> bool:
        return self.mismatches == 0

    @property
    def _worst_at(self) -> tuple[int, ...]:
        """Index in the compared arrays of the element furthest over (or nearest to) its bound."""
        if self.err.size == 0:
            return ()
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(
                self.bound > 0, self.err / self.bound, np.where(self.err > 0, np.inf, 0.0)
            )
        return tuple(int(i) for i in np.unravel_index(int(np.argmax(ratio)), self.err.shape))

    @property
    def worst(self) -> tuple[int, ...]:
        """Index of the element furthest over (or nearest to) its bound, in the whole array
        when the compared elements are a sample of it."""
        i = self._worst_at
        if self.positions is None or not i:
            return i
        flat = int(self.positions.reshape(self.err.shape)[i])
        return tuple(int(j) for j in np.unravel_index(flat, self.shape))

    @property
    def ratio(self) -> float:
        """Largest err / bound (below 1 passes): the margin this comparison had."""
        if self.err.size == 0:
            return 0.0
        i = self._worst_at
        e, b = float(self.err[i]), float(self.bound[i])
        return e / b if b > 0 else (0.0 if e == 0 else float("inf"))

    @property
    def max_abs(self) -> float:
        return float(self.err.max()) if self.err.size else 0.0

    @property
    def max_ulp(self) -> float:
        if self.err.size == 0:
            return 0.0
        finite = np.isfinite(self.desired) & np.isfinite(self.actual)
        return float(ulp_distance(self.actual[finite], self.desired[finite]).max(initial=0.0))

    @property
    def _count(self) -> str:
        if self.positions is None:
            return f"{self.err.size} elements"
        return f"{self.err.size} sampled elements (of {int(np.prod(self.shape))})"

    def __str__(self) -> str:
        i = self._worst_at
        idx = "[" + ", ".join(map(str, self.worst)) + "]" if i else ""
        a, d = (float(self.actual[i]), float(self.desired[i])) if self.err.size else (0.0, 0.0)
        e, b = (float(self.err[i]), float(self.bound[i])) if self.err.size else (0.0, 0.0)
        rel = e / abs(d) if d else float("inf") if e else 0.0
        ulp = float(ulp_distance(np.array(a), np.array(d))) if np.isfinite(a + d) else np.inf
        exactly = self.rule.startswith("bit-exact")
        verdict = ("but" if not self.passed else "and") + (
            " should be exactly" if exactly else " should be roughly"
        )
        return (
            f"{self.check}: {self.blob}{idx}={a:.9g}, {verdict} {d:.9g} "
            f"(|err| {e:.3g} {'>' if e > b else '<='} {b:.3g} allowed, rel {rel:.3g}, "
            f"{ulp:.3g} ulp; {self.mismatches} of {self._count} over; "
            f"{self.rule}) [{self.case}]"
        )


def three_way(
    kind: str,
    name: str,
    caffe: ArrayLike,
    torch: ArrayLike,
    ref: ArrayLike,
    bound: ArrayLike,
    rule: str,
    case: str = "",
) -> list[Comparison]:
    """Caffe and the float32 PyTorch side each against the float64 reference within `bound`,
    and against each other within `cross(bound)`."""
    from .tolerances import cross

    c, t, r, b = (np.asarray(v, dtype=np.float64) for v in (caffe, torch, ref, bound))
    return [
        Comparison(f"{kind} caffe~ref64", name, c, r, b, rule, case),
        Comparison(f"{kind} torch~ref64", name, t, r, b, rule, case),
        Comparison(f"{kind} torch~caffe", name, t, c, cross(b), rule, case),
    ]


def exact(
    check: str, blob: str, actual: ArrayLike, desired: ArrayLike, case: str = ""
) -> Comparison:
    """A bit-for-bit comparison (copies: weights, fixed kernels, saved models).

    Every element whose bytes differ counts, including -0.0 against 0.0 and NaN payloads.
    """
    a = np.ascontiguousarray(actual)
    d = np.ascontiguousarray(desired)
    cmp = Comparison(
        check,
        blob,
        a.astype(np.float64),
        d.astype(np.float64),
        np.zeros(d.shape),
        "bit-exact copy",
        case,
    )
    if a.dtype != d.dtype:
        cmp.rule = f"bit-exact copy; dtype {a.dtype} is not {d.dtype}"
        cmp.err = np.full(d.shape, np.inf)
        return cmp
    differs = a.view(f"u{a.itemsize}") != d.view(f"u{d.itemsize}")
    cmp.err = np.where(differs, np.maximum(cmp.err, np.finfo(np.float64).tiny), 0.0)
    return cmp
