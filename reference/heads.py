"""PyTorch references for the two Caffe age-regression heads.

Each head returns every Caffe blob it computes, keyed by blob name, and names its submodules
after Caffe layers so that ``state_dict()`` keys are ``<layer>.weight`` / ``<layer>.bias``
(Caffe param blob 0 / blob 1). Constants that the Caffe net holds at ``lr_mult: 0`` are
buffers, never parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ExpectationHead",
    "SigmoidScaleHead",
    "param_name",
    "sigmoid",
    "softmax",
]


def param_name(layer: str) -> str:
    """Attribute name for Caffe layer `layer`: each non-identifier character becomes `_`."""
    if not layer:
        raise ValueError("a Caffe layer name must not be empty")
    name = "".join(c if ("_" + c).isidentifier() else "_" for c in layer)
    # A leading digit is legal inside an identifier but not first: prefix rather than replace,
    # so "8a" and "9a" stay distinct.
    return name if name.isidentifier() else "_" + name


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


class _FixedScale(nn.Module):
    """Caffe Scale with one bottom and a constant scale blob: y = s * x, s of shape (1,)."""

    weight: Tensor

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.register_buffer("weight", torch.tensor([scale]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class _FixedConvolution(nn.Module):
    """Caffe Convolution on an N x K blob, no kernel, no bias, constant kernel w: y = x @ w.T."""

    weight: Tensor

    def __init__(self, kernel: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", kernel)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class SigmoidScaleHead(nn.Module):
    """Caffe fc1 -> Sigmoid pred01 -> Scale pred_age: age = scale * sigmoid(W x + b)."""

    ip_layer = "fc1"
    blobs: tuple[str, ...] = ("fc1", "pred01", "pred_age")
    output_blob = "pred_age"
    fixed: tuple[str, ...] = ("pred_age.weight",)
    learnable: tuple[str, ...] = ("fc1.weight", "fc1.bias")

    def __init__(self, in_features: int, scale: float = 99.0) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        self.in_features = in_features
        self.fc1 = nn.Linear(in_features, 1)
        self.pred_age = _FixedScale(scale)

    def forward(self, pool5: Tensor) -> dict[str, Tensor]:
        fc1: Tensor = self.fc1(pool5.reshape(pool5.shape[0], -1))
        pred01 = sigmoid(fc1)
        pred_age: Tensor = self.pred_age(pred01)
        return {"fc1": fc1, "pred01": pred01, "pred_age": pred_age}


class ExpectationHead(nn.Module):
    """Caffe <ip> -> Softmax prob -> Convolution pred_age: age = sum_i i * softmax(W x + b)_i."""

    output_blob = "pred_age"

    def __init__(self, in_features: int, bins: int = 100, ip_name: str | None = None) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        ip_layer = f"fc{bins}" if ip_name is None else ip_name
        ip_attr = param_name(ip_layer)
        if ip_layer in ("prob", "pred_age") or ip_attr in ("prob", "pred_age"):
            raise ValueError(f"InnerProduct layer name {ip_layer!r} clashes with prob/pred_age")
        self.in_features = in_features
        self.bins = bins
        self.ip_layer = ip_layer
        self.ip_attr = ip_attr
        self.add_module(ip_attr, nn.Linear(in_features, bins))
        # The "net surgery" kernel: bin i is worth age i.
        self.pred_age = _FixedConvolution(torch.arange(bins, dtype=torch.get_default_dtype())[None])

    @property
    def blobs(self) -> tuple[str, ...]:
        return (self.ip_layer, "prob", "pred_age")

    @property
    def fixed(self) -> tuple[str, ...]:
        return ("pred_age.weight",)

    @property
    def learnable(self) -> tuple[str, ...]:
        return (f"{self.ip_attr}.weight", f"{self.ip_attr}.bias")

    def forward(self, pool5: Tensor) -> dict[str, Tensor]:
        ip: Tensor = self.get_submodule(self.ip_attr)(pool5.reshape(pool5.shape[0], -1))
        prob = softmax(ip, axis=1)
        pred_age: Tensor = self.pred_age(prob)
        return {self.ip_layer: ip, "prob": prob, "pred_age": pred_age}
