"""PyTorch port of the inception block (``crossval.caffe_side.zoo.googlenet_block``).

Contract: ``make()`` returns a module in eval mode whose ``forward(data=...)`` takes the
``data`` blob and returns every Caffe blob by name (names with "/"; the convolutions' ReLUs
are in place in Caffe, so each convolution's blob is returned post-ReLU, and
``pool5/7x7_s1`` post-Dropout). Submodules are named after the Caffe layers with "/" as "_"
(``inception_3a/1x1`` is ``inception_3a_1x1``), so ``state_dict`` keys follow crossval's
weight-naming rule.

``make`` and the ``make_*`` variants take the keyword arguments of ``googlenet_block``
(``size``, ``channels``, ``bins``, ``width``, ``global_pool``, ``branch_pool``; ``batch`` is
not needed). Each ``make_*`` docstring names the first Caffe layer, in Caffe's order, where
the variant goes wrong.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Inception", "make", "make_ave_pool_exclude_pad", "make_concat_pre_relu"]

P = "inception_3a/"


class Inception(nn.Module):
    count_include_pad = True

    def __init__(
        self,
        size: int = 28,
        channels: int = 192,
        bins: int = 8,
        width: float = 1.0,
        global_pool: bool = False,
        branch_pool: str = "MAX",
    ) -> None:
        super().__init__()
        w = [max(1, round(c * width)) for c in (64, 96, 128, 16, 32, 32)]
        self.inception_3a_1x1 = nn.Conv2d(channels, w[0], 1)
        self.inception_3a_3x3_reduce = nn.Conv2d(channels, w[1], 1)
        self.inception_3a_3x3 = nn.Conv2d(w[1], w[2], 3, padding=1)
        self.inception_3a_5x5_reduce = nn.Conv2d(channels, w[3], 1)
        self.inception_3a_5x5 = nn.Conv2d(w[3], w[4], 5, padding=2)
        self.inception_3a_pool_proj = nn.Conv2d(channels, w[5], 1)
        self.branch_pool = branch_pool
        self.global_pool = global_pool
        pooled = 1 if global_pool else size - 7 + 1
        self.pool5_drop_7x7_s1 = nn.Dropout(0.4)
        self.loss3_classifier = nn.Linear(sum((w[0], w[2], w[4], w[5])) * pooled * pooled, bins)

    def join(self, b: dict[str, Tensor]) -> Tensor:
        return torch.cat([b[P + n] for n in ("1x1", "3x3", "5x5", "pool_proj")], dim=1)

    def forward(self, data: Tensor) -> dict[str, Tensor]:
        b: dict[str, Tensor] = {"data": data}
        b[P + "1x1"] = F.relu(self.inception_3a_1x1(data))
        b[P + "3x3_reduce"] = F.relu(self.inception_3a_3x3_reduce(data))
        b[P + "3x3"] = F.relu(self.inception_3a_3x3(b[P + "3x3_reduce"]))
        b[P + "5x5_reduce"] = F.relu(self.inception_3a_5x5_reduce(data))
        b[P + "5x5"] = F.relu(self.inception_3a_5x5(b[P + "5x5_reduce"]))
        if self.branch_pool == "MAX":
            b[P + "pool"] = F.max_pool2d(data, 3, 1, padding=1)
        else:
            b[P + "pool"] = F.avg_pool2d(
                data, 3, 1, padding=1, count_include_pad=self.count_include_pad
            )
        b[P + "pool_proj"] = F.relu(self.inception_3a_pool_proj(b[P + "pool"]))
        b[P + "output"] = self.join(b)
        out = b[P + "output"]
        if self.global_pool:
            pool5 = out.mean(dim=(2, 3), keepdim=True)
        else:
            pool5 = F.avg_pool2d(out, 7, 1)
        b["pool5/7x7_s1"] = self.pool5_drop_7x7_s1(pool5)
        b["loss3/classifier"] = self.loss3_classifier(b["pool5/7x7_s1"].flatten(1))
        b["prob"] = F.softmax(b["loss3/classifier"], dim=1)
        return b


class _ExcludePad(Inception):
    count_include_pad = False


class _ConcatPreReLU(Inception):
    def join(self, b: dict[str, Tensor]) -> Tensor:
        # The blob is named after the convolution, whose in-place ReLU a converter missed:
        # it joins the convolutions' outputs before their ReLU.
        pre = [
            self.inception_3a_1x1(b["data"]),
            self.inception_3a_3x3(b[P + "3x3_reduce"]),
            self.inception_3a_5x5(b[P + "5x5_reduce"]),
            self.inception_3a_pool_proj(b[P + "pool"]),
        ]
        return torch.cat(pre, dim=1)


def make(**kw: Any) -> nn.Module:
    """The correct port, in eval mode."""
    return Inception(**kw).eval()


def make_ave_pool_exclude_pad(**kw: Any) -> nn.Module:
    """AVE pooling with ``count_include_pad=False``: Caffe divides border windows by the
    full 3 x 3 (padding counted).

    Goes wrong first at: ``inception_3a/pool`` (with ``branch_pool="AVE"``)."""
    return _ExcludePad(**kw).eval()


def make_concat_pre_relu(**kw: Any) -> nn.Module:
    """The Concat joins the branch convolutions' values before their in-place ReLUs (the
    blobs it returns under the convolutions' names are right).

    Goes wrong first at: ``inception_3a/output``."""
    return _ConcatPreReLU(**kw).eval()
