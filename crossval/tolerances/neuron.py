"""Bounds of the neuron (elementwise) layers (see crossval.tolerances.layers)."""

from __future__ import annotations

import numpy as np

from reference.layers import LayerSpec

from . import ETA32, F64, TABLE, U32, Rule
from .layers import LAYER_BOUNDS, Arrays, LayerBound

RULES = (
    Rule(
        "layer_exact_or_one_rounding",
        "a layer that selects, copies or multiplies by one constant (ReLU)",
        "u |y| + ETA32: at most one rounding of the result (none when it only selects)",
    ),
)
TABLE.update({r.name: r for r in RULES})


def _one_rounding_forward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays
) -> list[F64]:
    """See TABLE['layer_exact_or_one_rounding']."""
    return [U32 * np.abs(t) + ETA32 for t in tops]


def _relu_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """g_x = g_y or slope * g_y: one rounding, see TABLE['layer_exact_or_one_rounding']."""
    slope = abs(float(spec.param("relu_param")["negative_slope"]))
    g = np.abs(top_diffs[0]) * np.where(bottoms[0] > 0, 1.0, slope)
    return [U32 * g + ETA32], []


LAYER_BOUNDS["ReLU"] = LayerBound(
    "layer_exact_or_one_rounding",
    _one_rounding_forward,
    "layer_exact_or_one_rounding",
    _relu_backward,
)
