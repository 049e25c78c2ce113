"""Neuron layers (elementwise): ReLU, PReLU, ELU, Sigmoid, TanH, AbsVal, BNLL, Power, Exp,
Log, Dropout."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from reference.layers import LayerSpec, register


@register("ReLU")
def relu(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = max(x, 0) + negative_slope * min(x, 0); Caffe's diff at x = 0 is negative_slope."""
    slope = float(spec.param("relu_param")["negative_slope"])
    (x,) = bottoms
    # Caffe: bottom_diff = top_diff * ((x > 0) + slope * (x <= 0)): the kink at 0 takes the
    # negative side, where autograd of torch.where(x > 0, ...) gives the same.
    return [torch.where(x > 0, x, x * slope)]
