"""Bounds of the structural layers (see crossval.tolerances.layers)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crossval.reference.layers import LayerSpec
from crossval.reference.layers.vision import canonical_axis

from . import ETA32, F64, TABLE, U32, Rule, gamma, softmax, softmax_grad
from .layers import COPY, LAYER_BOUNDS, Arrays, LayerBound, copy_backward, copy_forward

RULES = (
    Rule(
        "layer_split_grad",
        "g_x = sum_i g_i over the k tops of Split",
        "gamma(k - 1) sum |g_i|: k - 1 additions in any order (Caffe adds top 0 and 1, then "
        "the rest in order; a port's autograd in its own order); one top is an exact copy",
    ),
    Rule(
        "layer_eltwise_sum",
        "y = sum_i c_i x_i over n bottoms (Eltwise SUM); g_i = c_i g_y",
        "forward gamma(n) sum |c_i x_i| + n ETA32: an n-term dot product in any order, with or "
        "without fused multiply-add (Caffe's axpy); backward u |c_i g_y| + ETA32, one product "
        "(an exact copy when c_i = 1)",
    ),
    Rule(
        "layer_eltwise_prod",
        "y = x_0 x_1 ... x_{n-1} (Eltwise PROD); g_i = g_y prod_{j != i} x_j (stable_prod_grad) "
        "or g_y (y / x_i)",
        "a running product p_k = p_{k-1} f_k with computed error e_k <= (1 + u) e_{k-1} |f_k| "
        "+ u |p_k| + ETA32 (fl(ab) = ab (1 + d) + h, |d| <= u, |h| <= ETA32 / 2, so underflow "
        "is carried by the later factors); the stable diff is the running product of the other "
        "bottoms and g_y; the division form is (e_y + u (|y| + e_y)) / |x_i| + ETA32 for y / x_i "
        "with e_y the forward bound, then one product with g_y; where x_i = 0 both sides must "
        "give Caffe's NaN (bound 0)",
    ),
    Rule(
        "layer_eltwise",
        "Eltwise: SUM, PROD or MAX",
        "SUM: TABLE['layer_eltwise_sum']; PROD: TABLE['layer_eltwise_prod']; MAX: "
        "TABLE['layer_copy'] (Caffe sends the diff to one bottom: its mask, ties included)",
    ),
    Rule(
        "layer_softmax",
        "p = softmax(x) along any axis; g_x = p (g_p - sum g_p p)",
        "TABLE['softmax'] and TABLE['softmax_grad'] along the layer's axis with no input error "
        "(e_z = e_gp = 0), the backward carrying the forward bound as e_p: Caffe's backward "
        "uses its own float32 top",
    ),
)
TABLE.update({r.name: r for r in RULES})


for _name in ("Concat", "Slice", "Flatten", "Reshape", "Crop"):  # TABLE['layer_copy']
    LAYER_BOUNDS[_name] = COPY


def _split_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """See TABLE['layer_split_grad']."""
    k = len(top_diffs)
    mag = np.sum([np.abs(g) for g in top_diffs], axis=0)
    return [gamma(max(k - 1, 0)) * mag], []


LAYER_BOUNDS["Split"] = LayerBound("layer_copy", copy_forward, "layer_split_grad", _split_backward)


# ---- Eltwise ------------------------------------------------------------------------------


def running_product_error(factors: Sequence[F64]) -> tuple[F64, F64]:
    """(|prod|, bound on the computed product's error) of factors multiplied left to right:
    see TABLE['layer_eltwise_prod']."""
    p = np.abs(factors[0])
    e = np.zeros_like(p)
    for f in factors[1:]:
        af = np.abs(f)
        p = p * af
        e = (1 + U32) * e * af + U32 * p + ETA32
    return p, e


def _coeffs(spec: LayerSpec, n: int) -> list[float]:
    c = [float(v) for v in spec.param("eltwise_param")["coeff"]]
    return c or [1.0] * n


def _eltwise_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """SUM: TABLE['layer_eltwise_sum']; PROD: TABLE['layer_eltwise_prod']; MAX:
    TABLE['layer_copy']."""
    op, n = spec.param("eltwise_param")["operation"], len(bottoms)
    if op == "SUM":
        mag = np.sum(
            [abs(c) * np.abs(x) for c, x in zip(_coeffs(spec, n), bottoms, strict=True)], axis=0
        )
        return [gamma(n) * mag + n * ETA32]
    if op == "PROD":
        return [running_product_error(bottoms)[1]]
    return copy_forward(spec, bottoms, blobs, tops)


def _eltwise_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """SUM: TABLE['layer_eltwise_sum']; PROD: TABLE['layer_eltwise_prod']; MAX:
    TABLE['layer_copy']."""
    p = spec.param("eltwise_param")
    op, n, g = p["operation"], len(bottoms), top_diffs[0]
    if op == "SUM":
        return [U32 * abs(c) * np.abs(g) + ETA32 for c in _coeffs(spec, n)], []
    if op == "MAX":
        return copy_backward(spec, bottoms, blobs, tops, top_diffs)
    out: list[F64 | None] = []
    if p["stable_prod_grad"]:
        for i in range(n):
            others = [x for j, x in enumerate(bottoms) if j != i]
            out.append(running_product_error([*others, g])[1])
        return out, []
    y, e_y = running_product_error(bottoms)
    for x in bottoms:
        ax = np.abs(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            e_d = (e_y + U32 * (y + e_y)) / ax + ETA32
            d = y / ax
            e = (1 + U32) * e_d * np.abs(g) + U32 * d * np.abs(g) + ETA32
        out.append(np.where(ax == 0, 0.0, e))
    return out, []


LAYER_BOUNDS["Eltwise"] = LayerBound(
    "layer_eltwise", _eltwise_forward, "layer_eltwise", _eltwise_backward
)


# ---- Softmax ------------------------------------------------------------------------------


def _three_d(spec: LayerSpec, a: F64) -> F64:
    """`a` as (outer, K, inner) around the softmax axis."""
    shape = np.shape(a)
    axis = canonical_axis(int(spec.param("softmax_param")["axis"]), len(shape), spec)
    outer, k = int(np.prod(shape[:axis])), shape[axis]
    return np.reshape(a, (outer, k, -1))


def _softmax_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """See TABLE['layer_softmax'] (TABLE['softmax'] along the axis)."""
    z, p = _three_d(spec, bottoms[0]), _three_d(spec, tops[0])
    return [softmax(z, p, 0.0, axis=1).reshape(np.shape(tops[0]))]


def _softmax_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """See TABLE['layer_softmax'] (TABLE['softmax_grad'] along the axis)."""
    z, p, g = (_three_d(spec, a) for a in (bottoms[0], tops[0], top_diffs[0]))
    e_p = softmax(z, p, 0.0, axis=1)
    # softmax_grad sums over the last axis: put the softmax axis there, and back.
    last = [np.moveaxis(a, 1, -1) for a in (g, p, e_p)]
    e = np.moveaxis(softmax_grad(last[0], last[1], np.zeros_like(last[0]), last[2]), -1, 1)
    return [e.reshape(np.shape(tops[0]))], []


LAYER_BOUNDS["Softmax"] = LayerBound(
    "layer_softmax", _softmax_forward, "layer_softmax", _softmax_backward
)
