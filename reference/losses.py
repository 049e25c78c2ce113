"""Caffe loss layers with Caffe's exact semantics, as autograd-capable tensor functions."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from crossval.reference.functional import softmax

__all__ = [
    "FLT_MIN",
    "NORMALIZATIONS",
    "check_labels",
    "euclidean_loss",
    "smooth_l1_loss",
    "softmax_with_loss",
    "softmax_with_loss_unchecked",
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
    """Caffe's forward (log clamped at FLT_MIN) with Caffe's backward (clamp ignored).

    The normalizer is a tensor and nothing here reads a value back into Python, so the
    function runs under ``torch.func.vmap`` (one loss per case)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        logits: Tensor, index: Tensor, valid: Tensor, axis: int, normalizer: Tensor
    ) -> tuple[Tensor, Tensor]:
        prob = softmax(logits, axis)
        picked = prob.gather(axis, index).clamp_min(FLT_MIN)
        per_pos = torch.where(valid, -torch.log(picked), torch.zeros_like(picked))
        return per_pos.sum() / normalizer, prob

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        _, index, valid, axis, normalizer = inputs
        prob = output[1]
        ctx.mark_non_differentiable(prob)
        ctx.save_for_backward(prob, index, valid, normalizer)
        ctx.axis = axis

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        prob, index, valid, normalizer = ctx.saved_tensors
        weight = valid.to(prob.dtype)
        # d/dz = (p - onehot(label)) * top_diff / normalizer, zero at ignored positions; the
        # FLT_MIN clamp is deliberately not differentiated, exactly as in Caffe.
        diff = prob.scatter_add(ctx.axis, index, -weight) * weight
        return diff * (grad_output / normalizer), None, None, None, None


def _labels_along(logits: Tensor, labels: Tensor, axis: int) -> Tensor:
    """`labels` with the class axis kept (size 1), after checking its shape against logits'."""
    shape = tuple(logits.shape)
    squeezed = shape[:axis] + shape[axis + 1 :]
    kept = (*shape[:axis], 1, *shape[axis + 1 :])
    if tuple(labels.shape) == kept:
        return labels.detach()
    if tuple(labels.shape) == squeezed:
        return labels.unsqueeze(axis).detach()
    raise ValueError(
        f"labels shape {tuple(labels.shape)} does not match logits shape {shape} "
        f"along axis {axis}: expected {squeezed} or {kept}"
    )


def _label_index(raw: Tensor, device: torch.device) -> Tensor:
    """Caffe's static_cast<int>: float labels truncated toward zero."""
    lab = raw.trunc().to(torch.int64) if raw.is_floating_point() else raw.to(torch.int64)
    return lab.to(device)


def _check_arguments(logits: Tensor, axis: int, normalization: str) -> int:
    """The checks on arguments (not on data); returns the axis made non-negative."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not logits.is_floating_point():
        raise TypeError(f"softmax_with_loss: logits must be floating point, got {logits.dtype}")
    ndim = logits.dim()
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for logits of shape {tuple(logits.shape)}")
    return axis % ndim


def check_labels(
    logits: Tensor, labels: Tensor, *, axis: int = 1, ignore_label: int | None = None
) -> None:
    """Caffe's label checks, which read the data: every label finite, and within
    [0, channels) unless it is `ignore_label`. Raises ValueError naming the first bad one.
    `softmax_with_loss` runs these; a vectorised caller (``softmax_with_loss_unchecked``
    under vmap) runs them once, on the whole batch of cases, where the cases are made."""
    axis = _check_arguments(logits, axis, "VALID")
    raw = _labels_along(logits, labels, axis)
    if raw.is_floating_point() and not bool(torch.isfinite(raw).all()):
        raise ValueError("softmax_with_loss: labels must be finite")
    lab = _label_index(raw, logits.device)
    channels = logits.shape[axis]
    valid = torch.ones_like(lab, dtype=torch.bool) if ignore_label is None else lab != ignore_label
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


def softmax_with_loss_unchecked(
    logits: Tensor,
    labels: Tensor,
    *,
    axis: int = 1,
    normalization: str = "VALID",
    ignore_label: int | None = None,
) -> Tensor:
    """`softmax_with_loss` without the checks that read the labels' values (see
    `check_labels`): nothing is read back into Python, so it runs under ``torch.func.vmap``.
    Labels must already be known to be valid."""
    axis = _check_arguments(logits, axis, normalization)
    shape = tuple(logits.shape)
    lab = _label_index(_labels_along(logits, labels, axis), logits.device)
    valid = torch.ones_like(lab, dtype=torch.bool) if ignore_label is None else lab != ignore_label
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :])
    if normalization == "VALID":
        normalizer = valid.sum().clamp_min(1).to(logits.dtype)
    else:
        fixed = {"FULL": outer * inner, "BATCH_SIZE": outer, "NONE": 1}[normalization]
        normalizer = torch.tensor(float(max(fixed, 1)), dtype=logits.dtype, device=logits.device)
    index = torch.where(valid, lab, torch.zeros_like(lab))
    loss: Tensor = _SoftmaxWithLoss.apply(  # type: ignore[no-untyped-call]
        logits, index, valid, axis, normalizer
    )[0]
    return loss


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
    _check_arguments(logits, axis, normalization)
    check_labels(logits, labels, axis=axis, ignore_label=ignore_label)
    return softmax_with_loss_unchecked(
        logits, labels, axis=axis, normalization=normalization, ignore_label=ignore_label
    )
