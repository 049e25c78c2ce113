"""Layer cases for the neuron (elementwise) layers (see crossval.layercheck)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from .gen import arrays
from .run import LayerCase

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)


@st.composite
def relu(draw: st.DrawFn) -> LayerCase:
    slope = draw(st.sampled_from((0.0, 0.1, -0.5, 2.0, 1.0 / 3)), label="negative_slope")
    shape = draw(shapes, label="shape")
    return LayerCase(
        "ReLU",
        (draw(arrays(shape), label="bottom"),),
        f"relu_param {{ negative_slope: {slope!r} }}",
    )


CASES: dict[str, Any] = {"ReLU": relu}
