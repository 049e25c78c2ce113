"""PyTorch references for the two Caffe age-regression heads, built from the reference
layer library (``crossval.reference.layers``): one implementation of each layer in the project.

Each head returns every Caffe blob it computes, keyed by blob name, and names its submodules
after Caffe layers so that ``state_dict()`` keys are ``<layer>.weight`` / ``<layer>.bias``
(Caffe param blob 0 / blob 1). Constants that the Caffe net holds at ``lr_mult: 0`` are
buffers, never parameters. What the heads are (their blobs, learnable and fixed params) is
described once, in ``crossval.heads.HEADS``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from crossval.reference import layers
from crossval.reference.functional import sigmoid, softmax
from crossval.reference.layers import defaults

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


class _InnerProduct(nn.Linear):
    """Caffe InnerProduct (the layer library's), with nn.Linear's parameters and init:
    weight (N, K), bias (N,)."""

    def __init__(self, name: str, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.spec = defaults.layer(name, "InnerProduct", num_output=out_features)

    def forward(self, x: Tensor) -> Tensor:
        return layers.forward(self.spec, [x], [self.weight, self.bias])[0]


class _FixedScale(nn.Module):
    """Caffe Scale with one bottom and a constant scale blob: y = s * x, s of shape (1,)."""

    weight: Tensor

    def __init__(self, name: str, scale: float) -> None:
        super().__init__()
        self.register_buffer("weight", torch.tensor([scale]))
        self.spec = defaults.layer(name, "Scale")

    def forward(self, x: Tensor) -> Tensor:
        return layers.forward(self.spec, [x], [self.weight])[0]


class _FixedConvolution(nn.Module):
    """Caffe Convolution on an N x K blob, no kernel, no bias, constant kernel w: y = x @ w.T."""

    weight: Tensor

    def __init__(self, name: str, kernel: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", kernel)
        self.spec = defaults.layer(name, "Convolution", num_output=1, bias_term=False)

    def forward(self, x: Tensor) -> Tensor:
        return layers.forward(self.spec, [x], [self.weight])[0]


_SIGMOID = defaults.layer("pred01", "Sigmoid")
_SOFTMAX = defaults.layer("prob", "Softmax")


class SigmoidScaleHead(nn.Module):
    """Caffe fc1 -> Sigmoid pred01 -> Scale pred_age: age = scale * sigmoid(W x + b)."""

    def __init__(self, in_features: int, scale: float = 99.0) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        self.in_features = in_features
        self.fc1 = _InnerProduct("fc1", in_features, 1)
        self.pred_age = _FixedScale("pred_age", scale)

    def forward(self, pool5: Tensor) -> dict[str, Tensor]:
        fc1: Tensor = self.fc1(pool5.reshape(pool5.shape[0], -1))
        pred01 = layers.forward(_SIGMOID, [fc1], [])[0]
        pred_age: Tensor = self.pred_age(pred01)
        return {"fc1": fc1, "pred01": pred01, "pred_age": pred_age}


class ExpectationHead(nn.Module):
    """Caffe <ip> -> Softmax prob -> Convolution pred_age: age = sum_i i * softmax(W x + b)_i."""

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
        self.add_module(ip_attr, _InnerProduct(ip_layer, in_features, bins))
        # The "net surgery" kernel: bin i is worth age i.
        kernel = torch.arange(bins, dtype=torch.get_default_dtype())[None]
        self.pred_age = _FixedConvolution("pred_age", kernel)

    def forward(self, pool5: Tensor) -> dict[str, Tensor]:
        ip: Tensor = self.get_submodule(self.ip_attr)(pool5.reshape(pool5.shape[0], -1))
        prob = layers.forward(_SOFTMAX, [ip], [])[0]
        pred_age: Tensor = self.pred_age(prob)
        return {self.ip_layer: ip, "prob": prob, "pred_age": pred_age}
