"""Layer cases for the loss layers (see crossval.layercheck)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from .gen import arrays, seeds
from .run import LayerCase

F32 = np.float32
NORMALIZATIONS = ("VALID", "FULL", "BATCH_SIZE", "NONE")


def _shape(draw: st.DrawFn, lo_ndim: int = 1, hi_ndim: int = 4) -> tuple[int, ...]:
    ndim = draw(st.integers(lo_ndim, hi_ndim), label="ndim")
    return tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim), label="shape"))


def _normalization(draw: st.DrawFn) -> list[str]:
    """loss_param fields: a normalization mode, the deprecated normalize, or neither."""
    how = draw(st.sampled_from(("unset", "normalization", "normalize")), label="normalization")
    if how == "normalization":
        return [f"normalization: {draw(st.sampled_from(NORMALIZATIONS), label='mode')}"]
    if how == "normalize":
        return [f"normalize: {str(draw(st.booleans(), label='normalize')).lower()}"]
    return []


def _loss_param(fields: list[str]) -> str:
    return f"loss_param {{ {' '.join(fields)} }}" if fields else ""


@st.composite
def euclidean_loss(draw: st.DrawFn) -> LayerCase:
    shape = _shape(draw)
    a = draw(arrays(shape, label="a"), label="bottom 0")
    # bottom 1 needs only the same num and count(1): sometimes a flat (N, D) blob.
    other = (shape[0], math.prod(shape[1:])) if draw(st.booleans(), label="flat b") else shape
    near = draw(st.booleans(), label="b near a")
    b = draw(arrays(other, label="b"), label="bottom 1")
    if near:  # cancellation: a - b small against a
        b = (a.reshape(other) + b * F32(1e-3)).astype(F32)
    return LayerCase("EuclideanLoss", (a, b), "", seed=draw(seeds, label="diff seed"))


@st.composite
def softmax_with_loss(draw: st.DrawFn) -> LayerCase:
    shape = _shape(draw, 2, 4)
    ndim = len(shape)
    axis = draw(st.integers(-ndim, ndim - 1), label="axis")
    a = axis % ndim
    if a == 0:  # labels must share the first dimension: N must divide their count
        shape = (shape[0], shape[0] * shape[1], *shape[2:])
    k = shape[a]
    squeezed = shape[:a] + shape[a + 1 :]
    count = math.prod(squeezed)
    rng = np.random.default_rng(draw(seeds, label="label seed"))
    labels = rng.integers(0, k, size=count)
    fields = _normalization(draw)
    if draw(st.booleans(), label="ignore_label"):
        ignore = draw(st.sampled_from((-1, 0, 255, k - 1)), label="ignore value")
        fields.append(f"ignore_label: {ignore}")
        share = draw(st.sampled_from((0.3, 1.0)), label="ignored share")
        labels = np.where(rng.random(count) < share, ignore, labels)
    # Caffe casts labels with static_cast<int>: fractional labels truncate toward zero.
    frac = draw(st.sampled_from((0.0, 0.0, 0.5)), label="fractional labels")
    values = labels.astype(np.float64) + np.where(labels >= 0, frac, -frac)
    # LossLayer: labels of any shape with the count and the first dimension of the logits.
    flat = (shape[0], count // shape[0])
    lshape = flat if a == 0 or draw(st.booleans(), label="flat labels") else squeezed
    z = draw(arrays(shape, scales=(1e-3, 1.0, 30.0, 1e3)), label="logits")
    text = _loss_param(fields)
    if axis != 1 or draw(st.booleans(), label="explicit axis"):
        text += f" softmax_param {{ axis: {axis} }}"
    return LayerCase(
        "SoftmaxWithLoss",
        (z, values.reshape(lshape).astype(F32)),
        text,
        no_diff=(1,),
        seed=draw(seeds, label="diff seed"),
    )


@st.composite
def sigmoid_cross_entropy_loss(draw: st.DrawFn) -> LayerCase:
    shape = _shape(draw)
    x = draw(arrays(shape, scales=(1e-3, 1.0, 10.0, 100.0)), label="logits")
    rng = np.random.default_rng(draw(seeds, label="target seed"))
    t = rng.choice(np.array([0.0, 1.0, 0.25, 0.7], dtype=F32), size=shape)
    fields = _normalization(draw)
    if draw(st.booleans(), label="ignore_label"):
        ignore = draw(st.sampled_from((-1, 0, 1)), label="ignore value")
        fields.append(f"ignore_label: {ignore}")
        if ignore == -1:
            t = np.where(rng.random(shape) < 0.3, F32(-1), t)
    return LayerCase(
        "SigmoidCrossEntropyLoss",
        (x, t.astype(F32)),
        _loss_param(fields),
        no_diff=(1,),
        seed=draw(seeds, label="diff seed"),
    )


@st.composite
def smooth_l1(draw: st.DrawFn) -> LayerCase:
    shape = _shape(draw)
    sigma = draw(st.sampled_from((1.0, 3.0, 0.5, 1.0 / 3, 2.5)), label="sigma")
    a = draw(arrays(shape, label="a", scales=(1e-3, 0.3, 1.0, 30.0)), label="bottom 0")
    b = draw(arrays(shape, label="b", scales=(1e-3, 0.3, 1.0, 30.0)), label="bottom 1")
    if draw(st.booleans(), label="at the kink"):
        # |a - b| = 1 / sigma^2 on some elements (the branch switch).
        k = np.float32(1 / (sigma * sigma))
        mask = np.random.default_rng(draw(seeds, label="kink seed")).random(shape) < 0.5
        b = np.where(mask, a - k, b).astype(F32)
    param = (
        'python_param { module: "crossval.caffe_side.layers" layer: "SmoothL1Loss" '
        f"param_str: '{{\"sigma\": {sigma!r}}}' }}"
    )
    return LayerCase("Python", (a, b), param, seed=draw(seeds, label="diff seed"))


CASES: dict[str, Any] = {
    "EuclideanLoss": euclidean_loss,
    "SoftmaxWithLoss": softmax_with_loss,
    "SigmoidCrossEntropyLoss": sigmoid_cross_entropy_loss,
    "Python": smooth_l1,
}
