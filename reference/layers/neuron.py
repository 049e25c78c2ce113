"""Neuron layers (elementwise): ReLU, PReLU, ELU, Sigmoid, TanH, AbsVal, BNLL, Power, Exp,
Log, Dropout."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crossval.reference.functional import sigmoid as _sigmoid
from crossval.reference.layers import LayerSpec, register


def f32(value: Any) -> float:
    """A float field of a Caffe parameter message, as the float32 value Caffe holds."""
    return float(np.float32(value))


@register("ReLU")
def relu(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = max(x, 0) + negative_slope * min(x, 0); Caffe's diff at x = 0 is negative_slope."""
    slope = float(spec.param("relu_param")["negative_slope"])
    (x,) = bottoms
    # Caffe: bottom_diff = top_diff * ((x > 0) + slope * (x <= 0)): the kink at 0 takes the
    # negative side, where autograd of torch.where(x > 0, ...) gives the same.
    return [torch.where(x > 0, x, x * slope)]


@register("PReLU")
def prelu(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = max(x, 0) + a_c min(x, 0), a per channel (axis 1) or one shared; diff at 0 is a_c."""
    (x,) = bottoms
    (a,) = blobs
    if x.dim() < 2:
        raise ValueError(f"layer {spec.name!r} (PReLU): bottom needs >= 2 axes, has {x.dim()}")
    shared = bool(spec.param("prelu_param")["channel_shared"])
    want = 1 if shared else x.shape[1]
    if a.numel() != want:
        raise ValueError(
            f"layer {spec.name!r} (PReLU): slope blob has {a.numel()} values, needs {want} "
            f"(channel_shared: {str(shared).lower()})"
        )
    slope = a.reshape(()) if shared else a.reshape((1, -1) + (1,) * (x.dim() - 2))
    # Caffe's slope diff sums g x over x <= 0 and its bottom diff takes the slope at x = 0:
    # autograd of the where gives both.
    return [torch.where(x > 0, x, x * slope)]


@register("ELU")
def elu(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = x if x > 0 else alpha (exp(x) - 1); Caffe's diff at x = 0 is alpha."""
    alpha = f32(spec.param("elu_param")["alpha"])
    (x,) = bottoms
    # clamp passes the gradient at its bound (x = 0 takes the exp branch, slope alpha, as
    # Caffe's (alpha + y) does), and keeps exp finite on the unused side.
    return [torch.where(x > 0, x, alpha * torch.expm1(torch.clamp(x, max=0.0)))]


@register("Sigmoid")
def sigmoid(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = 0.5 tanh(0.5 x) + 0.5, evaluated in double as Caffe does."""
    return [_sigmoid(bottoms[0])]


@register("TanH")
def tanh(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = tanh(x); diff g (1 - y^2)."""
    return [torch.tanh(bottoms[0])]


@register("AbsVal")
def absval(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = |x|; diff g sign(x), 0 at x = 0."""
    (x,) = bottoms
    y: Tensor = _SignGrad.apply(x)  # type: ignore[no-untyped-call]
    return [y]


class _SignGrad(torch.autograd.Function):
    """|x| with Caffe's diff g * sign(x) (caffe_cpu_sign: 0 at 0, also at -0)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        y: Tensor = x.abs()
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        x: Tensor = ctx.saved_tensors[0]
        return g * ((x > 0).to(g.dtype) - (x < 0).to(g.dtype))


BNLL_THRESHOLD = 50.0  # kBNLL_THRESHOLD in bnll_layer.cpp


class _BNLL(torch.autograd.Function):
    """log(1 + exp(x)) with Caffe's diff g e / (e + 1), e = exp(min(x, 50))."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.clamp(x, min=0.0) + torch.log1p(torch.exp(-x.abs()))

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        e = torch.exp(torch.clamp(x, max=BNLL_THRESHOLD))
        return g * e / (e + 1.0)


@register("BNLL")
def bnll(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = log(1 + exp(x)); diff g sigmoid(min(x, 50)) (0.5 at x = 0)."""
    y: Tensor = _BNLL.apply(bottoms[0])  # type: ignore[no-untyped-call]
    return [y]


def _pow(a: float, b: float) -> float:
    """a^b as C's pow: NaN for a negative base and a non-integer power."""
    try:
        return math.pow(a, b)
    except (ValueError, OverflowError):
        return math.nan if a < 0 else math.inf


class _Power(torch.autograd.Function):
    """Caffe's Power forward and its backward branch by branch (power_layer.cpp)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, power: float, scale: float, shift: float) -> Tensor:
        ctx.params = power, scale, shift
        diff_scale = power * scale
        if diff_scale == 0:
            value = 1.0 if power == 0 else _pow(shift, power)
            y = torch.full_like(x, value)
        else:
            t = x * scale + shift
            y = t if power == 1 else torch.pow(t, power)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None]:
        x, y = ctx.saved_tensors
        power, scale, shift = ctx.params
        diff_scale = power * scale
        if diff_scale == 0:
            return torch.zeros_like(x), None, None, None
        if power == 1:
            d = torch.full_like(x, diff_scale)
        elif power == 2:
            d = x * (diff_scale * scale) + diff_scale * shift
        elif shift == 0:
            # dy/dx = power y / x: 0/0 = NaN at x = 0 for power > 0, as in Caffe.
            d = y / x * power
        else:
            d = y / (x * scale + shift) * diff_scale
        return g * d, None, None, None


@register("Power")
def power(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = (shift + scale x)^power; Caffe's diff power y / x at shift 0 (NaN at x = 0)."""
    p = spec.param("power_param")
    y: Tensor = _Power.apply(  # type: ignore[no-untyped-call]
        bottoms[0], f32(p["power"]), f32(p["scale"]), f32(p["shift"])
    )
    return [y]


def _log_base(spec: LayerSpec, base: float) -> float:
    """ln(base), base -1 meaning e (Caffe rejects base <= 0 otherwise)."""
    if base == -1:
        return 1.0
    if not base > 0:
        raise ValueError(f"layer {spec.name!r} ({spec.type}): base must be > 0 or -1, is {base}")
    return math.log(base)


@register("Exp")
def exp(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = base^(shift + scale x) = base^shift exp(ln(base) scale x), base -1 meaning e."""
    p = spec.param("exp_param")
    base, scale, shift = f32(p["base"]), f32(p["scale"]), f32(p["shift"])
    inner = _log_base(spec, base) * scale
    outer = 1.0 if shift == 0 else (math.exp(shift) if base == -1 else base**shift)
    (x,) = bottoms
    y = torch.exp(x if inner == 1 else x * inner)
    return [y if outer == 1 else y * outer]


@register("Log")
def log(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = log_base(shift + scale x), base -1 meaning e."""
    p = spec.param("log_param")
    base, scale, shift = f32(p["base"]), f32(p["scale"]), f32(p["shift"])
    log_base = _log_base(spec, base)
    if log_base == 0:
        raise ValueError(f"layer {spec.name!r} (Log): base 1 has no logarithm (1 / log(1))")
    base_scale = 1.0 / log_base
    (x,) = bottoms
    y = torch.log(x * scale + shift if (scale, shift) != (1.0, 0.0) else x)
    return [y if base_scale == 1 else y * base_scale]


@register("Dropout")
def dropout(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = x in TEST (dropout_ratio has no effect there); TRAIN is random and not modelled."""
    if spec.phase != "TEST":
        raise ValueError(
            f"layer {spec.name!r} (Dropout): the reference models the TEST phase only "
            f"(identity), not {spec.phase} (random masks)"
        )
    return [bottoms[0].clone()]
