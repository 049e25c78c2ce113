"""The tolerance table: how far a float32 computation may be from exact math, and why.

Every comparison in crossval uses a bound from this module. A bound is not a borrowed
constant: it is the first-order float32 error bound of the computation it guards, computed
per element from the float64 reference's own intermediate values (so it is as tight where
values are small as where they are large), and propagated layer by layer.

Notation: u = 2**-24 is float32's unit roundoff; gamma(n) = n*u / (1 - n*u) bounds the
relative error of an n-term sum or dot product in any order (Higham, Accuracy and Stability
of Numerical Algorithms, 2nd ed., eq. 3.4-3.5), which covers BLAS and PyTorch summing in
different orders. Library tanh/exp/log are taken as accurate to LIBM_ULPS ulps.

A float32 implementation compared with the float64 reference must lie within ``bound``;
two float32 implementations (Caffe and a port) compared with each other must lie within
``2 * bound`` (each may be off by ``bound`` in opposite directions): see ``cross``.
Copies (weights in and out, fixed kernels, saved models) are compared bit for bit, never here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]

U32 = 2.0**-24
LIBM_ULPS = 4  # glibc / Eigen / SLEEF float32 exp, tanh, log: documented max error <= 4 ulp


def gamma(n: int | float) -> float:
    """Higham's gamma_n for float32: relative error bound of an n-term accumulation."""
    nu = float(n) * U32
    if nu >= 1:
        raise ValueError(f"gamma({n}) is undefined for float32 (n*u >= 1)")
    return nu / (1.0 - nu)


@dataclass(frozen=True)
class Rule:
    """One entry of the table: a name, the computation it guards, and its derivation."""

    name: str
    guards: str
    derivation: str


TABLE: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule(
            "inner_product",
            "y = W x + b over D inputs (InnerProduct, Linear)",
            "gamma(D+1) * (|W| |x| + |b|) + |W| e_x: the dot-product bound for any summation "
            "order plus the input error carried through W",
        ),
        Rule(
            "sigmoid",
            "y = 0.5 tanh(0.5 x) + 0.5 (Caffe) or 1/(1+exp(-x))",
            "(LIBM_ULPS + 2) u absolute (tanh/exp error, then one multiply-add on values <= 1) "
            "+ y (1 - y) e_x; absolute, because the tanh form cancels to 0 at x << 0",
        ),
        Rule("scale", "y = s x with a fixed s (Scale)", "u |y| + |s| e_x"),
        Rule(
            "softmax",
            "p = exp(z - max z) / sum exp(z - max z) over K bins",
            "p * ((|z - max z| + LIBM_ULPS + K + 2) u + 2 max e_z): rounding of the shifted "
            "argument (exp turns its absolute error into relative error), exp's own error, "
            "the K-term sum and the division, plus input error (|dp_i| <= 2 p_i max|dz|)",
        ),
        Rule(
            "dot_fixed",
            "y = sum_i k_i p_i with a fixed kernel k (Convolution on N x K)",
            "gamma(K) |k| |p| + |k| e_p",
        ),
        Rule(
            "euclidean_loss",
            "L = sum (a - b)^2 / N / 2",
            "gamma(M + 3) sum (a - b)^2 / 2N + sum |a - b| e_a / N over M = count elements",
        ),
    )
}


def inner_product(x: F64, w: F64, b: F64 | None, e_x: F64 | float = 0.0) -> F64:
    """Bound for y = x @ w.T + b with x (N, D), w (M, D): see TABLE['inner_product']."""
    d = x.shape[1]
    mag = np.abs(x) @ np.abs(w).T
    if b is not None:
        mag = mag + np.abs(b)
    carried = np.broadcast_to(np.asarray(e_x, dtype=np.float64), x.shape) @ np.abs(w).T
    out: F64 = gamma(d + 1) * mag + carried
    return out


def sigmoid(y: F64, e_x: F64 | float = 0.0) -> F64:
    """Bound for y = sigmoid(x): see TABLE['sigmoid']."""
    out: F64 = (LIBM_ULPS + 2) * U32 + y * (1.0 - y) * e_x
    return out


def scale(y: F64, s: float, e_x: F64 | float = 0.0) -> F64:
    """Bound for y = s x: see TABLE['scale']."""
    out: F64 = U32 * np.abs(y) + abs(s) * np.asarray(e_x, dtype=np.float64)
    return out


def softmax(z: F64, p: F64, e_z: F64 | float = 0.0, axis: int = 1) -> F64:
    """Bound for p = softmax(z) along `axis`: see TABLE['softmax']."""
    k = z.shape[axis]
    shifted = np.abs(z - z.max(axis=axis, keepdims=True))
    e = np.broadcast_to(np.asarray(e_z, dtype=np.float64), z.shape)
    carried = 2.0 * e.max(axis=axis, keepdims=True)
    out: F64 = p * ((shifted + LIBM_ULPS + k + 2) * U32 + carried)
    return out


def dot_fixed(p: F64, k: F64, e_p: F64 | float = 0.0) -> F64:
    """Bound for y = p @ k.T with fixed k (1, K): see TABLE['dot_fixed']."""
    kk = np.abs(k).reshape(1, -1)
    e = np.broadcast_to(np.asarray(e_p, dtype=np.float64), p.shape)
    out: F64 = gamma(kk.shape[1]) * (np.abs(p) @ kk.T) + e @ kk.T
    return out


def cross(bound: F64 | float) -> F64:
    """Bound between two float32 implementations, each within `bound` of exact math."""
    return np.asarray(2.0 * np.asarray(bound, dtype=np.float64))
