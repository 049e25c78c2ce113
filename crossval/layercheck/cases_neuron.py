"""Layer cases for the neuron (elementwise) layers (see crossval.layercheck)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from .gen import arrays
from .run import LayerCase

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)
nchw = st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple)


@st.composite
def relu(draw: st.DrawFn) -> LayerCase:
    slope = draw(st.sampled_from((0.0, 0.1, -0.5, 2.0, 1.0 / 3)), label="negative_slope")
    shape = draw(shapes, label="shape")
    return LayerCase(
        "ReLU",
        (draw(arrays(shape), label="bottom"),),
        f"relu_param {{ negative_slope: {slope!r} }}",
    )


@st.composite
def prelu(draw: st.DrawFn) -> LayerCase:
    shape = draw(nchw, label="shape")
    shared = draw(st.booleans(), label="channel_shared")
    if shared:
        value = draw(st.sampled_from((0.25, 0.0, -1.5, 3.0, 0.1)), label="slope")
        slope = np.array(value, dtype=np.float32)
    else:
        slope = draw(arrays((shape[1],), label="slope", scales=(0.1, 1.0, 3.0)), label="slopes")
    return LayerCase(
        "PReLU",
        (draw(arrays(shape), label="bottom"),),
        f"prelu_param {{ channel_shared: {str(shared).lower()} }}",
        blobs=(slope,),
    )


@st.composite
def elu(draw: st.DrawFn) -> LayerCase:
    alpha = draw(st.sampled_from((1.0, 0.5, 2.0, 0.1, 0.0)), label="alpha")
    shape = draw(shapes, label="shape")
    return LayerCase(
        "ELU", (draw(arrays(shape), label="bottom"),), f"elu_param {{ alpha: {alpha!r} }}"
    )


def _plain(type_name: str) -> Any:
    @st.composite
    def strategy(draw: st.DrawFn) -> LayerCase:
        shape = draw(shapes, label="shape")
        return LayerCase(type_name, (draw(arrays(shape), label="bottom"),))

    strategy.__name__ = type_name.lower()
    return strategy


@st.composite
def power(draw: st.DrawFn) -> LayerCase:
    p = draw(st.sampled_from((0.0, 1.0, 2.0, 3.0, 0.5, -1.0, 1.5, -0.5)), label="power")
    shape = draw(shapes, label="shape")
    if p != int(p) or p < 0:
        # powf of a negative base is NaN for these powers, and 1/t^k explodes near 0: a
        # positive base away from 0, as real nets use them.
        scale = draw(st.sampled_from((1.0, 0.5, 2.0)), label="scale")
        shift = draw(st.sampled_from((0.0, 1.0, 2.5)), label="shift")
        x = draw(arrays(shape, positive=True), label="bottom")
    else:
        scale = draw(st.sampled_from((1.0, 0.0, 0.5, -2.0)), label="scale")
        shift = draw(st.sampled_from((0.0, 1.0, -0.5, 2.5)), label="shift")
        x = draw(arrays(shape), label="bottom")
    return LayerCase(
        "Power", (x,), f"power_param {{ power: {p!r} scale: {scale!r} shift: {shift!r} }}"
    )


def _base_scale_shift(
    draw: st.DrawFn, shifts: tuple[float, ...]
) -> tuple[float, float, float, str]:
    """Exp's and Log's parameters (the same three fields in both), and their prototxt text;
    the shift from `shifts`."""
    base = draw(st.sampled_from((-1.0, 2.0, 10.0, 0.5)), label="base")
    scale = draw(st.sampled_from((1.0, 0.5, -1.0, 2.0)), label="scale")
    shift = draw(st.sampled_from(shifts), label="shift")
    return base, scale, shift, f"base: {base!r} scale: {scale!r} shift: {shift!r}"


@st.composite
def exp(draw: st.DrawFn) -> LayerCase:
    base, scale, shift, fields = _base_scale_shift(draw, (0.0, 1.0, -2.0))
    shape = draw(shapes, label="shape")
    x = draw(arrays(shape), label="bottom")
    ln_base = 1.0 if base == -1 else math.log(base)
    # Keep base^(shift + scale x) finite in float32 (exponent below 80 nats) while reaching
    # deep underflow (down to -104 nats: denormals and 0).
    inner, offset = ln_base * scale, ln_base * shift
    lo, hi = sorted(((-104 - offset) / inner, (80 - offset) / inner))
    x = np.clip(x, lo, hi).astype(np.float32)
    return LayerCase("Exp", (x,), f"exp_param {{ {fields} }}")


@st.composite
def log(draw: st.DrawFn) -> LayerCase:
    _, scale, _, fields = _base_scale_shift(draw, (0.0, 1.0, 0.5))
    shape = draw(shapes, label="shape")
    # The log's argument shift + scale x stays positive (Caffe gives NaN below 0).
    x = draw(arrays(shape, positive=True), label="bottom") * np.float32(math.copysign(1, scale))
    return LayerCase("Log", (x,), f"log_param {{ {fields} }}")


@st.composite
def dropout(draw: st.DrawFn) -> LayerCase:
    ratio = draw(st.sampled_from((0.5, 0.1, 0.9)), label="dropout_ratio")
    shape = draw(shapes, label="shape")
    return LayerCase(
        "Dropout",
        (draw(arrays(shape), label="bottom"),),
        f"dropout_param {{ dropout_ratio: {ratio!r} }}",
    )


CASES: dict[str, Any] = {
    "ReLU": relu,
    "PReLU": prelu,
    "ELU": elu,
    "Sigmoid": _plain("Sigmoid"),
    "TanH": _plain("TanH"),
    "AbsVal": _plain("AbsVal"),
    "BNLL": _plain("BNLL"),
    "Power": power,
    "Exp": exp,
    "Log": log,
    "Dropout": dropout,
}
