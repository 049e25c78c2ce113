"""The tolerance table: how far a float32 computation may be from exact math, and why.

Every comparison in crossval uses a bound from this module. A bound is not a borrowed
constant: it is the first-order float32 error bound of the computation it guards, computed
per element from the float64 reference's own intermediate values (so it is as tight where
values are small as where they are large), and propagated layer by layer.

Notation: u = 2**-24 is float32's unit roundoff; gamma(n) = n*u / (1 - n*u) bounds the
relative error of an n-term sum or dot product in any order (Higham, Accuracy and Stability
of Numerical Algorithms, 2nd ed., eq. 3.4-3.5), which covers BLAS and PyTorch summing in
different orders. Library tanh/exp/log are taken as accurate to LIBM_ULPS ulps.

Every bound also carries an absolute term of a few ETA32 (the smallest float32 denormal) per
operation: a result that underflows is off by up to that much whatever its relative error.

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
ETA32 = 2.0**-149  # smallest float32 denormal: the absolute error of a result that underflows
U64 = 2.0**-53  # float64's unit roundoff (steps Caffe runs in double; float64 evaluations)
ETA64 = 2.0**-1074  # smallest float64 denormal
LIBM_ULPS = 6  # float32 exp, tanh, log: glibc and SLEEF <= 2 ulp; onnxruntime's Tanh measured 5.46


def gamma(n: int | float, u: float = U32) -> float:
    """Higham's gamma_n for float32 (or for unit roundoff `u`): relative error bound of an
    n-term accumulation."""
    nu = float(n) * u
    if nu >= 1:
        kind = "float32" if u == U32 else f"unit roundoff {u:g}"
        raise ValueError(f"gamma({n}) is undefined for {kind} (n*u >= 1)")
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
            "y = 0.5 tanh(0.5 x) + 0.5 (Caffe, in double) or 1/(1+exp(-x)) (a port, in float)",
            "(LIBM_ULPS + 2) u absolute (exp/tanh error, then one multiply-add on values <= 1) "
            "+ y (1 - y) e_x; absolute, because a port's float32 tanh form cancels to 0 at "
            "x << 0 where Caffe's double evaluation keeps a tiny positive value",
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
            "gamma(M + 3) L + sum |d| (e_a + u |d|) / N over the M = count elements of "
            "d = a - b: the M-term dot product, the subtraction, the two divisions",
        ),
        Rule(
            "smooth_l1_loss",
            "L = sum f(a - b) / N, f the Fast R-CNN SmoothL1 with sigma",
            "gamma(M + 3) sum |f| / N + sum min(sigma^2 |d|, 1) (e_a + u |d|) / N: f is "
            "1-Lipschitz in the outer region and sigma^2 |d|-Lipschitz inside",
        ),
        Rule(
            "softmax_with_loss",
            "L = -sum_valid log(max(p_y, FLT_MIN)) / normalizer",
            "(sum_valid e_p_y / max(p_y, FLT_MIN) + (LIBM_ULPS + 1) u |l| + gamma(n) sum |l|) "
            "/ normalizer: log turns p's absolute error into an absolute error divided by p; "
            "the clamp bounds the divisor from below",
        ),
        Rule(
            "euclidean_loss_grad",
            "g = (a - b) / N",
            "(e_a + u |d|) / N + 2 u |g|: Caffe scales by alpha = 1 / N, itself rounded to "
            "float32 (1/60 is not exact), then rounds the product",
        ),
        Rule(
            "smooth_l1_loss_grad",
            "g = sigma^2 d or sign(d), over N",
            "sigma^2 (e_a + u |d|) / N + 2 u |g|: the gradient is continuous and "
            "sigma^2-Lipschitz, so a branch flip near the kink costs no more",
        ),
        Rule(
            "softmax_with_loss_grad",
            "g = (p - onehot(y)) / normalizer (Caffe ignores the clamp)",
            "(e_p + u |p - onehot|) / normalizer + 2 u |g|: Caffe scales by "
            "loss_weight / normalizer, rounded to float32, then rounds the product",
        ),
        Rule("scale_grad", "g_x = s g_y", "|s| e_gy + u |g_x|"),
        Rule(
            "sigmoid_grad",
            "g_x = g_y y (1 - y), y the forward output",
            "(|g_y| + e_gy) (|1 - 2y| e_y + e_y^2) + y (1 - y) e_gy + 3 u |g_x|: Caffe and "
            "PyTorch both differentiate through the stored output y, so its error enters (the "
            "e_gy e_y cross term too, for a saturated sigmoid under a cancelling gradient)",
        ),
        Rule("dot_fixed_grad", "g_p = g_y k", "|k| e_gy + u |g_p|"),
        Rule(
            "softmax_grad",
            "g_z = p (g_p - sum_j g_p,j p_j)",
            "|p| e_h + |h| e_p + u |g_z| with h = g_p - s, e_h = e_gp + e_s + u |h|, "
            "e_s = gamma(K) sum |g_p| |p| + sum (|g_p| e_p + |p| e_gp)",
        ),
        Rule(
            "inner_product_grad",
            "g_x = g_y W, g_W = g_y^T x, g_b = sum_n g_y",
            "gamma(M) |g_y| |W| + e_gy |W|; gamma(N) |g_y|^T |x| + e_gy^T |x|; "
            "gamma(N) sum |g_y| + sum e_gy",
        ),
        Rule(
            "solver_step",
            "one Caffe solver iteration: clip, decay, update, w -= update",
            "carried per element along the float64 trajectory: the gradient's bound (the "
            "gradient rules above at the reference params, plus 2 |H e_w|, the Hessian times "
            "the params' own error, for the feedback of earlier steps), then each solver's "
            "update rule differentiated: momentum and squared-gradient histories carry their "
            "own error (e_V = m e_V + lr e_d; e_H = r e_H + (1-r) 2|d| e_d; ...), divisions by "
            "sqrt(H) + delta scale it, and every operation adds a few u of its result; so the "
            "bound grows with the step count as errors accumulate",
        ),
        Rule(
            "regenerated_f64",
            "a float64 reference value computed again (golden vectors regenerated)",
            "2^-40 (|v| + max |v| over its array) + 2^-1022: float64 reassociation (another "
            "BLAS, or the same BLAS taking another SIMD path for another alignment, as seen "
            "on one element of fc101 that cancels to near zero) moves a value by under "
            "513 * 2^-53 < 2^-43 of its terms' magnitude; the terms of a blob's element are "
            "bounded by a few times the largest element of the blob (the heads' blobs are "
            "sums of at most 513 terms of the blob's own scale), so this holds unless an "
            "element's terms exceed 2^3 max |v|, and 2^-40 is still 2^16 below float32's u, "
            "so the float32 bounds these values feed cannot change",
        ),
    )
}


def inner_product(x: F64, w: F64, b: F64 | None, e_x: F64 | float = 0.0) -> F64:
    """Bound for y = x @ w.T + b with x (N, D), w (M, D): see TABLE['inner_product']. Leading
    axes, if any, index independent cases (x (..., N, D), w (..., M, D), b (..., M))."""
    d = x.shape[-1]
    aw = np.swapaxes(np.abs(w), -1, -2)
    mag = np.abs(x) @ aw
    if b is not None:
        mag = mag + np.expand_dims(np.abs(b), -2)
    if np.ndim(e_x) == 0 and float(e_x) == 0.0:
        # No input error: the carried term is exactly zero (no product of zeros to compute).
        out: F64 = gamma(d + 1) * mag + (d + 1) * ETA32
        return out
    carried = np.broadcast_to(np.asarray(e_x, dtype=np.float64), x.shape) @ aw
    out = gamma(d + 1) * mag + carried + (d + 1) * ETA32
    return out


def sigmoid(y: F64, e_x: F64 | float = 0.0) -> F64:
    """Bound for y = sigmoid(x): see TABLE['sigmoid']."""
    out: F64 = (LIBM_ULPS + 2) * U32 + y * (1.0 - y) * e_x
    return out


def scale(y: F64, s: float, e_x: F64 | float = 0.0) -> F64:
    """Bound for y = s x: see TABLE['scale']."""
    out: F64 = U32 * np.abs(y) + abs(s) * np.asarray(e_x, dtype=np.float64) + ETA32
    return out


def softmax(z: F64, p: F64, e_z: F64 | float = 0.0, axis: int = 1) -> F64:
    """Bound for p = softmax(z) along `axis`: see TABLE['softmax']."""
    k = z.shape[axis]
    shifted = np.abs(z - z.max(axis=axis, keepdims=True))
    e = np.broadcast_to(np.asarray(e_z, dtype=np.float64), z.shape)
    carried = 2.0 * e.max(axis=axis, keepdims=True)
    out: F64 = p * ((shifted + LIBM_ULPS + k + 2) * U32 + carried) + 4 * ETA32
    return out


def dot_fixed(p: F64, k: F64, e_p: F64 | float = 0.0) -> F64:
    """Bound for y = p @ k.T with fixed k (1, K): see TABLE['dot_fixed']."""
    kk = np.abs(k).reshape(1, -1)
    e = np.broadcast_to(np.asarray(e_p, dtype=np.float64), p.shape)
    out: F64 = gamma(kk.shape[1]) * (np.abs(p) @ kk.T) + e @ kk.T + kk.sum() * ETA32
    return out


# ---- losses ------------------------------------------------------------------------------


def _cases(v: F64 | float, shape: tuple[int, ...]) -> F64:
    """`v` (a bound broadcastable to `shape`) with a leading case axis of length 1."""
    return np.broadcast_to(np.asarray(v, dtype=np.float64), shape)[None]


def euclidean_loss_each(a: F64, b: F64, e_a: F64 | float) -> F64:
    """`euclidean_loss` of each case along axis 0 (a: (cases, N, ...)), as an array."""
    d = a - b.reshape(a.shape)
    cases, n = a.shape[0], a.shape[1]
    m = d.size // cases
    loss = (d * d).reshape(cases, -1).sum(-1) / n / 2
    carried = (np.abs(d) * (e_a + U32 * np.abs(d))).reshape(cases, -1).sum(-1) / n
    out: F64 = gamma(m + 3) * loss + carried + (m + 3) * ETA32
    return out


def euclidean_loss(a: F64, b: F64, e_a: F64 | float) -> float:
    """Bound for L = sum (a - b)^2 / 2N: see TABLE['euclidean_loss']."""
    return float(euclidean_loss_each(a[None], b.reshape(a.shape)[None], _cases(e_a, a.shape))[0])


def smooth_l1_loss_each(a: F64, b: F64, sigma: float, e_a: F64 | float) -> F64:
    """`smooth_l1_loss` of each case along axis 0 (a: (cases, N, ...)), as an array."""
    d = a - b.reshape(a.shape)
    cases, n, s2 = a.shape[0], a.shape[1], sigma * sigma
    m = d.size // cases
    ad = np.abs(d)
    per = np.where(ad < 1 / s2, 0.5 * s2 * d * d, ad - 0.5 / s2)
    slope = np.minimum(s2 * ad, 1.0)
    out: F64 = (
        gamma(m + 3) * np.abs(per).reshape(cases, -1).sum(-1) / n
        + (slope * (e_a + U32 * ad)).reshape(cases, -1).sum(-1) / n
        + (2 * m + 3) * ETA32
    )
    return out


def smooth_l1_loss(a: F64, b: F64, sigma: float, e_a: F64 | float) -> float:
    """Bound for the SmoothL1 loss: see TABLE['smooth_l1_loss']."""
    cased = _cases(e_a, a.shape)
    return float(smooth_l1_loss_each(a[None], b.reshape(a.shape)[None], sigma, cased)[0])


def softmax_with_loss_each(
    p: F64,
    e_p: F64,
    labels: NDArray[np.int64],
    valid: NDArray[np.bool_],
    normalizer: F64,
    flt_min: float,
) -> F64:
    """`softmax_with_loss` of each case along axis 0: p, e_p (cases, R, K), labels and valid
    (cases, R), normalizer (cases,)."""
    idx = np.where(valid, labels, 0)[..., None]
    py = np.maximum(np.take_along_axis(p, idx, -1)[..., 0], flt_min)
    ell = -np.log(py)
    per = np.take_along_axis(e_p, idx, -1)[..., 0] / py + (LIBM_ULPS + 1) * U32 * np.abs(ell)
    # Every case at once: gamma(n) of its n valid positions (0 where none, as gamma(0) is),
    # and its sums over them.
    n = valid.sum(axis=-1)
    if n.size and float(n.max()) * U32 >= 1:
        raise ValueError(f"gamma({int(n.max())}) is undefined for float32 (n*u >= 1)")
    g = n * U32 / (1.0 - n * U32)
    per_sum = np.where(valid, per, 0.0).sum(axis=-1)
    ell_sum = np.where(valid, np.abs(ell), 0.0).sum(axis=-1)
    out: F64 = (per_sum + g * ell_sum) / normalizer + ETA32
    return out


def softmax_with_loss(
    p: F64,
    e_p: F64,
    labels: NDArray[np.int64],
    valid: NDArray[np.bool_],
    normalizer: float,
    flt_min: float,
) -> float:
    """Bound for SoftmaxWithLoss over (N, K) probabilities: see TABLE['softmax_with_loss']."""
    each = softmax_with_loss_each(
        p[None], e_p[None], labels[None], valid[None], np.array([normalizer]), flt_min
    )
    return float(each[0])


def euclidean_loss_grad_each(a: F64, b: F64, e_a: F64 | float) -> F64:
    """`euclidean_loss_grad` of each case along axis 0 (a: (cases, N, ...))."""
    d = a - b.reshape(a.shape)
    n = a.shape[1]
    out: F64 = (e_a + U32 * np.abs(d)) / n + 2 * U32 * np.abs(d) / n + ETA32
    return out


def euclidean_loss_grad(a: F64, b: F64, e_a: F64 | float) -> F64:
    """Bound for g = (a - b) / N: see TABLE['euclidean_loss_grad']."""
    out: F64 = euclidean_loss_grad_each(a[None], b.reshape(a.shape)[None], _cases(e_a, a.shape))[0]
    return out


def smooth_l1_loss_grad_each(a: F64, b: F64, sigma: float, e_a: F64 | float) -> F64:
    """`smooth_l1_loss_grad` of each case along axis 0 (a: (cases, N, ...))."""
    d = a - b.reshape(a.shape)
    n, s2 = a.shape[1], sigma * sigma
    g = np.where(np.abs(d) < 1 / s2, s2 * d, np.sign(d)) / n
    out: F64 = s2 * (e_a + U32 * np.abs(d)) / n + 2 * U32 * np.abs(g) + 2 * ETA32
    return out


def smooth_l1_loss_grad(a: F64, b: F64, sigma: float, e_a: F64 | float) -> F64:
    """Bound for the SmoothL1 gradient: see TABLE['smooth_l1_loss_grad']."""
    out: F64 = smooth_l1_loss_grad_each(
        a[None], b.reshape(a.shape)[None], sigma, _cases(e_a, a.shape)
    )[0]
    return out


def softmax_with_loss_grad_each(
    p: F64, e_p: F64, labels: NDArray[np.int64], valid: NDArray[np.bool_], normalizer: F64
) -> F64:
    """`softmax_with_loss_grad` of each case along axis 0: p, e_p (cases, R, K), labels and
    valid (cases, R), normalizer (cases,)."""
    onehot = np.zeros_like(p)
    np.put_along_axis(onehot, np.where(valid, labels, 0)[..., None], 1.0, -1)
    norm = np.asarray(normalizer, dtype=np.float64).reshape(-1, 1, 1)
    g = np.abs(p - onehot) / norm
    out: F64 = ((e_p + U32 * np.abs(p - onehot)) / norm + 2 * U32 * g + ETA32) * valid[..., None]
    return out


def softmax_with_loss_grad(
    p: F64, e_p: F64, labels: NDArray[np.int64], valid: NDArray[np.bool_], normalizer: float
) -> F64:
    """Bound for g = (p - onehot) / normalizer: see TABLE['softmax_with_loss_grad']."""
    out: F64 = softmax_with_loss_grad_each(
        p[None], e_p[None], labels[None], valid[None], np.array([normalizer])
    )[0]
    return out


# ---- backward through the heads' layers ---------------------------------------------------


def scale_grad(g_y: F64, s: float, e_gy: F64) -> F64:
    """Bound for g_x = s g_y: see TABLE['scale_grad']."""
    out: F64 = abs(s) * e_gy + U32 * np.abs(s * g_y) + ETA32
    return out


def sigmoid_grad(g_y: F64, y: F64, e_gy: F64, e_y: F64) -> F64:
    """Bound for g_x = g_y y (1 - y): see TABLE['sigmoid_grad']."""
    # (g + dg)(y + dy)(1 - y - dy) - g y (1 - y)
    #   = (g + dg)(dy (1 - 2y) - dy^2) + dg y (1 - y): the cross term dg dy (1 - 2y - dy)
    # is second order, but where the sigmoid saturates (y (1 - y) below e_y) and g_y
    # cancels (|g_y| below e_gy) it is not covered by the first-order terms
    dy = np.abs(1 - 2 * y) * e_y + e_y * e_y
    out: F64 = (
        (np.abs(g_y) + e_gy) * dy + y * (1 - y) * e_gy + 3 * U32 * np.abs(g_y * y * (1 - y)) + ETA32
    )
    return out


def dot_fixed_grad(g_y: F64, k: F64, e_gy: F64) -> F64:
    """Bound for g_p = g_y k with k (1, K): see TABLE['dot_fixed_grad']."""
    kk = np.abs(k).reshape(1, -1)
    out: F64 = e_gy * kk + U32 * np.abs(g_y) * kk + ETA32
    return out


def softmax_grad(g_p: F64, p: F64, e_gp: F64, e_p: F64) -> F64:
    """Bound for g_z = p (g_p - sum g_p p): see TABLE['softmax_grad']."""
    k = p.shape[-1]
    s = (g_p * p).sum(axis=-1, keepdims=True)
    e_s = gamma(k) * (np.abs(g_p) * p).sum(axis=-1, keepdims=True) + (
        np.abs(g_p) * e_p + p * e_gp
    ).sum(axis=-1, keepdims=True)
    h = g_p - s
    e_h = e_gp + e_s + U32 * np.abs(h)
    out: F64 = p * e_h + np.abs(h) * e_p + U32 * np.abs(p * h) + 2 * ETA32
    return out


def inner_product_grads(x: F64, w: F64, g_y: F64, e_gy: F64) -> tuple[F64, F64, F64]:
    """Bounds for (g_x, g_W, g_b) of y = x W^T + b: see TABLE['inner_product_grad']. Leading
    axes, if any, index independent cases."""
    n, m = g_y.shape[-2:]
    ag, aw, ax = np.abs(g_y), np.abs(w), np.abs(x)
    # gamma |g_y| |W| + e_gy |W| as one product, (gamma |g_y| + e_gy) |W| (and likewise for
    # g_W): the same bound, two matrix products instead of four.
    e_x: F64 = (gamma(m) * ag + e_gy) @ aw + m * ETA32
    e_w: F64 = np.swapaxes(gamma(n) * ag + e_gy, -1, -2) @ ax + n * ETA32
    e_b: F64 = gamma(n) * ag.sum(axis=-2) + e_gy.sum(axis=-2) + n * ETA32
    return e_x, e_w, e_b


# ---- solvers ------------------------------------------------------------------------------


def _sqrt_error(h: F64, e_h: F64) -> F64:
    """Error of sqrt(h) given h's error: e/(2 sqrt h), but never more than sqrt(e)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lin = np.where(h > 0, e_h / (2 * np.sqrt(np.maximum(h, 0))), np.inf)
    out: F64 = np.minimum(lin, np.sqrt(e_h))
    return out


