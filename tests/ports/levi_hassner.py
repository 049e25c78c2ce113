"""PyTorch port of Levi and Hassner's age net (``crossval.caffe_side.zoo.levi_hassner_age``).

Contract: ``make()`` returns a module in eval mode whose ``forward(data=...)`` takes the
``data`` blob (float32, N x 3 x size x size) and returns every Caffe blob by name. ReLU and
Dropout run in place in Caffe, so ``conv1`` is returned post-ReLU and ``fc6`` / ``fc7``
post-Dropout (in TEST: post-ReLU). Submodules are named after the Caffe layers, so
``state_dict`` keys are ``<layer>.weight`` / ``<layer>.bias``.

``make`` and the ``make_*`` variants take optional keyword arguments ``size`` and ``bins``
(defaults 227 and 8). The ``make_*`` variants are realistic port bugs; each docstring names
the first Caffe layer, in Caffe's order, where the variant goes wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LeviHassner",
    "make",
    "make_dropout_active",
    "make_lrn_alpha_unscaled",
    "make_pool_floor",
    "make_softmax_batch_axis",
]


def pooled(size: int, ceil: bool = True, kernel: int = 3, stride: int = 2) -> int:
    """Pooled size without padding: Caffe rounds up; PyTorch by default down."""
    span = size - kernel
    return (-(-span // stride) if ceil else span // stride) + 1


class LeviHassner(nn.Module):
    ceil_mode = True
    lrn_alpha_per_window = True

    def __init__(self, size: int = 227, bins: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 7, stride=4)
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        s = (size - 7) // 4 + 1
        for _ in range(3):
            s = pooled(s, self.ceil_mode)
        self.fc6 = nn.Linear(384 * s * s, 512)
        self.drop6 = nn.Dropout(0.5)
        self.fc7 = nn.Linear(512, 512)
        self.drop7 = nn.Dropout(0.5)
        self.fc8 = nn.Linear(512, bins)

    def pool(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, 3, 2, ceil_mode=self.ceil_mode)

    def lrn(self, x: Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75) -> Tensor:
        """Across channels: x / (1 + alpha/size * sum of squares in the window)^beta."""
        sq = F.pad(x * x, (0, 0, 0, 0, size // 2, size // 2))
        window = sum(sq[:, i : i + x.shape[1]] for i in range(size))
        a = alpha / size if self.lrn_alpha_per_window else alpha
        return x / (1.0 + a * window) ** beta

    def softmax(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=1)

    def forward(self, data: Tensor) -> dict[str, Tensor]:
        conv1 = F.relu(self.conv1(data))
        pool1 = self.pool(conv1)
        norm1 = self.lrn(pool1)
        conv2 = F.relu(self.conv2(norm1))
        pool2 = self.pool(conv2)
        norm2 = self.lrn(pool2)
        conv3 = F.relu(self.conv3(norm2))
        pool5 = self.pool(conv3)
        fc6 = self.drop6(F.relu(self.fc6(pool5.flatten(1))))
        fc7 = self.drop7(F.relu(self.fc7(fc6)))
        fc8 = self.fc8(fc7)
        return {
            "data": data,
            "conv1": conv1,
            "pool1": pool1,
            "norm1": norm1,
            "conv2": conv2,
            "pool2": pool2,
            "norm2": norm2,
            "conv3": conv3,
            "pool5": pool5,
            "fc6": fc6,
            "fc7": fc7,
            "fc8": fc8,
            "prob": self.softmax(fc8),
        }


class _Floor(LeviHassner):
    ceil_mode = False


class _AlphaUnscaled(LeviHassner):
    lrn_alpha_per_window = False


class _SoftmaxBatch(LeviHassner):
    def softmax(self, logits: Tensor) -> Tensor:
        out: Tensor = nn.Softmax(dim=0)(logits)
        return out


def make(*, size: int = 227, bins: int = 8) -> nn.Module:
    """The correct port, in eval mode."""
    return LeviHassner(size, bins).eval()


def make_pool_floor(*, size: int = 227, bins: int = 8) -> nn.Module:
    """PyTorch's floor rounding in every MAX pool (ceil_mode left False).

    Goes wrong first at: ``pool1`` (56 -> 27 at 227 where Caffe gives 28; 16 -> 7 at 67)."""
    return _Floor(size, bins).eval()


def make_lrn_alpha_unscaled(*, size: int = 227, bins: int = 8) -> nn.Module:
    """LRN with alpha times the window sum, where Caffe uses alpha / local_size.

    Goes wrong first at: ``norm1``."""
    return _AlphaUnscaled(size, bins).eval()


def make_dropout_active(*, size: int = 227, bins: int = 8) -> nn.Module:
    """Left in training mode: drop6 and drop7 drop half the units and double the rest.

    Goes wrong first at: ``drop6`` (in place on fc6)."""
    return LeviHassner(size, bins).train()


def make_softmax_batch_axis(*, size: int = 227, bins: int = 8) -> nn.Module:
    """Softmax over dim 0 (the batch) instead of Caffe's axis 1.

    Goes wrong first at: ``prob`` (with batch > 1)."""
    return _SoftmaxBatch(size, bins).eval()
