"""Bounds of the normalization and affine layers (see crossval.tolerances.layers)."""

from __future__ import annotations
