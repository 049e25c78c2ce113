"""Bounds of the loss layers (see crossval.tolerances.layers).

EuclideanLoss and SoftmaxWithLoss use the heads' loss rules of the table, with no input
error; every loss backward is scaled by the top's diff, which Caffe folds into the one scale
factor those rules already round (see TABLE['layer_loss_grad']).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from crossval.reference.functional import softmax as ref_softmax
from crossval.reference.layers import LayerSpec, UnsupportedLayer
from crossval.reference.layers.loss import normalization_of
from crossval.reference.layers.vision import canonical_axis
from crossval.reference.losses import FLT_MIN

from . import (
    ETA32,
    F64,
    LIBM_ULPS,
    TABLE,
    U32,
    Rule,
    euclidean_loss,
    euclidean_loss_grad,
    gamma,
    softmax,
    softmax_with_loss,
    softmax_with_loss_grad,
)
from .layers import LAYER_BOUNDS, Arrays, LayerBound

RULES = (
    Rule(
        "layer_loss_grad",
        "a loss layer's bottom diff for a top diff g (the loss weight)",
        "|g| times the loss's gradient rule at g = 1 (TABLE['euclidean_loss_grad'], "
        "TABLE['softmax_with_loss_grad']): Caffe computes alpha = g / N (or g / normalizer) "
        "once and rounds it, as those rules round 1 / N, then one product per element",
    ),
    Rule(
        "layer_softmax_with_loss",
        "SoftmaxWithLoss along any axis, any normalization, ignore_label",
        "TABLE['softmax_with_loss'] over the (outer * inner, K) probabilities, with e_p "
        "TABLE['softmax'] at no input error; backward TABLE['layer_loss_grad']",
    ),
    Rule(
        "layer_sigmoid_cross_entropy",
        "L = -sum_valid (x (t - [x >= 0]) - log(1 + exp(-|x|))) / normalizer over n valid",
        "(gamma(2n + 1) sum_valid (|x (t - s)| + log(1 + exp(-|x|))) + sum_valid (gamma(2) "
        "|x (t - s)| + (2 LIBM_ULPS + 1) u)) / normalizer + (2n + 1) ETA32: x - 2 x s = -|x| "
        "is exact; t - s and the product round twice; exp is off by LIBM_ULPS u relative, "
        "1 + e rounds (relative u + LIBM_ULPS u e / (1 + e)), which log turns into an absolute "
        "error, and log adds LIBM_ULPS u of log(1 + e) <= log 2; the 2n pieces are summed and "
        "divided once (in float or double, which this covers)",
    ),
    Rule(
        "layer_sigmoid_cross_entropy_grad",
        "g_x = (sigmoid(x) - t) g / normalizer, 0 where ignored",
        "(|g| / normalizer) ((LIBM_ULPS + 2) u + 3 u |sigmoid(x) - t|) (1 + u) + ETA32: "
        "TABLE['sigmoid'] for the sigmoid (Caffe's, computed in double, is closer), then the "
        "subtraction, g / normalizer and the product each round once",
    ),
    Rule(
        "layer_python",
        "a Python layer: the bound registered for its python_param module and layer",
        "layer_smooth_l1 for crossval's SmoothL1Loss; for a user's layer, the forward and "
        "backward bounds its plugin registers with its float64 reference",
    ),
    Rule(
        "layer_smooth_l1",
        "L = sum f(a - b) / N, f the Fast R-CNN SmoothL1 with sigma (crossval's Python layer)",
        "(gamma(M + 3) sum |f| + sum min(s2 |d|, 1) u |d| + sum_{|d| >= (1 - 4u) / s2} u / s2) "
        "/ N + 2 M ETA32, s2 = sigma^2: the M-term sum and the division; each term's own "
        "roundings (s2 to float32, two products: 3 u |f|); d = a - b rounded, through f's "
        "Lipschitz constant; in the outer region 0.5 / s2 is off by 2u of itself; near the kink "
        "the float32 threshold 1 / s2 may pick the other formula, which differs there by "
        "0.5 s2 dd^2 with dd <= 2u / s2, far below u / s2",
    ),
    Rule(
        "layer_smooth_l1_grad",
        "g_a = -g_b = h g / N, h = s2 d inside |d| < 1 / s2, sign(d) outside",
        "(|g| / N) (s2 u |d| + 4 u |h| + 2 u [near the kink]) + ETA32: d's rounding through "
        "h's Lipschitz constant s2; s2 to float32, s2 d, g / N and the product each round once; "
        "a branch flip within 2u of the kink changes h by at most 2u",
    ),
)
TABLE.update({r.name: r for r in RULES})


def _scalar(v: float) -> F64:
    return np.asarray(v, dtype=np.float64)


# ---- EuclideanLoss ------------------------------------------------------------------------


def _euclidean_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """TABLE['euclidean_loss'] with no input error."""
    a, b = bottoms
    return [_scalar(euclidean_loss(np.reshape(a, (a.shape[0], -1)), b, 0.0))]


def _euclidean_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """TABLE['layer_loss_grad'] of TABLE['euclidean_loss_grad']."""
    a, b = bottoms
    g = abs(float(top_diffs[0]))
    e = euclidean_loss_grad(np.asarray(a), b, 0.0) * g + ETA32
    return [e, np.reshape(e, np.shape(b))], []


LAYER_BOUNDS["EuclideanLoss"] = LayerBound(
    "euclidean_loss", _euclidean_forward, "layer_loss_grad", _euclidean_backward
)


# ---- SoftmaxWithLoss ----------------------------------------------------------------------


def _softmax_parts(
    spec: LayerSpec, bottoms: Arrays
) -> tuple[F64, F64, np.ndarray, np.ndarray, float, int]:
    """(p, e_p) as (outer * inner, K) rows, labels, valid, normalizer, axis."""
    z, labels = bottoms
    axis = canonical_axis(int(spec.param("softmax_param")["axis"]), z.ndim, spec)
    p = ref_softmax(torch.from_numpy(np.asarray(z, dtype=np.float64)), axis).numpy()
    e_p = softmax(np.asarray(z), p, 0.0, axis=axis)
    k = z.shape[axis]
    rows = [np.moveaxis(a, axis, -1).reshape(-1, k) for a in (p, e_p)]
    lab = np.trunc(np.asarray(labels, dtype=np.float64)).reshape(-1).astype(np.int64)
    p_ = spec.param("loss_param")
    valid = (
        lab != int(p_["ignore_label"])
        if spec.has("loss_param", "ignore_label")
        else np.ones(lab.shape, dtype=bool)
    )
    outer = int(np.prod(z.shape[:axis]))
    normalizer = {
        "VALID": int(valid.sum()),
        "FULL": lab.size,
        "BATCH_SIZE": outer,
        "NONE": 1,
    }[normalization_of(spec, "VALID")]
    return rows[0], rows[1], lab, valid, float(max(normalizer, 1)), axis


def _softmax_loss_forward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays
) -> list[F64]:
    """See TABLE['layer_softmax_with_loss'] (TABLE['softmax_with_loss'])."""
    p, e_p, lab, valid, normalizer, _ = _softmax_parts(spec, bottoms)
    return [_scalar(softmax_with_loss(p, e_p, lab, valid, normalizer, FLT_MIN))]


def _softmax_loss_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """TABLE['layer_loss_grad'] of TABLE['softmax_with_loss_grad']."""
    z = bottoms[0]
    p, e_p, lab, valid, normalizer, axis = _softmax_parts(spec, bottoms)
    rows = softmax_with_loss_grad(p, e_p, lab, valid, normalizer) * abs(float(top_diffs[0]))
    moved = np.moveaxis(np.zeros(z.shape), axis, -1).shape
    e = np.moveaxis(rows.reshape(moved), -1, axis) + ETA32
    return [e, None], []


LAYER_BOUNDS["SoftmaxWithLoss"] = LayerBound(
    "layer_softmax_with_loss",
    _softmax_loss_forward,
    "layer_softmax_with_loss",
    _softmax_loss_backward,
)


# ---- SigmoidCrossEntropyLoss ---------------------------------------------------------------


def _sce_parts(spec: LayerSpec, bottoms: Arrays) -> tuple[F64, F64, np.ndarray, float]:
    x = np.asarray(bottoms[0], dtype=np.float64)
    t = np.asarray(bottoms[1], dtype=np.float64).reshape(x.shape)
    p = spec.param("loss_param")
    if spec.has("loss_param", "ignore_label"):
        valid = np.trunc(t) != int(p["ignore_label"])
    else:
        valid = np.ones(x.shape, dtype=bool)
    normalizer = {
        "FULL": x.size,
        "VALID": int(valid.sum()),
        "BATCH_SIZE": x.shape[0],
        "NONE": 1,
    }[normalization_of(spec, "BATCH_SIZE")]
    return x, t, valid, float(max(normalizer, 1))


def _sce_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """See TABLE['layer_sigmoid_cross_entropy']."""
    x, t, valid, normalizer = _sce_parts(spec, bottoms)
    n = int(valid.sum())
    lin = np.abs(x * (t - (x >= 0)))[valid]
    logs = np.log1p(np.exp(-np.abs(x)))[valid]
    e = gamma(2 * n + 1) * float((lin + logs).sum()) + float(
        (gamma(2) * lin + (2 * LIBM_ULPS + 1) * U32).sum()
    )
    return [_scalar(e / normalizer + (2 * n + 1) * ETA32)]


def _sce_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """See TABLE['layer_sigmoid_cross_entropy_grad']."""
    x, t, valid, normalizer = _sce_parts(spec, bottoms)
    s = 0.5 * np.tanh(0.5 * x) + 0.5
    scale = abs(float(top_diffs[0])) / normalizer
    e = scale * ((LIBM_ULPS + 2) * U32 + 3 * U32 * np.abs(s - t)) * (1 + U32)
    return [np.where(valid, e, 0.0).reshape(np.shape(bottoms[0])) + ETA32, None], []


LAYER_BOUNDS["SigmoidCrossEntropyLoss"] = LayerBound(
    "layer_sigmoid_cross_entropy",
    _sce_forward,
    "layer_sigmoid_cross_entropy_grad",
    _sce_backward,
)


# ---- the SmoothL1 Python layer -------------------------------------------------------------


def _smooth_l1_parts(spec: LayerSpec, bottoms: Arrays) -> tuple[F64, float, int]:
    p = spec.param("python_param")
    if (p["module"], p["layer"]) != ("crossval.caffe_side.layers", "SmoothL1Loss"):
        raise UnsupportedLayer(spec.name, f"Python ({p['module']}.{p['layer']})")
    text = str(p["param_str"]) or "{}"
    sigma = float(json.loads(text).get("sigma", 1.0))
    a, b = bottoms
    d = np.asarray(a, dtype=np.float64) - np.reshape(b, np.shape(a))
    return d, sigma * sigma, int(np.shape(a)[0])


def _smooth_l1_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """See TABLE['layer_smooth_l1']."""
    d, s2, n = _smooth_l1_parts(spec, bottoms)
    ad = np.abs(d)
    f = np.where(ad < 1 / s2, 0.5 * s2 * d * d, ad - 0.5 / s2)
    near = ad >= (1 - 4 * U32) / s2
    e = (
        gamma(d.size + 3) * float(np.abs(f).sum())
        + float((np.minimum(s2 * ad, 1.0) * U32 * ad).sum())
        + float(near.sum()) * U32 / s2
    )
    return [np.full(np.shape(tops[0]), e / n + 2 * d.size * ETA32)]


def _smooth_l1_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """See TABLE['layer_smooth_l1_grad']."""
    d, s2, n = _smooth_l1_parts(spec, bottoms)
    ad = np.abs(d)
    h = np.where(ad < 1 / s2, s2 * ad, np.sign(ad))
    kink = np.abs(s2 * ad - 1) <= 4 * U32
    scale = abs(float(np.reshape(top_diffs[0], -1)[0])) / n
    e = scale * (s2 * U32 * ad + 4 * U32 * h + 2 * U32 * kink) + ETA32
    return [e, np.reshape(e, np.shape(bottoms[1]))], []


# Python layers by (python_param.module, python_param.layer): crossval's own, and those a
# user's plugin registers (``crossval.portcheck.plugins.register_python_layer``).
PYTHON_BOUNDS: dict[tuple[str, str], LayerBound] = {
    ("crossval.caffe_side.layers", "SmoothL1Loss"): LayerBound(
        "layer_smooth_l1", _smooth_l1_forward, "layer_smooth_l1_grad", _smooth_l1_backward
    ),
}


def _python_bound(spec: LayerSpec) -> LayerBound:
    p = spec.param("python_param")
    key = (str(p["module"]), str(p["layer"]))
    if key not in PYTHON_BOUNDS:
        raise UnsupportedLayer(spec.name, f"Python ({key[0]}.{key[1]})")
    return PYTHON_BOUNDS[key]


def _python_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """The bound of the Python layer `spec` names (PYTHON_BOUNDS)."""
    return _python_bound(spec).forward(spec, bottoms, blobs, tops)


def _python_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """The bound of the Python layer `spec` names (PYTHON_BOUNDS)."""
    return _python_bound(spec).backward(spec, bottoms, blobs, tops, top_diffs)


LAYER_BOUNDS["Python"] = LayerBound(
    "layer_python", _python_forward, "layer_python", _python_backward
)
