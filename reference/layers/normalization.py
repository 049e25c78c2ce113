"""Normalization and affine layers: BatchNorm, Scale, Bias."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from crossval.reference.layers import LayerSpec, register
from crossval.reference.layers.neuron import f32


def use_global_stats(spec: LayerSpec) -> bool:
    """Caffe's choice: the stored statistics in TEST, the batch's in TRAIN, unless set."""
    if spec.has("batch_norm_param", "use_global_stats"):
        return bool(spec.param("batch_norm_param")["use_global_stats"])
    return spec.phase == "TEST"


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _other_axes(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


class _BatchStats(torch.autograd.Function):
    """(x - mean) / sqrt(var + eps) over the batch's statistics per channel, with Caffe's
    backward (x - mean) g_x = (g - (sum(g y) y + sum(g)) / M) / sqrt(var + eps)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, eps: float) -> Tensor:
        axes = _other_axes(x)
        m = x.numel() // x.shape[1]
        mean = (x * (1.0 / m)).sum(dim=axes, keepdim=True)
        d = x - mean
        var = (d * d * (1.0 / m)).sum(dim=axes, keepdim=True)
        sigma = torch.sqrt(var + eps)
        y = d / sigma
        ctx.save_for_backward(y, sigma)
        ctx.m = m
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        y, sigma = ctx.saved_tensors
        axes = _other_axes(y)
        a = (g * y).sum(dim=axes, keepdim=True)
        b = g.sum(dim=axes, keepdim=True)
        t = a * y + b
        return (g + (-1.0 / ctx.m) * t) / sigma, None


@register("BatchNorm")
def batch_norm(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = (x - mean) / sqrt(var + eps); stats = blobs[0:2] / blobs[2] (0 if it is 0), or the
    batch's (biased var) without use_global_stats; the statistics blobs get no diff."""
    p = spec.param("batch_norm_param")
    eps = f32(p["eps"])
    (x,) = bottoms
    if x.dim() < 2:
        raise ValueError(f"layer {spec.name!r} (BatchNorm): bottom needs >= 2 axes, has {x.dim()}")
    if not use_global_stats(spec):
        y: Tensor = _BatchStats.apply(x, eps)  # type: ignore[no-untyped-call]
        return [y]
    if len(blobs) != 3 or blobs[2].numel() != 1:
        raise ValueError(
            f"layer {spec.name!r} (BatchNorm): needs 3 blobs (mean, variance, factor), "
            f"has {len(blobs)}"
        )
    mean_sum, var_sum, factor = (b.detach() for b in blobs)
    f = factor.reshape(())
    # Caffe: scale_factor = factor == 0 ? 0 : 1 / factor, then blob * scale_factor.
    inv = torch.where(f == 0, torch.zeros_like(f), 1.0 / torch.where(f == 0, 1.0, f))
    shape = _channel_shape(x)
    if mean_sum.numel() != x.shape[1] or var_sum.numel() != x.shape[1]:
        raise ValueError(
            f"layer {spec.name!r} (BatchNorm): statistics have {mean_sum.numel()} channels, "
            f"the bottom {x.shape[1]}"
        )
    mean = (mean_sum * inv).reshape(shape)
    sigma = torch.sqrt(var_sum * inv + eps).reshape(shape)
    return [(x - mean) / sigma]


def broadcast(spec: LayerSpec, kind: str, x: Tensor, v: Tensor) -> Tensor:
    """`v` laid along x's axes from `axis` (axis 0 for a scalar), as Scale and Bias do."""
    axis = int(spec.param(kind)["axis"])
    if v.dim() == 0:
        return v
    if not -x.dim() <= axis < x.dim():
        raise ValueError(
            f"layer {spec.name!r} ({spec.type}): axis {axis} out of range for a "
            f"{x.dim()}-axis bottom"
        )
    axis %= x.dim()
    if tuple(x.shape[axis : axis + v.dim()]) != tuple(v.shape):
        raise ValueError(
            f"layer {spec.name!r} ({spec.type}): blob of shape {tuple(v.shape)} does not match "
            f"bottom shape {tuple(x.shape)} from axis {axis}"
        )
    if axis + v.dim() == x.dim():
        return v  # trailing axes broadcast as they are (an export keeps the blob by name)
    return v.reshape((1,) * axis + tuple(v.shape) + (1,) * (x.dim() - axis - v.dim()))


@register("Scale")
def scale(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = x s (+ b), s = bottom 1 or param 0 (then b the next param), laid from `axis`."""
    x = bottoms[0]
    s, rest = (bottoms[1], list(blobs)) if len(bottoms) > 1 else (blobs[0], list(blobs[1:]))
    y = x * broadcast(spec, "scale_param", x, s)
    if spec.param("scale_param")["bias_term"]:
        if not rest:
            raise ValueError(f"layer {spec.name!r} (Scale): bias_term without a bias blob")
        y = y + broadcast(spec, "scale_param", x, rest[0])
    return [y]


@register("Bias")
def bias(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = x + b, b = bottom 1 or param 0, laid from `axis`."""
    x = bottoms[0]
    b = bottoms[1] if len(bottoms) > 1 else blobs[0]
    return [x + broadcast(spec, "bias_param", x, b)]
