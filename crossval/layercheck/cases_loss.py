"""Layer cases for the loss layers (see crossval.layercheck)."""

from __future__ import annotations

from typing import Any

CASES: dict[str, Any] = {}
