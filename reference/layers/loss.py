"""Loss layers: EuclideanLoss, SoftmaxWithLoss, SigmoidCrossEntropyLoss, and the SmoothL1
Python layer the seed's answer suggests.

The losses themselves live in crossval.reference.losses (one implementation each); these functions
read the layer's parameters as Caffe does and give the top Caffe's shape (a scalar for
Caffe's loss layers, (1,) for the Python layer). Caffe scales every loss backward by the
top's diff, which autograd does through the top.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from crossval.reference import losses
from crossval.reference.functional import sigmoid
from crossval.reference.layers import LayerSpec, UnsupportedLayer, register
from crossval.reference.layers.vision import canonical_axis


def _bad(spec: LayerSpec, why: str) -> ValueError:
    return ValueError(f"layer {spec.name!r} ({spec.type}): {why}")


def _two_bottoms(spec: LayerSpec, bottoms: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """LossLayer::Reshape: two bottoms with the same first dimension."""
    if len(bottoms) != 2:
        raise _bad(spec, f"needs 2 bottoms, got {len(bottoms)}")
    a, b = bottoms
    if a.dim() == 0 or b.dim() == 0 or a.shape[0] != b.shape[0]:
        raise _bad(
            spec,
            f"bottoms {tuple(a.shape)} and {tuple(b.shape)} must have the same first dimension",
        )
    return a, b


def _same_count(spec: LayerSpec, bottoms: Sequence[Tensor], count: str) -> tuple[Tensor, Tensor]:
    """`_two_bottoms`, which must also hold as many elements each (Caffe's check on
    `count`: count(1) or count())."""
    a, b = _two_bottoms(spec, bottoms)
    if a.numel() != b.numel():
        raise _bad(spec, f"bottoms {tuple(a.shape)} and {tuple(b.shape)} differ in {count}")
    return a, b


@register("EuclideanLoss")
def euclidean_loss(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """L = sum((a - b)^2) / N / 2, N = a.shape[0]; both bottoms get a diff."""
    a, b = _same_count(spec, bottoms, "count(1)")
    return [losses.euclidean_loss(a, b)]


def normalization_of(spec: LayerSpec, default: str) -> str:
    """The layer's normalization mode: `normalization` when set, else the deprecated
    `normalize` when set (true: VALID, false: BATCH_SIZE), else `default` (SoftmaxWithLoss:
    the proto default VALID; SigmoidCrossEntropyLoss: BATCH_SIZE)."""
    p = spec.param("loss_param")
    if spec.has("loss_param", "normalization"):
        return str(p["normalization"])
    if spec.has("loss_param", "normalize"):
        return "VALID" if p["normalize"] else "BATCH_SIZE"
    return default


def _ignore_label(spec: LayerSpec) -> int | None:
    if spec.has("loss_param", "ignore_label"):
        return int(spec.param("loss_param")["ignore_label"])
    return None


@register("SoftmaxWithLoss")
def softmax_with_loss(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """L = -sum_valid log(max(softmax(z)[label], FLT_MIN)) / normalizer; labels get no diff."""
    z, labels = _two_bottoms(spec, bottoms)
    if len(spec.tops) > 1:
        # This Caffe aborts on it: the inner Softmax copies the layer's loss weights (one per
        # top) but has one top.
        raise _bad(spec, "a second top (the probabilities) is not supported")
    axis = canonical_axis(int(spec.param("softmax_param")["axis"]), z.dim(), spec)
    squeezed = (*z.shape[:axis], *z.shape[axis + 1 :])
    if labels.numel() != math.prod(squeezed):
        raise _bad(
            spec,
            f"{labels.numel()} labels for {math.prod(squeezed)} predictions "
            f"(shape {tuple(z.shape)}, softmax axis {axis})",
        )
    try:
        loss = losses.softmax_with_loss(
            z,
            labels.detach().reshape(squeezed),
            axis=axis,
            normalization=normalization_of(spec, "VALID"),
            ignore_label=_ignore_label(spec),
        )
    except ValueError as exc:
        raise _bad(spec, str(exc)) from None
    return [loss]


class _SigmoidCrossEntropy(torch.autograd.Function):
    """Caffe's stable form forward; backward sigmoid(x) - t (also at x = 0, where the
    forward's |x| has a kink), zero where ignored, times top_diff / normalizer."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, t: Tensor, valid: Tensor, normalizer: float) -> Tensor:
        pos = (x >= 0).to(x.dtype)
        per = x * (t - pos) - torch.log(1 + torch.exp(x - 2 * x * pos))
        ctx.save_for_backward(x, t, valid)
        ctx.normalizer = normalizer
        return -torch.where(valid, per, torch.zeros_like(per)).sum() / normalizer

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, t, valid = ctx.saved_tensors
        diff = torch.where(valid, sigmoid(x) - t, torch.zeros_like(x))
        return diff * (g / ctx.normalizer), None, None, None


@register("SigmoidCrossEntropyLoss")
def sigmoid_cross_entropy_loss(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """L = -sum_valid (x (t - [x>=0]) - log(1 + exp(x - 2x [x>=0]))) / normalizer."""
    x, t = _same_count(spec, bottoms, "count")
    t = t.detach().reshape(x.shape).to(x.dtype)
    ignore = _ignore_label(spec)
    # static_cast<int>(target) == ignore_label: truncation toward zero.
    valid = torch.ones_like(t, dtype=torch.bool) if ignore is None else t.trunc() != ignore
    mode = normalization_of(spec, "BATCH_SIZE")
    outer, count = x.shape[0], x.numel()
    normalizer = {
        "FULL": count,
        "VALID": int(valid.sum()),
        "BATCH_SIZE": outer,
        "NONE": 1,
    }[mode]
    loss: Tensor = _SigmoidCrossEntropy.apply(  # type: ignore[no-untyped-call]
        x, t, valid, float(max(normalizer, 1))
    )
    return [loss]


def _smooth_l1(spec: LayerSpec, bottoms: Sequence[Tensor]) -> Tensor:
    """SmoothL1Loss (crossval.caffe_side.layers): param_str is JSON with `sigma` (default 1)."""
    text = str(spec.param("python_param")["param_str"]) or "{}"
    try:
        sigma = float(json.loads(text).get("sigma", 1.0))
    except (ValueError, AttributeError) as exc:
        raise _bad(spec, f"param_str {text!r} is not a JSON object with sigma: {exc}") from None
    a, b = _same_count(spec, bottoms, "count")
    try:
        return losses.smooth_l1_loss(a, b, sigma).reshape(1)
    except ValueError as exc:
        raise _bad(spec, str(exc)) from None


# The Python layers the reference knows, by (python_param.module, python_param.layer):
# crossval's own, and those a user's plugin registers. Each gives the layer's tops.
PYTHON_LAYERS: dict[tuple[str, str], Callable[[LayerSpec, Sequence[Tensor]], list[Tensor]]] = {
    ("crossval.caffe_side.layers", "SmoothL1Loss"): lambda spec, b: [_smooth_l1(spec, b)],
}


@register("Python")
def python(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = the Python layer python_param names, among those registered (PYTHON_LAYERS)."""
    p = spec.param("python_param")
    key = (str(p["module"]), str(p["layer"]))
    fn = PYTHON_LAYERS.get(key)
    if fn is None:
        raise UnsupportedLayer(spec.name, f"Python ({key[0]}.{key[1]})")
    return fn(spec, bottoms)
