"""Bounds between two evaluations of the same floating-point operations on the same inputs
that may order their reductions differently: a function vectorised over a leading case axis
(``torch.func.vmap``, as ``crossval.batched`` runs the reference) against the same function
called case by case.

What may differ between the two, and what may not:

- a reduction (a sum, the sum inside a dot product or a matrix product): a batched kernel
  blocks and vectorises it in its own way, so the same terms are added in another order;
- a library function (exp, log): a vectorised kernel may evaluate some elements with its
  vector code and others with its scalar code, each within LIBM_ULPS ulps of the exact value;
- nothing else: +, -, *, / are correctly rounded, so equal operands give equal results on
  any code path; max, comparisons, selections and copies do not round at all.

So the two evaluations differ by the reductions' orders, the library functions' paths, and
what the operations after them do to those differences (the roundings after a reduction see
different operands and may round differently: one u of the result each). The bounds are
first-order in u, the unit roundoff of the dtype the evaluations run in (2^-24 for float32,
2^-53 for float64), as everywhere in this package.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

from . import ETA32, ETA64, F64, LIBM_ULPS, TABLE, U32, U64, Rule, gamma

TABLE.update(
    {
        r.name: r
        for r in (
            Rule(
                "reordered_sum",
                "an n-term sum of the same terms evaluated twice, in two summation orders "
                "(vectorised over a case axis and case by case)",
                "2 gamma_u(n) sum |t|, u the unit roundoff of the dtype: each order is within "
                "gamma_u(n) sum |t| of the exact sum of the terms (Higham eq. 3.4-3.5), so two "
                "orders are within twice that of each other",
            ),
            Rule(
                "reordered_softmax_with_loss",
                "SoftmaxWithLoss's value L = -sum_valid log(max(p_y, FLT_MIN)) / normalizer and "
                "its d/dz = (p - onehot) / normalizer (over R positions of K classes), evaluated "
                "twice with the reductions in other orders and exp and log on other code paths",
                "with rho = 2 gamma_u(K) + (4 LIBM_ULPS + 2) u: p moves by e_p = rho p + 4 eta "
                "(exp on two paths, 2 LIBM_ULPS u in the numerator and again in the "
                "denominator; TABLE['reordered_sum'] of the denominator's K positive terms, "
                "2 gamma_u(K); the division's rounding, 2 u; an exp that underflows, 2 eta, "
                "and its quotient, 2 eta); each position's loss "
                "l = -log(max(p_y, FLT_MIN)) by e_p_y / max(p_y, FLT_MIN) + 2 LIBM_ULPS u |l|; "
                "L by (sum_valid e_l + 2 gamma_u(R) sum_valid |l|) / normalizer + 2 u |L| (the "
                "R-term sum reordered, the division's rounding); d/dz by (e_p + 2 u |p - "
                "onehot|) / normalizer + 2 u |g| + eta (the subtraction's and the product's "
                "roundings; the factor top_diff / normalizer has equal operands on both "
                "paths), zero at ignored positions. u and eta: the dtype's unit roundoff and "
                "smallest denormal",
            ),
        )
    }
)


def roundoff(dtype: torch.dtype) -> tuple[float, float]:
    """(unit roundoff, smallest denormal) of float32 or float64."""
    if dtype == torch.float32:
        return U32, ETA32
    if dtype == torch.float64:
        return U64, ETA64
    raise ValueError(f"no roundoff for {dtype}: float32 or float64")


def reordered_sum(abs_sum: F64 | float, n: int, dtype: torch.dtype) -> F64:
    """Bound between two summation orders of n terms whose |terms| sum to `abs_sum`: see
    TABLE['reordered_sum']."""
    u, _ = roundoff(dtype)
    return np.asarray(2.0 * gamma(n, u) * np.asarray(abs_sum, dtype=np.float64))


def softmax_with_loss(
    z: F64,
    labels: NDArray[np.int64],
    valid: NDArray[np.bool_],
    normalizer: float,
    flt_min: float,
    dtype: torch.dtype,
) -> tuple[float, F64]:
    """Bounds between two evaluations in `dtype` of one case's SoftmaxWithLoss value and
    d/dz (z: (R, K) logits, class axis last; labels, valid: (R,)), each reduction possibly in
    another order: see TABLE['reordered_softmax_with_loss']. Returns (bound on the loss,
    bound on each element of d/dz)."""
    u, eta = roundoff(dtype)
    r, k = z.shape
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    s = e.sum(axis=-1, keepdims=True)
    p = e / s
    # the denominator's reordering, relative to s (its terms are positive: sum |t| = s)
    rho = reordered_sum(1.0, k, dtype) + (4 * LIBM_ULPS + 2) * u
    e_p = rho * p + 4 * eta
    idx = np.where(valid, labels, 0)
    rows = np.arange(r)
    py = np.maximum(p[rows, idx], flt_min)
    ell = -np.log(py)
    e_ell = e_p[rows, idx] / py + 2 * LIBM_ULPS * u * np.abs(ell)
    abs_ell = np.where(valid, np.abs(ell), 0.0).sum()
    loss = abs_ell / normalizer
    e_sum = np.where(valid, e_ell, 0.0).sum() + reordered_sum(abs_ell, r, dtype)
    e_loss = float(e_sum / normalizer + 2 * u * loss)
    d = p.copy()
    d[rows, idx] -= 1.0
    g = np.abs(d) / normalizer
    e_g: F64 = ((e_p + 2 * u * np.abs(d)) / normalizer + 2 * u * g + eta) * valid[:, None]
    return e_loss, e_g
