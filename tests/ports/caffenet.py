"""PyTorch port of the CaffeNet-style age net (``crossval.caffe_side.zoo.caffenet_age``).

Contract: ``make()`` returns a module in eval mode whose ``forward(data=...)`` takes the
``data`` blob and returns every Caffe blob by name (ReLU and Dropout are in place in Caffe:
``conv1``..``conv5``, ``fc6``, ``fc7`` are returned post-ReLU / post-Dropout). Submodules are
named after the Caffe layers. LRN is PyTorch's ``F.local_response_norm``, which matches
Caffe's ACROSS_CHANNELS LRN for an odd local_size (its window is centred, alpha divided by
the size, k = 1).

``make`` and the ``make_*`` variants take optional keyword arguments ``size``, ``bins`` and
``width`` (defaults 227, 8, 1.0, as ``caffenet_age``'s). Each ``make_*`` docstring names the
first Caffe layer, in Caffe's order, where the variant goes wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CaffeNet", "make", "make_dropout_active", "make_groups_interleaved"]


def _even(channels: float) -> int:
    return max(2, 2 * round(channels / 2))


def _pooled(size: int) -> int:
    return -(-(size - 3) // 2) + 1


class InterleavedGroupConv(nn.Conv2d):
    """A grouped convolution fed channels 0, 2, 4, ... to group 0 and 1, 3, 5, ... to group
    1 (a converter that reshapes C as (C / g, g) instead of (g, C / g))."""

    def forward(self, x: Tensor) -> Tensor:
        g = self.groups
        n, c, h, w = x.shape
        x = x.reshape(n, c // g, g, h, w).transpose(1, 2).reshape(n, c, h, w)
        return super().forward(x)


class CaffeNet(nn.Module):
    group_conv: type[nn.Conv2d] = nn.Conv2d

    def __init__(self, size: int = 227, bins: int = 8, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, c4, c5, fc = (_even(c * width) for c in (96, 256, 384, 384, 256, 4096))
        g = self.group_conv
        self.conv1 = nn.Conv2d(3, c1, 11, stride=4)
        self.conv2 = g(c1, c2, 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.conv4 = g(c3, c4, 3, padding=1, groups=2)
        self.conv5 = g(c4, c5, 3, padding=1, groups=2)
        s = _pooled(_pooled(_pooled((size - 11) // 4 + 1)))
        self.fc6 = nn.Linear(c5 * s * s, fc)
        self.drop6 = nn.Dropout(0.5)
        self.fc7 = nn.Linear(fc, fc)
        self.drop7 = nn.Dropout(0.5)
        self.fc8 = nn.Linear(fc, bins)

    def forward(self, data: Tensor) -> dict[str, Tensor]:
        def pool(x: Tensor) -> Tensor:
            return F.max_pool2d(x, 3, 2, ceil_mode=True)

        def lrn(x: Tensor) -> Tensor:
            return F.local_response_norm(x, 5, alpha=1e-4, beta=0.75, k=1.0)

        b: dict[str, Tensor] = {"data": data}
        b["conv1"] = F.relu(self.conv1(data))
        b["pool1"] = pool(b["conv1"])
        b["norm1"] = lrn(b["pool1"])
        b["conv2"] = F.relu(self.conv2(b["norm1"]))
        b["pool2"] = pool(b["conv2"])
        b["norm2"] = lrn(b["pool2"])
        b["conv3"] = F.relu(self.conv3(b["norm2"]))
        b["conv4"] = F.relu(self.conv4(b["conv3"]))
        b["conv5"] = F.relu(self.conv5(b["conv4"]))
        b["pool5"] = pool(b["conv5"])
        b["fc6"] = self.drop6(F.relu(self.fc6(torch.flatten(b["pool5"], 1))))
        b["fc7"] = self.drop7(F.relu(self.fc7(b["fc6"])))
        b["fc8"] = self.fc8(b["fc7"])
        b["prob"] = F.softmax(b["fc8"], dim=1)
        return b


class _Interleaved(CaffeNet):
    group_conv = InterleavedGroupConv


def make(*, size: int = 227, bins: int = 8, width: float = 1.0) -> nn.Module:
    """The correct port, in eval mode."""
    return CaffeNet(size, bins, width).eval()


def make_groups_interleaved(*, size: int = 227, bins: int = 8, width: float = 1.0) -> nn.Module:
    """Grouped convolutions on interleaved channels instead of Caffe's contiguous halves.

    Goes wrong first at: ``conv2`` (the first convolution with group 2)."""
    return _Interleaved(size, bins, width).eval()


def make_dropout_active(*, size: int = 227, bins: int = 8, width: float = 1.0) -> nn.Module:
    """Left in training mode (Dropout active at inference).

    Goes wrong first at: ``drop6`` (in place on fc6)."""
    return CaffeNet(size, bins, width).train()
