"""Layer cases for the vision layers (see crossval.layercheck)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from .gen import arrays, seeds
from .run import LayerCase


@st.composite
def inner_product(draw: st.DrawFn) -> LayerCase:
    ndim = draw(st.integers(2, 4), label="ndim")
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim), label="shape"))
    axis = draw(st.integers(-ndim + 1, ndim - 1).filter(lambda a: a != 0), label="axis")
    n = draw(st.integers(1, 6), label="num_output")
    bias = draw(st.booleans(), label="bias_term")
    transpose = draw(st.booleans(), label="transpose")
    params = (
        f"inner_product_param {{ num_output: {n} axis: {axis} "
        f"bias_term: {str(bias).lower()} transpose: {str(transpose).lower()} }}"
    )
    return LayerCase(
        "InnerProduct",
        (draw(arrays(shape), label="bottom"),),
        params,
        seed=draw(seeds, label="param seed"),
        weight_scale=draw(st.sampled_from((1e-2, 1.0, 10.0)), label="weight scale"),
    )


CASES: dict[str, Any] = {"InnerProduct": inner_product}
