"""Normalization and affine layers: BatchNorm, Scale, Bias."""

from __future__ import annotations
