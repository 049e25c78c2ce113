"""Bounds of the vision layers (see crossval.tolerances.layers)."""

from __future__ import annotations

import numpy as np

from reference.layers import LayerSpec

from . import F64
from .layers import LAYER_BOUNDS, Arrays, linear


def _ip_axis(spec: LayerSpec, x: F64) -> int:
    return int(spec.param("inner_product_param")["axis"]) % x.ndim


def _ip_forward_terms(spec: LayerSpec, bottoms: Arrays, blobs: Arrays) -> int:
    x = bottoms[0]
    k = int(np.prod(x.shape[_ip_axis(spec, x) :]))
    return k + (1 if spec.param("inner_product_param")["bias_term"] else 0)


def _ip_backward_terms(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, top_diffs: Arrays
) -> tuple[list[int], list[int]]:
    x = bottoms[0]
    m = int(np.prod(x.shape[: _ip_axis(spec, x)]))
    n = int(spec.param("inner_product_param")["num_output"])
    return [n], [m] * len(blobs)


LAYER_BOUNDS["InnerProduct"] = linear(_ip_forward_terms, _ip_backward_terms)
