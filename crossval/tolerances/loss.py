"""Bounds of the loss layers (see crossval.tolerances.layers)."""

from __future__ import annotations
