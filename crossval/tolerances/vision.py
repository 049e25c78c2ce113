"""Bounds of the vision layers (see crossval.tolerances.layers)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from crossval.reference import layers as ref
from crossval.reference.layers import LayerSpec
from crossval.reference.layers import vision as ref_vision
from crossval.reference.layers.vision import LRNParams, conv_geometry, lrn_params, pool_geometry

from . import ETA32, F64, LIBM_ULPS, TABLE, U32, Rule, gamma
from .layers import LAYER_BOUNDS, Arrays, LayerBound, diff_magnitudes, linear, magnitudes

RULES = (
    Rule(
        "layer_pooling",
        "Pooling: MAX (a selection) and AVE (a window sum divided by its padded size)",
        "MAX forward: 0, the top is a copy of one bottom (the same first maximum for the "
        "float64 and float32 sides, which read the same float32 bottoms); MAX backward: each "
        "bottom diff sums the top diffs of the m windows that selected it, gamma(m) sum |g| "
        "+ m ETA32 with m = ceil(kh/sh) ceil(kw/sw) the most windows covering one cell; "
        "AVE: a linear layer (TABLE['layer_linear']) with n = kh kw + 1 terms forward (the "
        "window sum and the division) and m + 1 backward (each g / size rounded, then m "
        "summed)",
    ),
    Rule(
        "layer_lrn",
        "LRN: s = k + a sum_window x^2, y = x s^-beta; g_x = g s^-beta - 2 a beta x "
        "sum_window(g y / s)",
        "scale error e_s: ACROSS_CHANNELS in Caffe's CPU running sum (add the entering "
        "square, subtract the leaving one, per image along the channels) rounds every "
        "intermediate, so e_s(c) <= u (size s_0 + sum_{j=1..c} (H_j + s_j) + 2 a sum_{i <= "
        "c+pre} x_i^2), H_j = s_{j-1} + a x_{j+pre}^2 the sum after the head is added: it "
        "grows with the largest squares met so far, not with the window's own; plus 2 u a W "
        "(the squares and alpha / size rounded) and gamma(size + 3) s, the bound of a direct "
        "window sum, so that a port computing it directly passes too. WITHIN_CHANNEL (an AVE "
        "pooling of the squares, then 1 + alpha avg): gamma(size^2 + 3) (s - 1) + u s. Then "
        "with r = e_s / s, s^p is within F(r, p) = max |(1 -+ r)^p - 1| relative, exact in "
        "r, and pow adds LIBM_ULPS ulps: e_y = |y| (F(r, -beta) + (LIBM_ULPS + 2) u (1 + F)). "
        "Backward: each q = g y / s within |q| (F(r, -beta - 1) + (LIBM_ULPS + 6) u (1 + F)), "
        "their window sum adds the same running-sum term (Caffe) or gamma(size) (direct), "
        "both included; g s^-beta within (F(r, -beta) + (LIBM_ULPS + 2) u (1 + F)); the "
        "product 2 a beta x Q adds 4 u and the difference u of each part; a product of the "
        "second term that underflows is off by ETA32 and later factors scale that up, so "
        "6 ETA32 max(1, |x|) sum_window max(1, |x|) max(1, k^(-beta-1)) max(1, 2 a beta) "
        "(gradients in the subnormal range, met at saturated outputs). r >= 1/2 means "
        "float32 cannot resolve s (k too small for the squares): an error, not a bound",
    ),
)
TABLE.update({r.name: r for r in RULES})


# -- InnerProduct --------------------------------------------------------------------------


def _ip_axis(spec: LayerSpec, x: F64) -> int:
    return int(spec.param("inner_product_param")["axis"]) % x.ndim


def _ip_forward_terms(spec: LayerSpec, bottoms: Arrays, blobs: Arrays) -> int:
    x = bottoms[0]
    k = int(np.prod(x.shape[_ip_axis(spec, x) :]))
    return k + (1 if spec.param("inner_product_param")["bias_term"] else 0)


def _ip_backward_terms(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, top_diffs: Arrays
) -> tuple[list[int], list[int]]:
    x = bottoms[0]
    m = int(np.prod(x.shape[: _ip_axis(spec, x)]))
    n = int(spec.param("inner_product_param")["num_output"])
    return [n], [m] * len(blobs)


LAYER_BOUNDS["InnerProduct"] = linear(_ip_forward_terms, _ip_backward_terms)


# -- Convolution and Deconvolution ---------------------------------------------------------


def _conv_terms_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays) -> int:
    g = conv_geometry(spec, bottoms[0].shape)
    channels = int(bottoms[0].shape[g.axis])
    return channels // g.group * math.prod(g.kernel) + (1 if g.bias_term else 0)


def _conv_terms_backward(
    deconv: bool,
) -> Callable[[LayerSpec, Arrays, Arrays, Arrays], tuple[list[int], list[int]]]:
    def terms(
        spec: LayerSpec, bottoms: Arrays, blobs: Arrays, top_diffs: Arrays
    ) -> tuple[list[int], list[int]]:
        x = bottoms[0]
        g = conv_geometry(spec, x.shape)
        num = math.prod(x.shape[: g.axis])
        kernel = math.prod(g.kernel)
        out_space = math.prod(top_diffs[0].shape[g.axis + 1 :])
        in_space = math.prod(x.shape[g.axis + 1 :])
        # A weight diff sums over every image, output position and bottom; Deconvolution's
        # gemm runs over the input positions.
        weight = len(bottoms) * num * (in_space if deconv else out_space)
        bias = len(bottoms) * num * out_space
        return [g.num_output // g.group * kernel] * len(bottoms), [weight, bias][: len(blobs)]

    return terms


LAYER_BOUNDS["Convolution"] = linear(_conv_terms_forward, _conv_terms_backward(False))
LAYER_BOUNDS["Deconvolution"] = linear(_conv_terms_forward, _conv_terms_backward(True))


# -- Pooling -------------------------------------------------------------------------------


def _pool_cover(spec: LayerSpec, x: F64) -> int:
    """The most windows that cover one bottom cell: ceil(kh / sh) ceil(kw / sw)."""
    g = pool_geometry(spec, x.shape)
    return math.prod(-(-k // s) for k, s in zip(g.kernel, g.stride, strict=True))


def _pool_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """MAX: 0 (a copy); AVE: see TABLE['layer_pooling'] and TABLE['layer_linear']."""
    g = pool_geometry(spec, bottoms[0].shape)
    if g.method == "MAX":
        return [np.zeros_like(t) for t in tops]
    n = math.prod(g.kernel) + 1
    return [gamma(n) * m + n * ETA32 for m in magnitudes(spec, bottoms, blobs)]


def _pool_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """See TABLE['layer_pooling']."""
    g = pool_geometry(spec, bottoms[0].shape)
    m = _pool_cover(spec, bottoms[0])
    if g.method == "MAX":
        # The windows' selections depend on the bottoms' signs: take them at the actual
        # bottoms, with |g|.
        _, (gx,), _ = ref.vjp(
            spec,
            [torch.from_numpy(np.asarray(b, dtype=np.float64)) for b in bottoms],
            [],
            [torch.from_numpy(np.abs(np.asarray(d, dtype=np.float64))) for d in top_diffs],
        )
        assert gx is not None
        return [gamma(m) * gx.numpy() + m * ETA32], []
    (mb,), _ = diff_magnitudes(spec, bottoms, blobs, top_diffs)
    assert mb is not None
    return [gamma(m + 1) * mb + (m + 1) * ETA32], []


LAYER_BOUNDS["Pooling"] = LayerBound(
    "layer_pooling", _pool_forward, "layer_pooling", _pool_backward
)


# -- LRN -----------------------------------------------------------------------------------


def _window(q: LRNParams, v: F64) -> F64:
    out: F64 = ref_vision.lrn_window_sum(q, torch.from_numpy(v)).numpy()
    return out


def _power_error(r: F64, p: float) -> F64:
    """F(r, p) = max |(1 -+ r)^p - 1|: the relative error of s^p when s is within r s."""
    lo = np.abs(np.expm1(p * np.log1p(-r)))
    hi = np.abs(np.expm1(p * np.log1p(r)))
    out: F64 = np.maximum(lo, hi)
    return out


def _lrn_scale(spec: LayerSpec, x: F64) -> tuple[LRNParams, F64, F64]:
    """The exact scale s and the bound e_s of its float32 computation (TABLE['layer_lrn'])."""
    q = lrn_params(spec, x.shape)
    sq = x * x
    w = _window(q, sq)
    s = q.k + q.a * w
    if np.any(s <= 0):
        raise ValueError(
            f"layer {spec.name!r} (LRN): scale k + a * sum x^2 <= 0 (k = {q.k}): x s^-beta "
            "is undefined"
        )
    if q.across:
        pre = (q.size - 1) // 2
        c = x.shape[1]
        head = np.zeros_like(s)
        entering = np.pad(sq, ((0, 0), (0, pre), (0, 0), (0, 0)))[:, pre : pre + c]
        head[:, 1:] = s[:, :-1] + q.a * entering[:, 1:]
        steps = head + s
        steps[:, 0] = q.size * s[:, 0]
        path = np.cumsum(steps, axis=1) + 2 * q.a * np.cumsum(entering, axis=1)
        path = path + 2 * q.a * sq[:, :pre].sum(axis=1, keepdims=True)
        n_ops = q.size + 2 * c
        e_s = U32 * (1 + gamma(n_ops)) * path + 2 * U32 * q.a * w + gamma(q.size + 3) * s
    else:
        e_s = gamma(q.size**2 + 3) * (s - q.k) + U32 * s
    e_s = e_s + 4 * ETA32
    r = e_s / s
    if np.any(r >= 0.5):
        raise ValueError(
            f"layer {spec.name!r} (LRN): the float32 scale's error bound reaches "
            f"{float(r.max()):.3g} of the scale (k = {q.k} too small for these inputs): "
            "float32 cannot resolve it"
        )
    return q, s, r


def _lrn_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """See TABLE['layer_lrn']."""
    x = np.asarray(bottoms[0], dtype=np.float64)
    q, s, r = _lrn_scale(spec, x)
    f = _power_error(r, -q.beta)
    y = np.abs(x) * s**-q.beta
    return [y * (f + (LIBM_ULPS + 2) * U32 * (1 + f)) + 2 * ETA32]


def _lrn_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """See TABLE['layer_lrn']."""
    x = np.asarray(bottoms[0], dtype=np.float64)
    g = np.abs(np.asarray(top_diffs[0], dtype=np.float64))
    q, s, r = _lrn_scale(spec, x)
    beta = abs(q.beta)
    f1 = _power_error(r, -q.beta)
    fq = _power_error(r, -q.beta - 1)
    ratio = g * np.abs(x) * s ** (-q.beta - 1)  # |q| = |g y / s|
    e_ratio = ratio * (fq + (LIBM_ULPS + 6) * U32 * (1 + fq)) + 2 * ETA32
    a_win = _window(q, ratio)
    e_acc = _window(q, e_ratio)
    if q.across:
        steps = 2 * a_win
        steps[:, 0] += (q.size - 1) * a_win[:, 0]
        e_acc = e_acc + U32 * (1 + gamma(q.size + 2 * x.shape[1])) * np.cumsum(steps, axis=1)
        e_acc = e_acc + gamma(q.size) * a_win
    else:
        e_acc = e_acc + gamma(q.size**2 + 1) * a_win
    term1 = g * s**-q.beta
    e_term1 = term1 * (f1 + (LIBM_ULPS + 2) * U32 * (1 + f1))
    coef = 2 * q.a * beta * np.abs(x)
    term2 = coef * a_win
    e_term2 = coef * e_acc + 4 * U32 * term2
    # Underflow: a product of the second term that falls below the normal range is off by
    # up to ETA32, and the factors applied after it (x at the window position, x at the
    # centre; 2 a beta and s^(-beta-1) are below 1 for k >= 1) scale that error up.
    big = np.maximum(1.0, np.abs(x))
    lift = max(1.0, q.k ** (-beta - 1)) * max(1.0, 2 * q.a * beta)
    e_under = 6 * ETA32 * big * _window(q, big) * lift
    return [e_term1 + e_term2 + U32 * (term1 + term2) + e_under + 8 * ETA32], []


LAYER_BOUNDS["LRN"] = LayerBound("layer_lrn", _lrn_forward, "layer_lrn", _lrn_backward)
