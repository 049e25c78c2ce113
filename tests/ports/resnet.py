"""PyTorch port of the ResNet-style block (``crossval.caffe_side.zoo.resnet_block``).

Contract: ``make()`` returns a module in eval mode whose ``forward(data=...)`` takes the
``data`` blob and returns every Caffe blob by name. BatchNorm, Scale and ReLU are in place
in Caffe, so ``conv1`` and ``res2a_branch2a`` are returned after their ReLU,
``res2a_branch2b`` after its Scale, and ``res2a`` after its ReLU.

Weights: convolutions and ``fc`` follow crossval's ``<layer>.weight`` / ``<layer>.bias``
rule; each Scale layer is a module with ``weight`` (gamma) and ``bias`` (beta); each Caffe
BatchNorm keeps Caffe's three blobs as buffers ``mean_sum``, ``var_sum`` and
``scale_factor`` (the statistics are the sums divided by the factor). The third blob has no
default name in crossval's rule, so `caffe_map` gives the explicit mapping (validate-port's
``--map``) for all three.

``make`` and the ``make_*`` variants take ``size``, ``channels``, ``bins`` and ``coeff`` as
``resnet_block`` does. Each ``make_*`` docstring names the first Caffe layer, in Caffe's
order, where the variant goes wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BN_LAYERS",
    "ResNetBlock",
    "caffe_map",
    "make",
    "make_bn_eps_1e3",
    "make_bn_factor_ignored",
    "make_conv_bias",
    "make_eltwise_coeff_ignored",
    "make_scale_without_bias",
]

BN_LAYERS = ("bn_conv1", "bn2a_branch2a", "bn2a_branch2b")


def caffe_map() -> dict[str, str]:
    """``{"<layer>/<blob index>": "<state_dict key>"}`` for the BatchNorm layers."""
    names = ("mean_sum", "var_sum", "scale_factor")
    return {f"{bn}/{i}": f"{bn}.{name}" for bn in BN_LAYERS for i, name in enumerate(names)}


class CaffeBatchNorm(nn.Module):
    """Caffe's BatchNorm with global statistics: (x - mean) / sqrt(var + eps), where mean
    and var are Caffe's stored sums divided by its scale factor (0 when the factor is 0)."""

    mean_sum: Tensor
    var_sum: Tensor
    scale_factor: Tensor

    def __init__(self, channels: int, eps: float = 1e-5, use_factor: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.use_factor = use_factor
        self.register_buffer("mean_sum", torch.zeros(channels))
        self.register_buffer("var_sum", torch.ones(channels))
        self.register_buffer("scale_factor", torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        mean, var = self.mean_sum, self.var_sum
        if self.use_factor:
            f = self.scale_factor[0]
            inv = torch.where(f == 0, torch.zeros_like(f), 1 / f)
            mean, var = mean * inv, var * inv
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + self.eps)


class CaffeScale(nn.Module):
    """Caffe's Scale over the channel axis, with a bias (bias_term: true)."""

    def __init__(self, channels: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = x * self.weight.reshape(shape)
        return y if self.bias is None else y + self.bias.reshape(shape)


class ResNetBlock(nn.Module):
    conv_bias = False
    bn_eps = 1e-5
    bn_factor = True
    scale_bias = True
    use_coeff = True

    def __init__(
        self,
        size: int = 8,
        channels: int = 16,
        bins: int = 8,
        coeff: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        self.coeff = coeff if coeff is not None else (1.0, 1.0)
        c = channels
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=self.conv_bias)
        self.res2a_branch2a = nn.Conv2d(c, c, 3, padding=1, bias=self.conv_bias)
        self.res2a_branch2b = nn.Conv2d(c, c, 3, padding=1, bias=self.conv_bias)
        self.bn_conv1 = CaffeBatchNorm(c, self.bn_eps, self.bn_factor)
        self.bn2a_branch2a = CaffeBatchNorm(c, self.bn_eps, self.bn_factor)
        self.bn2a_branch2b = CaffeBatchNorm(c, self.bn_eps, self.bn_factor)
        self.scale_conv1 = CaffeScale(c, self.scale_bias)
        self.scale2a_branch2a = CaffeScale(c)
        self.scale2a_branch2b = CaffeScale(c)
        self.fc = nn.Linear(c, bins)

    def forward(self, data: Tensor) -> dict[str, Tensor]:
        conv1 = F.relu(self.scale_conv1(self.bn_conv1(self.conv1(data))))
        a = self.res2a_branch2a(conv1)
        a = F.relu(self.scale2a_branch2a(self.bn2a_branch2a(a)))
        b = self.scale2a_branch2b(self.bn2a_branch2b(self.res2a_branch2b(a)))
        c0, c1 = self.coeff if self.use_coeff else (1.0, 1.0)
        res2a = F.relu(c0 * conv1 + c1 * b)
        pool5 = res2a.mean(dim=(2, 3), keepdim=True)
        fc = self.fc(pool5.flatten(1))
        return {
            "data": data,
            "conv1": conv1,
            "res2a_branch2a": a,
            "res2a_branch2b": b,
            "res2a": res2a,
            "pool5": pool5,
            "fc": fc,
            "prob": torch.softmax(fc, dim=1),
        }


class _ConvBias(ResNetBlock):
    conv_bias = True


class _Eps(ResNetBlock):
    bn_eps = 1e-3


class _NoFactor(ResNetBlock):
    bn_factor = False


class _ScaleNoBias(ResNetBlock):
    scale_bias = False


class _NoCoeff(ResNetBlock):
    use_coeff = False


def make(**kw: object) -> nn.Module:
    """The correct port, in eval mode."""
    return ResNetBlock(**kw).eval()  # type: ignore[arg-type]


def make_conv_bias(**kw: object) -> nn.Module:
    """The convolutions keep PyTorch's default bias where Caffe has bias_term: false (a
    weight transfer leaves it at its random initial value).

    Goes wrong first at: ``conv1``."""
    return _ConvBias(**kw).eval()  # type: ignore[arg-type]


def make_bn_eps_1e3(**kw: object) -> nn.Module:
    """BatchNorm with eps 1e-3 (a framework default) where Caffe's is 1e-5.

    Goes wrong first at: ``bn_conv1`` (in place on conv1)."""
    return _Eps(**kw).eval()  # type: ignore[arg-type]


def make_bn_factor_ignored(**kw: object) -> nn.Module:
    """BatchNorm uses Caffe's stored sums as the mean and variance, ignoring the third blob
    (the scale factor they must be divided by).

    Goes wrong first at: ``bn_conv1`` (in place on conv1)."""
    return _NoFactor(**kw).eval()  # type: ignore[arg-type]


def make_scale_without_bias(**kw: object) -> nn.Module:
    """scale_conv1 without its bias (bias_term: true in Caffe); the transfer has nowhere to
    put Caffe's beta.

    Goes wrong first at: ``scale_conv1`` (in place on conv1)."""
    return _ScaleNoBias(**kw).eval()  # type: ignore[arg-type]


def make_eltwise_coeff_ignored(**kw: object) -> nn.Module:
    """The Eltwise SUM as a plain sum, ignoring its coeff.

    Goes wrong first at: ``res2a`` (with coeff other than (1, 1))."""
    return _NoCoeff(**kw).eval()  # type: ignore[arg-type]
