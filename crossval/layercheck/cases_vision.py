"""Layer cases for the vision layers (see crossval.layercheck)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from crossval.reference.layers import LayerSpec
from crossval.reference.layers.vision import pool_geometry

from .gen import SCALES, arrays, seeds
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


def _repeated(name: str, values: tuple[int, ...], form: str) -> str:
    """A per-axis field as prototxt: once (all equal), once per axis, or name_h / name_w."""
    if form == "hw":
        return f"{name}_h: {values[0]} {name}_w: {values[1]} "
    if form == "once":
        return f"{name}: {values[0]} "
    return "".join(f"{name}: {v} " for v in values)


@st.composite
def _per_axis(
    draw: st.DrawFn, name: str, n: int, lo: int, hi: int, hw: bool = True
) -> tuple[tuple[int, ...], str]:
    """Values of a per-axis field and its prototxt text, in each of Caffe's three forms."""
    forms = ["once", "each"] + (["hw"] if hw and n == 2 else [])
    form = draw(st.sampled_from(forms), label=f"{name} form")
    if form == "once":
        values = (draw(st.integers(lo, hi), label=name),) * n
    else:
        values = tuple(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n), label=name))
    return values, _repeated(name, values, form)


@st.composite
def _conv_case(draw: st.DrawFn, deconv: bool) -> LayerCase:
    """A (de)convolution: 0 to 3 spatial axes (0: the kernel-less N x K case), channel axis 1
    or 2, groups, every per-axis form of kernel, stride, pad and dilation, bias or not, one or
    two bottoms."""
    n = draw(st.sampled_from((0, 1, 2, 2, 2, 3)), label="spatial axes")
    lead = draw(st.sampled_from((1, 1, 1, 2)), label="axes before the channels")
    group = draw(st.sampled_from((1, 1, 2, 3)), label="group")
    channels = group * draw(st.integers(1, 3), label="channels per group")
    num_output = group * draw(st.integers(1, 3), label="outputs per group")
    text = f"num_output: {num_output} "
    if group > 1 or draw(st.booleans(), label="explicit group"):
        text += f"group: {group} "
    kernel: tuple[int, ...] = ()
    stride, pad, dilation = (1,) * n, (0,) * n, (1,) * n
    if n:
        kernel, t = draw(_per_axis("kernel_size", n, 1, 3 if n < 3 else 2))
        text += t.replace("kernel_size_", "kernel_")
        if draw(st.booleans(), label="stride given"):
            stride, t = draw(_per_axis("stride", n, 1, 3))
            text += t
        if draw(st.booleans(), label="pad given"):
            pad, t = draw(_per_axis("pad", n, 0, 2))
            text += t
        if draw(st.booleans(), label="dilation given"):
            dilation, t = draw(_per_axis("dilation", n, 1, 2, hw=False))
            text += t
    space = []
    for i in range(n):
        extent = dilation[i] * (kernel[i] - 1) + 1
        lo = 1 if deconv else max(1, extent - 2 * pad[i])
        size = draw(st.integers(lo, lo + (3 if n < 3 else 1)), label=f"size {i}")
        if deconv and stride[i] * (size - 1) + extent - 2 * pad[i] <= 0:
            size = math.ceil((2 * pad[i] - extent + 1) / stride[i]) + 1
        space.append(size)
    lead_shape = [draw(st.integers(1, 3), label="num")] + [2] * (lead - 1)
    shape = (*lead_shape, channels, *space)
    if lead > 1 or draw(st.integers(0, 4), label="explicit axis") == 0:
        text += f"axis: {lead if draw(st.booleans(), label='axis sign') else lead - len(shape)} "
    bias = draw(st.booleans(), label="bias_term")
    if not bias:
        text += "bias_term: false "
    bottoms = draw(st.sampled_from((1, 1, 1, 2)), label="bottoms")
    return LayerCase(
        "Deconvolution" if deconv else "Convolution",
        tuple(draw(arrays(shape, label=f"b{i}"), label=f"bottom {i}") for i in range(bottoms)),
        f"convolution_param {{ {text}}}",
        tops=bottoms,
        seed=draw(seeds, label="param seed"),
        weight_scale=draw(st.sampled_from((1e-2, 1.0, 10.0)), label="weight scale"),
        region=f"{n} spatial axes" + (", kernel-less N x K" if n == 0 else ""),
    )


def convolution() -> st.SearchStrategy[LayerCase]:
    return _conv_case(False)


def deconvolution() -> st.SearchStrategy[LayerCase]:
    return _conv_case(True)


_POOL_DEFAULTS: dict[str, Any] = {
    "pool": "MAX",
    "pad": 0,
    "pad_h": 0,
    "pad_w": 0,
    "kernel_size": 0,
    "kernel_h": 0,
    "kernel_w": 0,
    "stride": 1,
    "stride_h": 0,
    "stride_w": 0,
    "engine": "DEFAULT",
    "global_pooling": False,
    "round_mode": "CEIL",
}


