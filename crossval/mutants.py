"""Deliberately wrong implementations of the heads and losses: realistic port bugs.

Each is an ``Impl`` the checks must reject, whether it stands in for a port (the float32
PyTorch side) or for the reference itself. Rows name the mistake and where it shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reference

from .checks import Impl
from .heads import Case


class _ExpectationKernelFromOne(reference.ExpectationHead):
    """Bins valued 1..K instead of 0..K-1 (a public DEX port: +1 year on every age)."""

    def __init__(self, in_features: int, bins: int) -> None:
        super().__init__(in_features, bins)
        self.pred_age.weight.copy_(torch.arange(1, bins + 1, dtype=self.pred_age.weight.dtype))


class _ExpectationSoftmaxOverBatch(reference.ExpectationHead):
    """Softmax over the batch axis instead of the bins."""

    def forward(self, pool5: Tensor) -> dict[str, Tensor]:
        ip: Tensor = self.get_submodule(self.ip_attr)(pool5.reshape(pool5.shape[0], -1))
        prob = reference.softmax(ip, axis=0)
        pred_age: Tensor = self.pred_age(prob)
        return {self.ip_layer: ip, "prob": prob, "pred_age": pred_age}


class _ExpectationTrainableKernel(reference.ExpectationHead):
    """The surgery kernel left trainable: a Parameter, so an optimizer moves it."""

    def __init__(self, in_features: int, bins: int) -> None:
        super().__init__(in_features, bins)
        kernel = self.pred_age.weight.detach().clone()
        del self.pred_age.weight
        self.pred_age.weight = nn.Parameter(kernel)


class _SigmoidTrainableScale(reference.SigmoidScaleHead):
    """The fixed x99 scale left trainable."""

    def __init__(self, in_features: int, scale: float = 99.0) -> None:
        super().__init__(in_features, scale)
        value = self.pred_age.weight.detach().clone()
        del self.pred_age.weight
        self.pred_age.weight = nn.Parameter(value)


def _trainable_kernel(case: Case, dtype: torch.dtype) -> nn.Module:
    return _ExpectationTrainableKernel(case.features, case.bins)


def _trainable_scale(case: Case, dtype: torch.dtype) -> nn.Module:
    return _SigmoidTrainableScale(case.features, case.scale)


def _scale_100(case: Case, dtype: torch.dtype) -> nn.Module:
    return reference.SigmoidScaleHead(case.features, scale=100.0)


def _kernel_from_one(case: Case, dtype: torch.dtype) -> nn.Module:
    return _ExpectationKernelFromOne(case.features, case.bins)


def _softmax_over_batch(case: Case, dtype: torch.dtype) -> nn.Module:
    return _ExpectationSoftmaxOverBatch(case.features, case.bins)


def _mse_for_euclidean(a: Tensor, t: Tensor, case: Case) -> Tensor:
    return F.mse_loss(a, t.reshape(a.shape))


@dataclass(frozen=True)
class Mutant:
    impl: Impl
    head: str
    loss: str
    mistake: str
    shows_in: tuple[str, ...]  # check kinds that must flag it: forward, loss, gradient


MUTANTS: dict[str, Mutant] = {
    m.impl.name: m
    for m in (
        Mutant(
            Impl("scale-100", module=_scale_100),
            "sigmoid_scale",
            "euclidean",
            "fixed scale 100 instead of 99 (ages 0..100)",
            ("forward", "loss", "gradient"),
        ),
        Mutant(
            Impl("kernel-1..K", module=_kernel_from_one),
            "expectation",
            "euclidean",
            "surgery kernel 1..K instead of 0..K-1",
            ("fixed", "forward", "loss"),
        ),
        Mutant(
            Impl("softmax-over-batch", module=_softmax_over_batch),
            "expectation",
            "euclidean",
            "softmax over the batch axis",
            ("forward", "loss", "gradient"),
        ),
        Mutant(
            Impl("mse-for-euclidean", loss=_mse_for_euclidean),
            "sigmoid_scale",
            "euclidean",
            "MSELoss (mean) for EuclideanLoss (sum / 2N)",
            ("loss", "gradient"),
        ),
    )
}

# Ports that compute the same forward and gradients but train a constant: only training
# shows them (crossval.training reports "fixed parameter moved").
TRAINING_MUTANTS: dict[str, Mutant] = {
    m.impl.name: m
    for m in (
        Mutant(
            Impl("trainable-kernel", module=_trainable_kernel),
            "expectation",
            "euclidean",
            "surgery kernel left trainable (requires_grad)",
            ("train",),
        ),
        Mutant(
            Impl("trainable-scale", module=_trainable_scale),
            "sigmoid_scale",
            "euclidean",
            "fixed x99 scale left trainable",
            ("train",),
        ),
    )
}
