"""PyTorch port of the tiny CNN (``crossval.caffe_side.zoo.tiny_cnn``).

Contract: ``make()`` returns a module in eval mode whose ``forward(data=...)`` takes the
``data`` blob (float32, N x 3 x size x size) and returns every Caffe blob by name (nothing in
this net is in place). Submodules are named after the Caffe layers, so ``state_dict`` keys
are ``<layer>.weight`` / ``<layer>.bias``.

``make`` and the ``make_*`` variants take optional keyword arguments ``size`` and ``bins``
(defaults 9 and 7, as ``tiny_cnn``'s). The ``make_*`` variants are realistic port bugs
(``/work/shared/notes/port-bugs.md``); each docstring names the first blob, in Caffe's
order, at which the variant differs from Caffe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TinyCNN",
    "make",
    "make_dropout_active",
    "make_functional_dropout",
    "make_pool_floor",
    "make_softmax_dim0",
]


def pooled_size(size: int, ceil_mode: bool, kernel: int = 2, stride: int = 2) -> int:
    """MAX pooling output size without padding: Caffe rounds up, PyTorch by default down."""
    if ceil_mode:
        return -(-(size - kernel) // stride) + 1
    return (size - kernel) // stride + 1


class TinyCNN(nn.Module):
    """conv1 -> relu1 -> pool1 -> fc1 -> relu_fc1 -> drop1 -> fc2 -> prob."""

    ceil_mode = True

    def __init__(self, size: int = 9, bins: int = 7) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        pooled = pooled_size(size, self.ceil_mode)
        self.fc1 = nn.Linear(4 * pooled * pooled, 16)
        self.drop1 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, bins)

    def softmax(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=1)

    def forward(self, data: Tensor) -> dict[str, Tensor]:
        conv1 = self.conv1(data)
        relu1 = F.relu(conv1)
        pool1 = F.max_pool2d(relu1, kernel_size=2, stride=2, ceil_mode=self.ceil_mode)
        fc1 = self.fc1(pool1.reshape(pool1.shape[0], -1))
        relu_fc1 = F.relu(fc1)
        drop1 = self.drop1(relu_fc1)
        fc2 = self.fc2(drop1)
        return {
            "data": data,
            "conv1": conv1,
            "relu1": relu1,
            "pool1": pool1,
            "fc1": fc1,
            "relu_fc1": relu_fc1,
            "drop1": drop1,
            "fc2": fc2,
            "prob": self.softmax(fc2),
        }


class _FloorPooling(TinyCNN):
    ceil_mode = False


class _FunctionalDropout(TinyCNN):
    def __init__(self, size: int = 9, bins: int = 7) -> None:
        super().__init__(size, bins)
        self.drop1 = _AlwaysDropout()


class _AlwaysDropout(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, 0.5)  # training=True by default, whatever eval() says


class _SoftmaxOnSqueezed(TinyCNN):
    def softmax(self, logits: Tensor) -> Tensor:
        # Written and tried on one image: squeeze() leaves (K,), where dim 0 is the bins. With
        # a batch, squeeze() leaves (N, K), and dim 0 is the batch axis.
        return torch.softmax(logits.squeeze(), dim=0).reshape(logits.shape)


def make(*, size: int = 9, bins: int = 7) -> nn.Module:
    """The correct port, in eval mode (Dropout is the identity, as in Caffe's TEST phase)."""
    return TinyCNN(size, bins).eval()


def make_pool_floor(*, size: int = 9, bins: int = 7) -> nn.Module:
    """PyTorch's default floor rounding in pool1 instead of Caffe's ceil.

    Diverges first at: ``pool1`` (4 x 4 instead of Caffe's 5 x 5 at the default odd size 9;
    the same at even sizes). fc1 is sized from this port's own pool1 (16 x 64), so Caffe's
    fc1 weight (16 x 100) does not fit it: a strict weight transfer refuses fc1.
    """
    return _FloorPooling(size, bins).eval()


def make_dropout_active(*, size: int = 9, bins: int = 7) -> nn.Module:
    """Left in train mode: drop1 zeroes half the values and doubles the rest at inference
    (validate-port runs ports in eval(), as deployed, and says so; run as made, it
    diverges).

    Diverges first at: ``drop1`` (random: reseed torch to reproduce a run).
    """
    return TinyCNN(size, bins).train()


def make_functional_dropout(*, size: int = 9, bins: int = 7) -> nn.Module:
    """``F.dropout(x, 0.5)`` in drop1: its ``training`` argument defaults to True, so it
    drops at inference whatever ``eval()`` says.

    Diverges first at: ``drop1`` (random: reseed torch to reproduce a run).
    """
    return _FunctionalDropout(size, bins).eval()


def make_softmax_dim0(*, size: int = 9, bins: int = 7) -> nn.Module:
    """Softmax over dim 0 of the squeezed logits: the bins for one image, the batch otherwise.

    Diverges first at: ``prob``, only with batch > 1 (with batch 1 it matches Caffe).
    """
    return _SoftmaxOnSqueezed(size, bins).eval()
