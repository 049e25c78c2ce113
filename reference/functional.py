"""The two squashing functions Caffe's heads and layers share, on tensors (no Caffe params).

The Sigmoid and Softmax layers of ``crossval.reference.layers`` read their Caffe params and call
these; everything else in the project that needs a Caffe sigmoid or softmax goes through
those layers or these functions, so each formula is written once.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sigmoid", "softmax"]


def sigmoid(x: Tensor) -> Tensor:
    """Caffe Sigmoid: y = 0.5 * tanh(0.5 * x) + 0.5, evaluated in double and rounded once."""
    # Caffe's CPU code is `0.5 * tanh(0.5 * x) + 0.5` with double literals, so a float x is
    # promoted and the whole expression runs in double: the float result is the correctly
    # rounded sigmoid, tiny but not 0 far below zero (x = -31 gives 3.4e-14, where the same
    # formula in float32 gives exactly 0).
    return (0.5 * torch.tanh(0.5 * x.double()) + 0.5).to(x.dtype)


def softmax(x: Tensor, axis: int = 1) -> Tensor:
    """Caffe Softmax: p = exp(x - max x) / sum exp(x - max x) over `axis`."""
    # The shift cancels exactly in the math, so its true gradient is zero: detach it.
    e = torch.exp(x - x.amax(dim=axis, keepdim=True).detach())
    return e / e.sum(dim=axis, keepdim=True)
