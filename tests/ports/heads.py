"""The seed's heads as ports (the contract of `crossval validate-port`): the suite's own
reference, correct and with realistic bugs, for nets with 16 features."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from crossval import reference
from crossval.mutants import catalogue as mutants

FEATURES = 16


def expectation() -> nn.Module:
    return reference.ExpectationHead(FEATURES, 100)


def sigmoid() -> nn.Module:
    return reference.SigmoidScaleHead(FEATURES)


def expectation_kernel_from_one() -> nn.Module:
    """Bins valued 1..K. Diverges first at: ``pred_age``."""
    return mutants._ExpectationKernelFromOne(FEATURES, 100)


def expectation_softmax_over_batch() -> nn.Module:
    """Softmax over the batch axis. Diverges first at: ``prob``."""
    return mutants._ExpectationSoftmaxOverBatch(FEATURES, 100)


def sigmoid_scale_100() -> nn.Module:
    """Scale 100. Diverges first at: ``pred_age``."""
    return reference.SigmoidScaleHead(FEATURES, scale=100.0)


def expectation_trainable_kernel() -> nn.Module:
    """The surgery kernel as a trainable Parameter (same forward)."""
    return mutants._ExpectationTrainableKernel(FEATURES, 100)


class _Renamed(nn.Module):
    """A port whose parameter names are its own (needs --map), with the bias stored as
    (1, K): a singleton axis more than Caffe's (K,)."""

    def __init__(self) -> None:
        super().__init__()
        self.logits_w = nn.Parameter(torch.zeros(100, FEATURES))
        self.logits_b = nn.Parameter(torch.zeros(1, 100))
        self.register_buffer("ages", torch.arange(100, dtype=torch.float32)[None])

    def forward(self, pool5: Tensor) -> dict[str, Tensor]:
        z = pool5 @ self.logits_w.T + self.logits_b
        p = reference.softmax(z)
        return {"fc100": z, "prob": p, "pred_age": p @ self.ages.T}


def renamed() -> nn.Module:
    return _Renamed()


class _WithLoss(nn.Module):
    """The expectation head with EuclideanLoss, returning the loss blob (train nets)."""

    def __init__(self, mse: bool = False) -> None:
        super().__init__()
        self.head = reference.ExpectationHead(FEATURES, 100)
        self.mse = mse

    def forward(self, pool5: Tensor, true_age: Tensor) -> dict[str, Tensor]:
        blobs: dict[str, Tensor] = self.head(pool5)
        if self.mse:
            loss = nn.functional.mse_loss(blobs["pred_age"], true_age.reshape(-1, 1))
        else:
            loss = reference.euclidean_loss(blobs["pred_age"], true_age)
        return {**blobs, "loss": loss}

    def state_dict(self, *args: object, **kwargs: object) -> dict[str, Tensor]:  # type: ignore[override]
        return self.head.state_dict(*args, **kwargs)  # type: ignore[arg-type, return-value]

    def named_parameters(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def, override]
        return self.head.named_parameters(*args, **kwargs)  # type: ignore[arg-type]


def expectation_with_loss() -> nn.Module:
    return _WithLoss()


def expectation_with_mse() -> nn.Module:
    """MSELoss (mean) for EuclideanLoss (sum / 2N). Diverges first at: ``loss``."""
    return _WithLoss(mse=True)
