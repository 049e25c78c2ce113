"""Caffe loss layers with Caffe's exact semantics, as autograd-capable tensor functions."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from reference.functional import softmax

__all__ = [
    "FLT_MIN",
    "NORMALIZATIONS",
    "euclidean_loss",
    "smooth_l1_loss",
    "softmax_with_loss",
]

# C's FLT_MIN = 2**-126 exactly; Caffe clamps with Dtype(FLT_MIN), the same value in double.
FLT_MIN = 2.0**-126
NORMALIZATIONS = ("VALID", "FULL", "BATCH_SIZE", "NONE")


def _paired_target(pred: Tensor, target: Tensor, loss: str) -> Tensor:
    """Target reshaped to pred's shape, after Caffe's LossLayer checks (same num, count(1))."""
    if not pred.is_floating_point():
        raise TypeError(f"{loss}: pred must be floating point, got {pred.dtype}")
    if (
        pred.dim() == 0
        or target.dim() == 0
        or pred.shape[0] != target.shape[0]
        or pred.numel() != target.numel()
    ):
        raise ValueError(
            f"{loss}: pred shape {tuple(pred.shape)} and target shape {tuple(target.shape)} "
            "must have the same batch size and count per sample"
        )
    if pred.shape[0] == 0:
        raise ValueError(f"{loss}: empty batch, pred shape {tuple(pred.shape)}")
    return target.reshape(pred.shape).to(pred.dtype)


def euclidean_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Caffe EuclideanLoss: L = sum((pred - target)^2) / N / 2, N = pred.shape[0]."""
    diff = pred - _paired_target(pred, target, "euclidean_loss")
    return (diff * diff).sum() / pred.shape[0] / 2


def smooth_l1_loss(pred: Tensor, target: Tensor, sigma: float = 1.0) -> Tensor:
    """Fast R-CNN SmoothL1Loss: L = sum(0.5 s^2 x^2 if |x| < 1/s^2 else |x| - 0.5/s^2) / N."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"smooth_l1_loss: sigma must be finite and > 0, got {sigma}")
    x = pred - _paired_target(pred, target, "smooth_l1_loss")
    sigma2 = sigma * sigma
    ax = x.abs()
    per_elem = torch.where(ax < 1.0 / sigma2, 0.5 * x * x * sigma2, ax - 0.5 / sigma2)
    return per_elem.sum() / pred.shape[0]


class _SoftmaxWithLoss(torch.autograd.Function):
    """Caffe's forward (log clamped at FLT_MIN) with Caffe's backward (clamp ignored)."""

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, index: Tensor, valid: Tensor, axis: int, normalizer: float
    ) -> Tensor:
        prob = softmax(logits, axis)
        picked = prob.gather(axis, index).clamp_min(FLT_MIN)
        per_pos = torch.where(valid, -torch.log(picked), torch.zeros_like(picked))
        ctx.save_for_backward(prob, index, valid)
        ctx.axis = axis
        ctx.normalizer = normalizer
        return per_pos.sum() / normalizer

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        prob, index, valid = ctx.saved_tensors
        weight = valid.to(prob.dtype)
        # d/dz = (p - onehot(label)) * top_diff / normalizer, zero at ignored positions; the
        # FLT_MIN clamp is deliberately not differentiated, exactly as in Caffe.
        diff = prob.scatter_add(ctx.axis, index, -weight) * weight
        return diff * (grad_output / ctx.normalizer), None, None, None, None


def softmax_with_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    axis: int = 1,
    normalization: str = "VALID",
    ignore_label: int | None = None,
    normalize: bool | None = None,
) -> Tensor:
    """Caffe SoftmaxWithLoss: L = -sum_valid log(max(softmax(z)[label], FLT_MIN)) / normalizer."""
    if normalize is not None:
        normalization = "VALID" if normalize else "BATCH_SIZE"
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not logits.is_floating_point():
        raise TypeError(f"softmax_with_loss: logits must be floating point, got {logits.dtype}")
    ndim = logits.dim()
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for logits of shape {tuple(logits.shape)}")
    axis %= ndim
    shape = tuple(logits.shape)
    channels = shape[axis]
    squeezed = shape[:axis] + shape[axis + 1 :]
    kept = (*shape[:axis], 1, *shape[axis + 1 :])
    if tuple(labels.shape) == kept:
        raw = labels
    elif tuple(labels.shape) == squeezed:
        raw = labels.unsqueeze(axis)
    else:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits shape {shape} "
            f"along axis {axis}: expected {squeezed} or {kept}"
        )
    raw = raw.detach()
    if raw.is_floating_point():
        if not bool(torch.isfinite(raw).all()):
            raise ValueError("softmax_with_loss: labels must be finite")
        lab = raw.trunc().to(torch.int64)  # static_cast<int>: truncation toward zero
    else:
        lab = raw.to(torch.int64)
    lab = lab.to(logits.device)

    if ignore_label is None:
        valid = torch.ones_like(lab, dtype=torch.bool)
    else:
        valid = lab != ignore_label
    bad = valid & ((lab < 0) | (lab >= channels))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        position = where[:axis] + where[axis + 1 :]
        value = raw[where].item()
        cast = f" (cast to {int(lab[where])})" if raw.is_floating_point() else ""
        ignored = "" if ignore_label is None else f" and is not ignore_label {ignore_label}"
        raise ValueError(
            f"label {value!r}{cast} at position {position} is outside [0, {channels}){ignored}"
        )

    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :])
    normalizer = {
        "VALID": int(valid.sum()),
        "FULL": outer * inner,
        "BATCH_SIZE": outer,
        "NONE": 1,
    }[normalization]
    index = torch.where(valid, lab, torch.zeros_like(lab))
    clamped = float(max(normalizer, 1))
    loss: Tensor = _SoftmaxWithLoss.apply(  # type: ignore[no-untyped-call]
        logits, index, valid, axis, clamped
    )
    return loss