def solver_update(
    kind: str,
    lr: float,
    d: F64,
    e_d: F64,
    h: F64,
    h2: F64,
    e_h: F64,
    e_h2: F64,
    momentum: float,
    momentum2: float,
    rms_decay: float,
    delta: float,
    t: int,
) -> tuple[F64, F64, F64]:
    """Bound on one param's update for solver `kind`, from the reference's regularized
    gradient `d` and histories `h`, `h2` (before this step) and their bounds: returns
    (e_update, e_h after, e_h2 after). See TABLE['solver_step']."""
    ad = np.abs(d)
    if kind == "SGD":
        v = momentum * h + lr * d
        e_v = momentum * e_h + lr * e_d + 2 * U32 * np.abs(v) + ETA32
        return e_v, e_v, e_h2
    if kind == "Nesterov":
        v = momentum * h + lr * d
        e_v = momentum * e_h + lr * e_d + 2 * U32 * np.abs(v) + ETA32
        upd = (1 + momentum) * v - momentum * h
        return (1 + momentum) * e_v + momentum * e_h + 3 * U32 * np.abs(upd) + ETA32, e_v, e_h2
    if kind in ("AdaGrad", "RMSProp"):
        if kind == "AdaGrad":
            hn = h + d * d
            e_hn = e_h + 2 * ad * e_d + e_d * e_d + 2 * U32 * hn + ETA32
        else:
            hn = rms_decay * h + (1 - rms_decay) * d * d
            e_hn = (
                rms_decay * e_h
                + (1 - rms_decay) * (2 * ad * e_d + e_d * e_d)
                + 3 * U32 * hn
                + ETA32
            )
        den = np.sqrt(hn) + delta
        e_den = _sqrt_error(hn, e_hn) + U32 * den
        upd = lr * d / den
        e_upd = lr * (e_d + ad * e_den / den) / den + 3 * U32 * np.abs(upd) + ETA32
        return np.where(np.isfinite(e_upd), e_upd, np.inf), e_hn, e_h2
    if kind == "AdaDelta":
        hn = momentum * h + (1 - momentum) * d * d
        e_hn = momentum * e_h + (1 - momentum) * (2 * ad * e_d + e_d * e_d) + 3 * U32 * hn
        r = np.sqrt((h2 + delta) / (hn + delta))
        e_r = 0.5 * r * (e_h2 / (h2 + delta) + e_hn / (hn + delta)) + 3 * U32 * r
        step = d * r
        e_step = e_d * r + ad * e_r + U32 * np.abs(step) + ETA32
        e_h2n = (
            momentum * e_h2
            + (1 - momentum) * (2 * np.abs(step) * e_step + e_step**2)
            + 3 * U32 * (momentum * h2 + (1 - momentum) * step * step)
        )
        return lr * e_step + 2 * U32 * lr * np.abs(step) + ETA32, e_hn, e_h2n
    if kind == "Adam":
        m = momentum * h + (1 - momentum) * d
        e_m = momentum * e_h + (1 - momentum) * e_d + 2 * U32 * np.abs(m) + ETA32
        v = momentum2 * h2 + (1 - momentum2) * d * d
        e_v = momentum2 * e_h2 + (1 - momentum2) * (2 * ad * e_d + e_d * e_d) + 3 * U32 * v + ETA32
        corr = np.sqrt(1 - momentum2**t) / (1 - momentum**t)
        den = np.sqrt(v) + delta
        e_den = _sqrt_error(v, e_v) + U32 * den
        upd = lr * corr * m / den
        e_upd = lr * corr * (e_m + np.abs(m) * e_den / den) / den + 6 * U32 * np.abs(upd)
        return np.where(np.isfinite(e_upd), e_upd, np.inf) + ETA32, e_m, e_v
    raise ValueError(f"unknown solver type {kind!r}")


def regenerated_f64(stored: F64) -> F64:
    """Bound between a stored float64 reference value and the same value computed again: see
    TABLE['regenerated_f64']."""
    v = np.abs(np.asarray(stored, dtype=np.float64))
    out: F64 = 2.0**-40 * (v + v.max(initial=0.0)) + 2.0**-1022
    return out


def cross(bound: F64 | float) -> F64:
    """Bound between two float32 implementations, each within `bound` of exact math."""
    return np.asarray(2.0 * np.asarray(bound, dtype=np.float64))


# Per-layer bounds (their rules join TABLE on import).
from crossval.tolerances import layers as layers  # noqa: E402

# Bounds between evaluations that order their reductions differently (rules join TABLE).
from crossval.tolerances import reordered as reordered  # noqa: E402
