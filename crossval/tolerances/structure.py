"""Bounds of the structural layers (see crossval.tolerances.layers)."""

from __future__ import annotations
