"""DEX-style ports at input size 48 (pool5 is 2 x 2, so flatten order matters)."""

from __future__ import annotations

from torch import nn

from ports import dex


def with_age() -> nn.Module:
    return dex.make_with_age(size=48)


def age_from_one() -> nn.Module:
    return dex.make_age_from_one(size=48)


def flatten_nhwc() -> nn.Module:
    return dex._WithAge(dex.make_flatten_nhwc(size=48))  # type: ignore[arg-type]


def bgr_swap() -> nn.Module:
    return dex._WithAge(dex.make_bgr_swap(size=48))  # type: ignore[arg-type]
