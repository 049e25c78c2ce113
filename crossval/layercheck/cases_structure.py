"""Layer cases for the structure layers (see crossval.layercheck)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from .gen import arrays, seeds
from .run import LayerCase

F32 = np.float32


def _shape(draw: st.DrawFn, ndim: int, lo: int = 1, hi: int = 4) -> tuple[int, ...]:
    return tuple(draw(st.lists(st.integers(lo, hi), min_size=ndim, max_size=ndim), label="shape"))


@st.composite
def eltwise(draw: st.DrawFn) -> LayerCase:
    op = draw(st.sampled_from(("SUM", "SUM", "PROD", "MAX")), label="operation")
    n = draw(st.integers(2, 4), label="bottoms")
    shape = _shape(draw, draw(st.integers(1, 4), label="ndim"))
    xs = [draw(arrays(shape, label=f"x{i}"), label=f"bottom {i}") for i in range(n)]
    # Ties across bottoms (MAX's mask, PROD's zeros): some elements copied from bottom 0 or 1.
    share = draw(st.sampled_from((0.0, 0.0, 0.5)), label="shared share")
    if share:
        rng = np.random.default_rng(draw(seeds, label="share seed"))
        for i in range(1, n):
            src = xs[int(rng.integers(0, min(i, 2)))]
            xs[i] = np.where(rng.random(shape) < share, src, xs[i]).astype(F32)
    fields = [f"operation: {op}"]
    if op == "SUM" and draw(st.sampled_from((True, True, False)), label="with coeff"):
        cs = draw(
            st.lists(
                st.sampled_from((1.0, -1.0, 0.5, 2.0, 0.0, -0.3, 1.0 / 3)), min_size=n, max_size=n
            ),
            label="coeff",
        )
        fields += [f"coeff: {c!r}" for c in cs]
    if op == "PROD":
        stable = draw(st.booleans(), label="stable_prod_grad")
        fields.append(f"stable_prod_grad: {str(stable).lower()}")
    return LayerCase(
        "Eltwise",
        tuple(xs),
        f"eltwise_param {{ {' '.join(fields)} }}",
        seed=draw(seeds, label="diff seed"),
    )


@st.composite
def concat(draw: st.DrawFn) -> LayerCase:
    ndim = draw(st.integers(1, 4), label="ndim")
    shape = _shape(draw, ndim)
    n = draw(st.integers(1, 3), label="bottoms")
    legacy = draw(st.booleans(), label="concat_dim")
    if legacy:
        axis = draw(st.integers(0, ndim - 1), label="axis")
        text = f"concat_param {{ concat_dim: {axis} }}"
    else:
        axis = draw(st.integers(-ndim, ndim - 1), label="axis")
        default = axis == 1 and draw(st.booleans(), label="default axis")
        text = "" if default else f"concat_param {{ axis: {axis} }}"
    xs = []
    for i in range(n):
        s = list(shape)
        s[axis % ndim] = draw(st.integers(1, 3), label=f"size {i}")
        xs.append(draw(arrays(tuple(s), label=f"x{i}"), label=f"bottom {i}"))
    return LayerCase("Concat", tuple(xs), text, seed=draw(seeds, label="diff seed"))


@st.composite
def slice_(draw: st.DrawFn) -> LayerCase:
    ndim = draw(st.integers(1, 4), label="ndim")
    shape = list(_shape(draw, ndim))
    tops = draw(st.integers(1, 4), label="tops")
    legacy = draw(st.booleans(), label="slice_dim")
    axis = draw(st.integers(0 if legacy else -ndim, ndim - 1), label="axis")
    a = axis % ndim
    fields = [f"slice_dim: {axis}" if legacy else f"axis: {axis}"]
    if draw(st.booleans(), label="slice_point"):
        shape[a] = draw(st.integers(tops, tops + 3), label="axis size")
        points = sorted(draw(st.permutations(range(1, shape[a])), label="points")[: tops - 1])
        fields += [f"slice_point: {p}" for p in points]
    else:
        shape[a] = tops * draw(st.integers(1, 2), label="width")
    x = draw(arrays(tuple(shape)), label="bottom")
    return LayerCase(
        "Slice",
        (x,),
        f"slice_param {{ {' '.join(fields)} }}",
        tops=tops,
        seed=draw(seeds, label="diff seed"),
    )


@st.composite
def split(draw: st.DrawFn) -> LayerCase:
    shape = _shape(draw, draw(st.integers(1, 4), label="ndim"))
    tops = draw(st.integers(1, 4), label="tops")
    return LayerCase(
        "Split",
        (draw(arrays(shape), label="bottom"),),
        "",
        tops=tops,
        seed=draw(seeds, label="diff seed"),
    )


@st.composite
def flatten(draw: st.DrawFn) -> LayerCase:
    ndim = draw(st.integers(1, 5), label="ndim")
    shape = _shape(draw, ndim, hi=3)
    start = draw(st.integers(0, ndim - 1), label="axis")
    end = draw(st.integers(max(start - 1, 0), ndim - 1), label="end_axis")
    axis = start - ndim if draw(st.booleans(), label="negative axis") else start
    end_axis = end - ndim if draw(st.booleans(), label="negative end_axis") else end
    return LayerCase(
        "Flatten",
        (draw(arrays(shape), label="bottom"),),
        f"flatten_param {{ axis: {axis} end_axis: {end_axis} }}",
        seed=draw(seeds, label="diff seed"),
    )


@st.composite
def reshape(draw: st.DrawFn) -> LayerCase:
    ndim = draw(st.integers(1, 4), label="ndim")
    shape = _shape(draw, ndim)
    start = draw(st.integers(0, ndim), label="start axis")
    num_axes = draw(st.integers(-1, ndim - start), label="num_axes")
    end = ndim if num_axes == -1 else start + num_axes
    count = math.prod(shape[start:end])
    # A factorization of the replaced axes' count into 0..3 new dims (ones included).
    k = draw(st.integers(0 if count == 1 else 1, 3), label="new dims")
    dims: list[int] = []
    rest = count
    for i in range(k - 1):
        divisors = [d for d in range(1, rest + 1) if rest % d == 0]
        d = draw(st.sampled_from(divisors), label=f"dim {i}")
        dims.append(d)
        rest //= d
    if k:
        dims.append(rest)
    for i, d in enumerate(dims):
        if start + i < ndim and d == shape[start + i] and draw(st.booleans(), label=f"0 at {i}"):
            dims[i] = 0
    inferred: bool = draw(st.booleans(), label="-1")
    if dims and inferred:
        dims[draw(st.integers(0, len(dims) - 1), label="-1 at")] = -1
    axis = start - ndim - 1 if draw(st.booleans(), label="negative axis") else start
    text = (
        "reshape_param { shape {"
        + "".join(f" dim: {d}" for d in dims)
        + f" }} axis: {axis} num_axes: {num_axes} }}"
    )
    return LayerCase(
        "Reshape",
        (draw(arrays(shape), label="bottom"),),
        text,
        seed=draw(seeds, label="diff seed"),
    )


@st.composite
def crop(draw: st.DrawFn) -> LayerCase:
    ndim = draw(st.integers(1, 4), label="ndim")
    shape = _shape(draw, ndim, hi=5)
    start = draw(st.integers(0, ndim - 1), label="axis")
    mode = draw(st.sampled_from(("none", "one", "each")), label="offsets")
    offsets: list[int] = []
    if mode == "one":
        offsets = [draw(st.integers(0, min(shape[start:]) - 1), label="offset")]
    elif mode == "each":
        offsets = [
            draw(st.integers(0, shape[a] - 1), label=f"offset {a}") for a in range(start, ndim)
        ]
    like = list(shape)
    for a in range(start, ndim):
        o = offsets[0] if len(offsets) == 1 else offsets[a - start] if offsets else 0
        like[a] = draw(st.integers(1, shape[a] - o), label=f"crop size {a}")
    axis = start - ndim if draw(st.booleans(), label="negative axis") else start
    text = f"crop_param {{ axis: {axis}" + "".join(f" offset: {o}" for o in offsets) + " }"
    x = draw(arrays(shape), label="bottom")
    return LayerCase(
        "Crop",
        (x, np.zeros(like, F32)),
        text,
        no_diff=(1,),
        seed=draw(seeds, label="diff seed"),
    )


@st.composite
def softmax(draw: st.DrawFn) -> LayerCase:
    ndim = draw(st.integers(1, 4), label="ndim")
    shape = _shape(draw, ndim, hi=5)
    axis = draw(st.integers(-ndim, ndim - 1), label="axis")
    text = "" if axis == 1 and draw(st.booleans(), label="default axis") else f"axis: {axis}"
    return LayerCase(
        "Softmax",
        (draw(arrays(shape, scales=(1e-3, 1.0, 10.0, 100.0, 1e3)), label="bottom"),),
        f"softmax_param {{ {text} }}",
        seed=draw(seeds, label="diff seed"),
    )


CASES: dict[str, Any] = {
    "Eltwise": eltwise,
    "Concat": concat,
    "Slice": slice_,
    "Split": split,
    "Flatten": flatten,
    "Reshape": reshape,
    "Crop": crop,
    "Softmax": softmax,
}
