"""PyTorch port of the DEX age net (``crossval.caffe_side.zoo.dex_vgg16``).

Contract: ``make()`` returns a module in eval mode whose ``forward(data=...)`` takes the
``data`` blob (float32, N x 3 x size x size) and returns every Caffe blob by name. Caffe's
ReLU and Dropout run in place, so the blob ``conv1_1`` holds the post-ReLU value after a
forward, and ``fc6`` / ``fc7`` the post-Dropout value (in TEST: the post-ReLU value); those
are what this port returns under those names. Submodules are named after the Caffe layers
(``fc8-101`` becomes ``fc8_101``), so ``state_dict`` keys are ``<layer>.weight`` /
``<layer>.bias``.

``make`` and the ``make_*`` variants take optional keyword arguments ``size`` and ``bins``
(defaults 224 and 101, as ``dex_vgg16``'s). The ``make_*`` variants are realistic port bugs
(``/work/shared/notes/port-bugs.md``); each docstring names the first blob, in Caffe's
order, at which the variant differs from Caffe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DexVGG16", "make", "make_bgr_swap", "make_flatten_nhwc"]

# (block, convolutions in the block, output channels): VGG-16's configuration "D".
VGG16_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (1, 2, 64),
    (2, 2, 128),
    (3, 3, 256),
    (4, 3, 512),
    (5, 3, 512),
)


def caffe_pooled_size(size: int, kernel: int = 2, stride: int = 2) -> int:
    """Caffe's MAX pooling output size without padding: rounded up, not down."""
    return -(-(size - kernel) // stride) + 1


class DexVGG16(nn.Module):
    """VGG-16 with ``fc8-<bins>`` and a softmax over the age bins, as Caffe computes it."""

    def __init__(self, size: int = 224, bins: int = 101) -> None:
        super().__init__()
        self.conv_names: list[tuple[str, ...]] = []
        channels_in = 3
        spatial = size
        for block, convs, channels in VGG16_BLOCKS:
            names = []
            for i in range(1, convs + 1):
                name = f"conv{block}_{i}"
                self.add_module(name, nn.Conv2d(channels_in, channels, 3, padding=1))
                names.append(name)
                channels_in = channels
            self.conv_names.append(tuple(names))
            spatial = caffe_pooled_size(spatial)
        self.fc6 = nn.Linear(channels_in * spatial * spatial, 4096)
        self.drop6 = nn.Dropout(0.5)
        self.fc7 = nn.Linear(4096, 4096)
        self.drop7 = nn.Dropout(0.5)
        self.logits_blob = f"fc8-{bins}"
        self.logits_attr = f"fc8_{bins}"
        self.add_module(self.logits_attr, nn.Linear(4096, bins))

    def preprocess(self, data: Tensor) -> Tensor:
        """The input as conv1_1 sees it: Caffe feeds the ``data`` blob unchanged (BGR)."""
        return data

    def flatten(self, x: Tensor) -> Tensor:
        """Caffe's InnerProduct flattens N x C x H x W in C, H, W order."""
        return x.reshape(x.shape[0], -1)

    def forward(self, data: Tensor) -> dict[str, Tensor]:
        blobs: dict[str, Tensor] = {"data": data}
        x = self.preprocess(data)
        for block, names in enumerate(self.conv_names, start=1):
            for name in names:
                x = F.relu(self.get_submodule(name)(x))
                blobs[name] = x  # in place in Caffe: the blob holds the post-ReLU value
            x = F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
            blobs[f"pool{block}"] = x
        fc6 = self.drop6(F.relu(self.fc6(self.flatten(x))))
        blobs["fc6"] = fc6
        fc7 = self.drop7(F.relu(self.fc7(fc6)))
        blobs["fc7"] = fc7
        logits: Tensor = self.get_submodule(self.logits_attr)(fc7)
        blobs[self.logits_blob] = logits
        blobs["prob"] = torch.softmax(logits, dim=1)
        return blobs


class _FlattenNHWC(DexVGG16):
    def flatten(self, x: Tensor) -> Tensor:
        # The TensorFlow habit: channels last before the first fully connected layer.
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


class _RGBInput(DexVGG16):
    def preprocess(self, data: Tensor) -> Tensor:
        # "Convert BGR to RGB" for a net that was trained on Caffe's BGR input.
        return data.flip(1)


def make(*, size: int = 224, bins: int = 101) -> nn.Module:
    """The correct port, in eval mode (Dropout is the identity, as in Caffe's TEST phase)."""
    return DexVGG16(size, bins).eval()


def make_flatten_nhwc(*, size: int = 224, bins: int = 101) -> nn.Module:
    """Flattens pool5 channels-last (N, H, W, C) before fc6 instead of Caffe's N, C, H, W.

    Diverges first at: ``fc6``. Every blob up to ``pool5`` matches Caffe. Invisible when
    pool5 is 1 x 1 (input size 32 or less), where both orders are the same.
    """
    return _FlattenNHWC(size, bins).eval()


def make_bgr_swap(*, size: int = 224, bins: int = 101) -> nn.Module:
    """Swaps the input channels (BGR <-> RGB) before conv1_1.

    Diverges first at: ``conv1_1``. The returned ``data`` is the input as given.
    """
    return _RGBInput(size, bins).eval()


class _WithAge(nn.Module):
    """A DEX port as people deploy it: the net, then age = sum_i i * p_i computed outside it
    (the blob the seed's expectation head calls `pred_age`)."""

    def __init__(self, net: DexVGG16, first_age: int = 0) -> None:
        super().__init__()
        self.net = net
        self.first_age = first_age

    def forward(self, data: Tensor) -> dict[str, Tensor]:
        blobs: dict[str, Tensor] = self.net(data)
        prob = blobs["prob"]
        ages = torch.arange(self.first_age, self.first_age + prob.shape[1], dtype=prob.dtype)
        blobs["pred_age"] = (prob * ages).sum(dim=1, keepdim=True)
        return blobs

    def state_dict(self, *args: object, **kwargs: object) -> dict[str, Tensor]:  # type: ignore[override]
        # Keys as the Caffe layers are named (no "net." prefix): the weight-naming rule.
        return self.net.state_dict(*args, **kwargs)  # type: ignore[arg-type, return-value]

    def named_parameters(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def, override]
        return self.net.named_parameters(*args, **kwargs)  # type: ignore[arg-type]


def make_with_age(*, size: int = 224, bins: int = 101) -> nn.Module:
    """The correct port plus the age computed from its probabilities (bins 0..K-1)."""
    return _WithAge(DexVGG16(size, bins).eval()).eval()


def make_age_from_one(*, size: int = 224, bins: int = 101) -> nn.Module:
    """Ages 1..K instead of 0..K-1 (a public DEX port does this: +1 year on every age).

    Diverges first at: ``pred_age``.
    """
    return _WithAge(DexVGG16(size, bins).eval(), first_age=1).eval()
