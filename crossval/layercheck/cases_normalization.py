"""Layer cases for the normalization layers (see crossval.layercheck)."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from .gen import arrays, seeds
from .run import LayerCase

nchw = st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple)


@st.composite
def batch_norm(draw: st.DrawFn) -> LayerCase:
    shape = draw(nchw, label="shape")
    mode = draw(st.sampled_from(("default", "true", "false")), label="use_global_stats")
    eps = draw(st.sampled_from((None, 1e-3, 1e-10, 0.5)), label="eps")
    fields = ([] if mode == "default" else [f"use_global_stats: {mode}"]) + (
        [] if eps is None else [f"eps: {eps!r}"]
    )
    x = draw(arrays(shape), label="bottom")
    offset = draw(st.sampled_from((0.0, 0.0, 100.0)), label="offset")
    x = (x + np.float32(offset)).astype(np.float32)
    c = shape[1]
    factor = draw(st.sampled_from((0.0, 1.0, 999.98, 0.5, 3.0)), label="factor")
    rng = np.random.default_rng(draw(seeds, label="stats seed"))
    spread = draw(st.sampled_from((1e-3, 1.0, 30.0)), label="stats scale")
    mean = (rng.standard_normal(c) * spread + offset) * factor
    var = np.abs(rng.standard_normal(c)) * spread**2 * factor
    var[rng.random(c) < 0.2] = 0.0
    blobs = tuple(a.astype(np.float32) for a in (mean, var, np.array([factor], dtype=np.float64)))
    params = "batch_norm_param { " + " ".join(fields) + " }"
    return LayerCase("BatchNorm", (x,), params, blobs=blobs)


@st.composite
def _affine(draw: st.DrawFn, type_name: str) -> LayerCase:
    kind = "scale_param" if type_name == "Scale" else "bias_param"
    ndim = draw(st.integers(2, 4), label="ndim")
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim), label="shape"))
    if draw(st.booleans(), label="equal dims"):
        # Every axis the same size: a blob laid along the wrong axes still broadcasts, so a
        # port that ignores `axis` gives wrong values instead of a shape error.
        shape = (draw(st.integers(2, 3), label="dim"),) * ndim
    two = draw(st.booleans(), label="two bottoms")
    axis = draw(st.integers(-ndim, ndim - 1), label="axis")
    a = axis % ndim
    fields = [f"axis: {axis}"]
    bottoms = [draw(arrays(shape), label="bottom")]
    if two:
        # 0 axes: a scalar second bottom (Caffe then lays it at axis 0, whatever `axis`).
        k = draw(st.integers(0, ndim - a), label="second bottom axes")
        second = draw(arrays(shape[a : a + k] or (1,), label="second"), label="second bottom")
        bottoms.append(second.reshape(shape[a : a + k]))
    else:
        num_axes = draw(st.sampled_from([-1, 0, *range(1, ndim - a + 1)]), label="num_axes")
        fields.append(f"num_axes: {num_axes}")
    if type_name == "Scale":
        bias = draw(st.booleans(), label="bias_term")
        fields.append(f"bias_term: {str(bias).lower()}")
    return LayerCase(
        type_name,
        tuple(bottoms),
        f"{kind} {{ {' '.join(fields)} }}",
        seed=draw(seeds, label="param seed"),
        weight_scale=draw(st.sampled_from((1e-2, 1.0, 10.0)), label="param scale"),
    )


def scale() -> st.SearchStrategy[LayerCase]:
    return _affine("Scale")


def bias() -> st.SearchStrategy[LayerCase]:
    return _affine("Bias")


CASES: dict[str, Any] = {"BatchNorm": batch_norm, "Scale": scale, "Bias": bias}