@st.composite
def pooling(draw: st.DrawFn) -> LayerCase:
    """MAX (one top or with the mask top) and AVE; kernel, stride and pad square or per
    axis; CEIL and FLOOR; global pooling; inputs smaller than the kernel."""
    method = draw(st.sampled_from(("MAX", "AVE")), label="pool")
    fields: dict[str, Any] = {"pool": method}
    text = f"pool: {method} "
    shape = (
        draw(st.integers(1, 2), label="num"),
        draw(st.integers(1, 3), label="channels"),
        draw(st.integers(1, 8), label="height"),
        draw(st.integers(1, 8), label="width"),
    )
    if draw(st.integers(0, 5), label="global") == 0:
        fields["global_pooling"] = True
        text += "global_pooling: true "
    else:
        square = draw(st.booleans(), label="square")
        keys = ("",) if square else ("_h", "_w")
        for name, lo, hi in (("kernel", 1, 4), ("stride", 1, 3)):
            if name == "stride" and draw(st.booleans(), label="default stride"):
                continue
            for suffix in keys:
                field = f"{name}_size" if name == "kernel" and suffix == "" else name + suffix
                fields[field] = draw(st.integers(lo, hi), label=field)
                text += f"{field}: {fields[field]} "
        kernel = fields.get("kernel_size") or min(fields["kernel_h"], fields["kernel_w"])
        if draw(st.booleans(), label="padded"):
            for suffix in keys if draw(st.booleans(), label="pad per axis") else ("",):
                fields["pad" + suffix] = draw(st.integers(0, kernel - 1), label="pad" + suffix)
                text += f"pad{suffix}: {fields['pad' + suffix]} "
    mode = draw(st.sampled_from(("", "CEIL", "FLOOR")), label="round_mode")
    if mode:
        fields["round_mode"] = mode
        text += f"round_mode: {mode} "
    spec = LayerSpec("layer", "Pooling", params={"pooling_param": {**_POOL_DEFAULTS, **fields}})
    try:
        pool_geometry(spec, shape)
    except ValueError:
        assume(False)
    tops = 2 if method == "MAX" and draw(st.integers(0, 4), label="mask top") == 0 else 1
    return LayerCase(
        "Pooling",
        (draw(arrays(shape), label="bottom"),),
        f"pooling_param {{ {text}}}",
        tops=tops,
    )


@st.composite
def lrn(draw: st.DrawFn) -> LayerCase:
    """ACROSS_CHANNELS and WITHIN_CHANNEL, local_size 1 to 7 (wider than the channels too),
    alpha, beta, k; inputs up to the scale where alpha x^2 stays below 1e3 (beyond it, with
    Caffe's running sum, float32 cannot resolve the scale of a window of zeros)."""
    region = draw(st.sampled_from(("ACROSS_CHANNELS", "WITHIN_CHANNEL")), label="norm_region")
    size = draw(st.sampled_from((1, 3, 5, 5, 7)), label="local_size")
    alpha = draw(st.sampled_from((1e-4, 1e-2, 1.0, 5.0)), label="alpha")
    beta = draw(st.sampled_from((0.75, 0.5, 1.0, 1.5)), label="beta")
    k = draw(st.sampled_from((1.0, 2.0, 0.5)), label="k")
    shape = (
        draw(st.integers(1, 2), label="num"),
        draw(st.integers(1, 7), label="channels"),
        draw(st.integers(1, 4), label="height"),
        draw(st.integers(1, 4), label="width"),
    )
    scales = tuple(s for s in SCALES if alpha * s * s <= 1e3)
    text = f"local_size: {size} alpha: {alpha!r} beta: {beta!r} k: {k!r} norm_region: {region}"
    x = draw(arrays(shape, scales=scales), label="bottom")
    # Large squares first, then small ones (or the reverse): where Caffe's running sum along
    # the channels carries the large squares' rounding into the small windows' scale.
    profile = draw(st.sampled_from(("flat", "flat", "falling", "rising")), label="profile")
    if profile != "flat":
        decades = np.linspace(0.0, -4.0, shape[1]).reshape(1, -1, 1, 1)
        x = (x * 10.0 ** (decades if profile == "falling" else decades[:, ::-1])).astype(np.float32)
    return LayerCase("LRN", (x,), f"lrn_param {{ {text} }}", region=f"{region}, {profile} channels")


CASES: dict[str, Any] = {
    "InnerProduct": inner_product,
    "Convolution": convolution,
    "Deconvolution": deconvolution,
    "Pooling": pooling,
    "LRN": lrn,
}
