"""Bounds of the normalization and affine layers (see crossval.tolerances.layers)."""

from __future__ import annotations

import numpy as np

from crossval.reference.layers import LayerSpec
from crossval.reference.layers.neuron import f32
from crossval.reference.layers.normalization import use_global_stats

from . import ETA32, F64, LIBM_ULPS, TABLE, U32, Rule, gamma
from .layers import LAYER_BOUNDS, Arrays, LayerBound, linear

u, L, E = U32, LIBM_ULPS, ETA32

RULES = (
    Rule(
        "layer_batch_norm",
        "y = (x - mean) / sigma, sigma = sqrt(var + eps); global: mean = m_sum * f, var = "
        "v_sum * f with f = 1 / factor (0 for a factor 0), each rounded; batch: mean and the "
        "biased var as M-term sums of x / M and (x - mean)^2 / M, M = N * spatial",
        "e_mean = gamma(2) |mean| (global) or gamma(M + 2) sum |x| / M (the two-stage "
        "M-term sum and the rounded 1 / M); e_d = e_mean + u (|d| + e_mean) for Caffe's d = x "
        "- mean, plus u (|x| + |mean| + |d|) for a port that applies the statistics fused as "
        "x a + b with a = 1 / sigma and b = -mean a (PyTorch's batch_norm, ONNX runtimes), "
        "which rounds x a, mean a and a itself (u |d| a = u |y|); "
        "e_var = gamma(2) |var| (global) or P + gamma(M + 3) (var + P), P = sum (2 |d| e_d + "
        "e_d^2) / M; e_v = e_var + u (var + eps + e_var); e_sigma = e_v / (sigma + sqrt(max("
        "sigma^2 - e_v, 0))) + LIBM_ULPS u sigma (the exact change of a square root, then its "
        "own error: Caffe's sqrt is correctly rounded, PyTorch's vectorized float32 sqrt is "
        "not, 1.49 u measured, so it counts as a library function); e_y = (e_d + |y| "
        "e_sigma) / (sigma - e_sigma) + u (|y| + that) (the change of a quotient, then its "
        "rounding)",
    ),
    Rule(
        "layer_batch_norm_grad",
        "global: g_x = g / sigma; batch (Caffe): g_x = (g - (a y + b) / M) / sigma, "
        "a = sum g y, b = sum g over the channel; the statistics blobs get no diff",
        "global: |g| e_sigma / (sigma (sigma - e_sigma)) + u |g_x|; batch: e_a = gamma(M) "
        "sum |g| (|y| + e_y) + sum |g| e_y, e_b = gamma(M) sum |g|, e_t = |a| e_y + |y| e_a + "
        "e_a e_y + e_b + gamma(2) (|a y| + |t|) + gamma(M) sum |g y| sum |y| / M (the last "
        "term for a port that differentiates the forward, which also sums the broadcast "
        "term over the channel), e_h = (e_t + 2 u |t|) / M + u |h| for h = g - t / M, then "
        "the quotient by sigma as in the forward; the blob diffs are exactly 0",
    ),
)
TABLE.update({r.name: r for r in RULES})


def _channels(x: F64) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(broadcast shape of a per-channel value, the axes summed over, M)."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2), (0, *range(2, x.ndim)), x.size // x.shape[1]


def _sqrt_change(sigma: F64, e_v: F64) -> F64:
    # PyTorch's vectorized float32 sqrt is not correctly rounded (measured 1.49 u on AVX512):
    # a library function, LIBM_ULPS ulps, like exp and log.
    out: F64 = e_v / (sigma + np.sqrt(np.maximum(sigma * sigma - e_v, 0.0))) + L * u * sigma
    return out


def _quotient(num: F64, e_num: F64, sigma: F64, e_sigma: F64) -> F64:
    """Bound of fl(num' / sigma') for |num' - num| <= e_num, |sigma' - sigma| <= e_sigma."""
    q = np.abs(num) / sigma
    with np.errstate(divide="ignore"):
        moved = np.where(
            sigma > e_sigma, (e_num + q * e_sigma) / np.maximum(sigma - e_sigma, 0.0), np.inf
        )
    out: F64 = moved + u * (q + moved) + E
    return out


def _fused(x: F64, mean: F64, d: F64) -> F64:
    """The extra rounding of the fused form x / sigma - mean / sigma, in units of d."""
    out: F64 = u * (np.abs(x) + np.abs(mean) + np.abs(d))
    return out


def _times(a: F64, b: F64) -> F64:
    """a b, 0 where either is 0 (an exactly zero coefficient cancels an unbounded error)."""
    with np.errstate(invalid="ignore"):
        out: F64 = np.where((a == 0) | (b == 0), 0.0, a * b)
    return out


