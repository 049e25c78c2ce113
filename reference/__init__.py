"""PyTorch references for the Caffe heads and losses that crossval checks (torch/numpy only)."""

from __future__ import annotations

from crossval.reference.heads import ExpectationHead, SigmoidScaleHead, param_name, sigmoid, softmax
from crossval.reference.losses import (
    FLT_MIN,
    NORMALIZATIONS,
    euclidean_loss,
    smooth_l1_loss,
    softmax_with_loss,
)

__all__ = [
    "FLT_MIN",
    "NORMALIZATIONS",
    "ExpectationHead",
    "SigmoidScaleHead",
    "euclidean_loss",
    "param_name",
    "sigmoid",
    "smooth_l1_loss",
    "softmax",
    "softmax_with_loss",
]
