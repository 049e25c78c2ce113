"""Whole Caffe nets (deploy, TEST phase) written with pycaffe's NetSpec, for port checks.

Each builder returns prototxt text with one ``Input`` layer named ``data`` (N x 3 x H x W
for DEX, N x 3 x size x size for the tiny net). Layer and top names are the ones a port must
return its blobs under; see ``tests/ports/`` for PyTorch ports that follow them.

- ``dex_vgg16``: the DEX age net (VGG-16 with a softmax over age bins, as in the released
  ``age.prototxt``). ReLU and Dropout are in place, as in the real VGG prototxt, so after a
  forward the blob ``conv1_1`` holds the post-ReLU value and ``fc6`` / ``fc7`` the
  post-Dropout (in TEST: post-ReLU) value.
- ``tiny_cnn``: a small net of standard layers, nothing in place, for fast tests. Its MAX
  pooling runs on an odd size (9 by default), where Caffe's ceil rounding (5x5) and
  PyTorch's default floor (4x4) disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import caffe
from caffe import layers as L
from caffe import params as P

__all__ = ["ZOO", "dex_vgg16", "tiny_cnn"]

# (block, convolutions in the block, output channels): VGG-16's configuration "D".
VGG16_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (1, 2, 64),
    (2, 2, 128),
    (3, 3, 256),
    (4, 3, 512),
    (5, 3, 512),
)


def _max_pool(bottom: Any) -> Any:
    return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=2, stride=2)


def dex_vgg16(batch: int = 1, size: int = 224, bins: int = 101) -> str:
    """Deploy prototxt of the DEX age net: VGG-16 + ``fc8-<bins>`` + ``prob`` (Softmax)."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 3, size, size]))
    x = n.data
    for block, convs, channels in VGG16_BLOCKS:
        for i in range(1, convs + 1):
            conv = L.Convolution(x, num_output=channels, kernel_size=3, pad=1)
            setattr(n, f"conv{block}_{i}", conv)
            setattr(n, f"relu{block}_{i}", L.ReLU(conv, in_place=True))
            x = conv
        pool = _max_pool(x)
        setattr(n, f"pool{block}", pool)
        x = pool
    n.fc6 = L.InnerProduct(x, num_output=4096)
    n.relu6 = L.ReLU(n.fc6, in_place=True)
    n.drop6 = L.Dropout(n.fc6, dropout_ratio=0.5, in_place=True)
    n.fc7 = L.InnerProduct(n.fc6, num_output=4096)
    n.relu7 = L.ReLU(n.fc7, in_place=True)
    n.drop7 = L.Dropout(n.fc7, dropout_ratio=0.5, in_place=True)
    logits = L.InnerProduct(n.fc7, num_output=bins)
    setattr(n, f"fc8-{bins}", logits)
    n.prob = L.Softmax(logits)
    return str(n.to_proto())


def tiny_cnn(batch: int = 2, size: int = 9, bins: int = 7) -> str:
    """Deploy prototxt of a small CNN: conv, ReLU, MAX pool (ceil), IP, ReLU, Dropout, IP,
    Softmax; every layer writes its own top."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 3, size, size]))
    n.conv1 = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1)
    n.relu1 = L.ReLU(n.conv1)
    n.pool1 = _max_pool(n.relu1)
    n.fc1 = L.InnerProduct(n.pool1, num_output=16)
    n.relu_fc1 = L.ReLU(n.fc1)
    n.drop1 = L.Dropout(n.relu_fc1, dropout_ratio=0.5)
    n.fc2 = L.InnerProduct(n.drop1, num_output=bins)
    n.prob = L.Softmax(n.fc2)
    return str(n.to_proto())


ZOO: dict[str, Callable[..., str]] = {
    "dex_vgg16": dex_vgg16,
    "tiny_cnn": tiny_cnn,
}