def _bn_parts(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays
) -> tuple[F64, F64, F64, F64, F64, F64, int]:
    """(d, e_d, sigma, e_sigma, y, e_y, M) per element / per channel (broadcastable)."""
    x = bottoms[0]
    eps = f32(spec.param("batch_norm_param")["eps"])
    shape, axes, m = _channels(x)
    if use_global_stats(spec):
        f = float(blobs[2].reshape(-1)[0])
        inv = 0.0 if f == 0 else 1.0 / f
        mean = (blobs[0] * inv).reshape(shape)
        var = (blobs[1] * inv).reshape(shape)
        e_mean = gamma(2) * np.abs(mean)
        d = x - mean
        e_d = e_mean + u * (np.abs(d) + e_mean) + _fused(x, mean, d)
        e_var = gamma(2) * np.abs(var)
    else:
        mean = x.mean(axis=axes, keepdims=True)
        # One term times 1 / 1 is exact; otherwise the M-term sum and the rounded 1 / M.
        e_mean = (0.0 if m == 1 else gamma(m + 2)) * np.abs(x).mean(axis=axes, keepdims=True)
        d = x - mean
        e_d = e_mean + u * (np.abs(d) + e_mean) + _fused(x, mean, d)
        var = (d * d).mean(axis=axes, keepdims=True)
        p = (2 * np.abs(d) * e_d + e_d * e_d).mean(axis=axes, keepdims=True)
        e_var = p + gamma(m + 3) * (var + p)
    v = var + eps
    e_v = e_var + u * (np.abs(v) + e_var)
    sigma = np.sqrt(v)
    e_sigma = _sqrt_change(sigma, e_v)
    y = d / sigma
    e_y = _quotient(d, e_d, sigma, e_sigma)
    return d, e_d, sigma, e_sigma, y, e_y, m


def _bn_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """See TABLE['layer_batch_norm']."""
    return [_bn_parts(spec, bottoms, blobs)[5]]


def _bn_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """See TABLE['layer_batch_norm_grad']."""
    g = top_diffs[0]
    _, _, sigma, e_sigma, y, e_y, m = _bn_parts(spec, bottoms, blobs)
    zeros: list[F64 | None] = [np.zeros(np.shape(b)) for b in blobs]
    if use_global_stats(spec):
        return [_quotient(g, np.zeros_like(g), sigma, e_sigma)], zeros
    axes = _channels(g)[1]
    ag = np.abs(g)

    def total(a: F64) -> F64:
        out: F64 = a.sum(axis=axes, keepdims=True)
        return out

    a, b = total(g * y), total(g)
    e_a = gamma(m) * total(ag * (np.abs(y) + e_y)) + total(ag * e_y)
    e_b = gamma(m) * total(ag)
    t = a * y + b
    e_t = (
        _times(np.abs(a), e_y)
        + _times(np.abs(y), e_a)
        + _times(e_a, e_y)
        + e_b
        + gamma(2) * (np.abs(a * y) + np.abs(t))
        + gamma(m) * total(np.abs(g * y)) * total(np.abs(y)) / m
    )
    h = g - t / m
    e_h = (e_t + 2 * u * np.abs(t)) / m + u * np.abs(h)
    return [_quotient(h, e_h, sigma, e_sigma)], zeros


LAYER_BOUNDS["BatchNorm"] = LayerBound(
    "layer_batch_norm", _bn_forward, "layer_batch_norm_grad", _bn_backward
)


def _extent(x: F64, v: F64) -> int:
    """outer * inner: how many elements of x share one element of v."""
    return x.size // max(v.size, 1)


def _scale_blob(bottoms: Arrays, blobs: Arrays) -> F64:
    return bottoms[1] if len(bottoms) > 1 else blobs[0]


def _scale_forward_terms(spec: LayerSpec, bottoms: Arrays, blobs: Arrays) -> int:
    return 2 if spec.param("scale_param")["bias_term"] else 1


def _scale_backward_terms(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, top_diffs: Arrays
) -> tuple[list[int], list[int]]:
    n = _extent(bottoms[0], _scale_blob(bottoms, blobs))
    return [1] + [n] * (len(bottoms) - 1), [n] * len(blobs)


def _bias_forward_terms(spec: LayerSpec, bottoms: Arrays, blobs: Arrays) -> int:
    return 2


def _bias_backward_terms(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, top_diffs: Arrays
) -> tuple[list[int], list[int]]:
    b = bottoms[1] if len(bottoms) > 1 else blobs[0]
    n = _extent(bottoms[0], b)
    return [1] + [n] * (len(bottoms) - 1), [n] * len(blobs)


LAYER_BOUNDS["Scale"] = linear(_scale_forward_terms, _scale_backward_terms)
LAYER_BOUNDS["Bias"] = linear(_bias_forward_terms, _bias_backward_terms)
