"""Vision layers: InnerProduct, Convolution, Deconvolution, Pooling, LRN."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from reference.layers import LayerSpec, register


def canonical_axis(axis: int, ndim: int, layer: LayerSpec) -> int:
    """Caffe's Blob::CanonicalAxisIndex: a negative axis counts from the end."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"layer {layer.name!r}: axis {axis} out of range for a {ndim}-D blob")
    return axis % ndim


@register("InnerProduct")
def inner_product(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """y = x.flatten(axis) @ W.T + b (W stored K x N when transpose)."""
    p = spec.param("inner_product_param")
    (x,) = bottoms
    axis = canonical_axis(int(p["axis"]), x.dim(), spec)
    lead = tuple(x.shape[:axis])
    flat = x.reshape(math.prod(lead), -1)
    w = blobs[0]
    y = flat @ w if p["transpose"] else flat @ w.T
    if p["bias_term"]:
        y = y + blobs[1]
    return [y.reshape(*lead, int(p["num_output"]))]
