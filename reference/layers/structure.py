"""Layers that combine, split or reshape blobs: Eltwise, Concat, Slice, Split, Flatten,
Reshape, Crop, Softmax."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from crossval.reference.functional import softmax as _softmax
from crossval.reference.layers import LayerSpec, register
from crossval.reference.layers.vision import canonical_axis


def _bad(spec: LayerSpec, why: str) -> ValueError:
    return ValueError(f"layer {spec.name!r} ({spec.type}): {why}")


def _same_shapes(spec: LayerSpec, bottoms: Sequence[Tensor]) -> None:
    for i, b in enumerate(bottoms[1:], 1):
        if b.shape != bottoms[0].shape:
            raise _bad(
                spec,
                f"bottom {i} has shape {tuple(b.shape)}, bottom 0 {tuple(bottoms[0].shape)}",
            )


class _Prod(torch.autograd.Function):
    """Caffe's PROD: running product forward; backward the product of the other bottoms
    (stable_prod_grad) or top / bottom_i (NaN where bottom_i is 0, as in Caffe)."""

    @staticmethod
    def forward(ctx: Any, stable: bool, *xs: Tensor) -> Tensor:
        top = xs[0] * xs[1]
        for x in xs[2:]:
            top = top * x
        ctx.stable = stable
        ctx.save_for_backward(top, *xs)
        return top

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        top, *xs = ctx.saved_tensors
        grads: list[Tensor | None] = [None]
        for i, x in enumerate(xs):
            if ctx.stable:
                others = [y for j, y in enumerate(xs) if j != i]
                d = others[0]
                for y in others[1:]:
                    d = d * y
            else:
                d = top / x
            grads.append(d * g)
        return tuple(grads)


def eltwise_max_index(bottoms: Sequence[Tensor]) -> Tensor:
    """Caffe's MAX mask: bottom 1 wins a tie with bottom 0 (`a > b ? 0 : 1`), and a later
    bottom replaces the running maximum only when strictly greater."""
    top = torch.maximum(bottoms[0], bottoms[1])
    idx = torch.where(bottoms[0] > bottoms[1], 0, 1)
    for k, x in enumerate(bottoms[2:], 2):
        idx = torch.where(x > top, k, idx)
        top = torch.where(x > top, x, top)
    return idx


@register("Eltwise")
def eltwise(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = sum_i c_i x_i (SUM), prod_i x_i (PROD), max_i x_i (MAX, diff to one maximum)."""
    p = spec.param("eltwise_param")
    op, coeff = str(p["operation"]), [float(c) for c in p["coeff"]]
    if len(bottoms) < 2:
        raise _bad(spec, f"Eltwise needs at least 2 bottoms, got {len(bottoms)}")
    if coeff and len(coeff) != len(bottoms):
        raise _bad(spec, f"{len(coeff)} coeff for {len(bottoms)} bottoms (one per bottom)")
    if coeff and op == "PROD":
        raise _bad(spec, "coeff is only allowed with operation SUM")
    _same_shapes(spec, bottoms)
    if op == "SUM":
        cs = coeff or [1.0] * len(bottoms)
        top = torch.zeros_like(bottoms[0])
        for c, x in zip(cs, bottoms, strict=True):
            top = top + (x if c == 1.0 else c * x)
        return [top]
    if op == "PROD":
        prod: Tensor = _Prod.apply(bool(p["stable_prod_grad"]), *bottoms)  # type: ignore[no-untyped-call]
        return [prod]
    if op == "MAX":
        idx = eltwise_max_index([b.detach() for b in bottoms])
        return [torch.stack(list(bottoms)).gather(0, idx.unsqueeze(0)).squeeze(0)]
    raise _bad(spec, f"unknown operation {op!r}")


def _legacy_axis(spec: LayerSpec, kind: str, legacy: str, ndim: int) -> int:
    """Caffe's axis for Concat/Slice: the deprecated `<legacy>` (a non-negative axis) when the
    prototxt sets it, else `axis` (negative counts from the end); never both."""
    p = spec.param(kind)
    if spec.has(kind, "axis") and spec.has(kind, legacy):
        raise _bad(spec, f"either axis or {legacy} may be set, not both")
    if spec.has(kind, legacy):
        axis = int(p[legacy])
        if not 0 <= axis < ndim:
            raise _bad(spec, f"{legacy} {axis} out of range for a {ndim}-D blob")
        return axis
    return canonical_axis(int(p["axis"]), ndim, spec)


@register("Concat")
def concat(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = cat(x_0, x_1, ..., axis) (axis from concat_dim when set)."""
    ndim = bottoms[0].dim()
    axis = _legacy_axis(spec, "concat_param", "concat_dim", ndim)
    for i, b in enumerate(bottoms[1:], 1):
        other = [d for j, d in enumerate(b.shape) if j != axis]
        first = [d for j, d in enumerate(bottoms[0].shape) if j != axis]
        if b.dim() != ndim or other != first:
            raise _bad(
                spec,
                f"bottom {i} has shape {tuple(b.shape)}, incompatible with bottom 0 "
                f"{tuple(bottoms[0].shape)} outside axis {axis}",
            )
    return [torch.cat(list(bottoms), dim=axis)]


@register("Slice")
def slice_(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y_i = x[..., p_{i-1}:p_i, ...] along axis (slice_point, or equal parts per top)."""
    (x,) = bottoms
    axis = _legacy_axis(spec, "slice_param", "slice_dim", x.dim())
    points = [int(v) for v in spec.param("slice_param")["slice_point"]]
    ntops, size = len(spec.tops), x.shape[axis]
    if points:
        if len(points) != ntops - 1:
            raise _bad(spec, f"{len(points)} slice_point for {ntops} tops (need {ntops - 1})")
        if ntops > size:
            raise _bad(spec, f"{ntops} tops for axis {axis} of size {size}")
        bounds = [0, *points, size]
        widths = [b - a for a, b in itertools.pairwise(bounds)]
        if any(w <= 0 for w in widths[:-1]) or widths[-1] < 0:
            raise _bad(spec, f"slice_point {points} not increasing within (0, {size}]")
    else:
        if size % ntops:
            raise _bad(spec, f"{ntops} tops do not divide axis {axis} of size {size}")
        widths = [size // ntops] * ntops
    return list(torch.split(x, widths, dim=axis))


@register("Split")
def split(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y_i = x for every top; the bottom's diff is the sum of the tops' diffs."""
    (x,) = bottoms
    return [x.view(x.shape) for _ in spec.tops]


@register("Flatten")
def flatten(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = x with axes axis..end_axis merged into one."""
    (x,) = bottoms
    p = spec.param("flatten_param")
    start = canonical_axis(int(p["axis"]), x.dim(), spec)
    end = canonical_axis(int(p["end_axis"]), x.dim(), spec)
    if end + 1 < start:
        raise _bad(spec, f"end_axis {p['end_axis']} is before axis {p['axis']}")
    shape = (*x.shape[:start], math.prod(x.shape[start : end + 1]), *x.shape[end + 1 :])
    return [x.reshape(shape)]


def reshape_shape(spec: LayerSpec, shape: Sequence[int]) -> tuple[int, ...]:
    """Caffe's Reshape top shape: dims 0 copy the bottom's, one -1 is inferred, over the axes
    [axis, axis + num_axes) of the bottom (axis < 0 counts from the end, -1 = after the last)."""
    p = spec.param("reshape_param")
    dims = [int(d) for d in p["shape"]["dim"]]
    ndim = len(shape)
    axis, num_axes = int(p["axis"]), int(p["num_axes"])
    start = axis if axis >= 0 else ndim + axis + 1
    if not 0 <= start <= ndim:
        raise _bad(spec, f"axis {axis} out of range for a {ndim}-D bottom")
    if num_axes < -1:
        raise _bad(spec, f"num_axes {num_axes} must be >= 0, or -1 for all")
    end = ndim if num_axes == -1 else start + num_axes
    if end > ndim:
        raise _bad(spec, f"axis + num_axes = {end} beyond the {ndim}-D bottom")
    if dims.count(-1) > 1:
        raise _bad(spec, f"shape {dims} has more than one -1")
    if any(d < -1 for d in dims):
        raise _bad(spec, f"shape {dims} has a dimension below -1")
    top = [*shape[:start], *dims, *shape[end:]]
    for i, d in enumerate(dims):
        if d == 0:
            if start + i >= ndim:
                raise _bad(spec, f"shape {dims}: a 0 at {i} has no bottom axis to copy")
            top[start + i] = shape[start + i]
    total = math.prod(shape)
    if -1 in dims:
        known = math.prod(d for j, d in enumerate(top) if j != start + dims.index(-1))
        if known == 0 or total % known:
            raise _bad(spec, f"count {total} is not divisible by the given dims {known}")
        top[start + dims.index(-1)] = total // known
    if math.prod(top) != total:
        raise _bad(spec, f"top shape {top} has count {math.prod(top)}, bottom {total}")
    return tuple(top)


@register("Reshape")
def reshape(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = x viewed with reshape_param's shape (0 copies a dim, -1 is inferred)."""
    (x,) = bottoms
    return [x.reshape(reshape_shape(spec, tuple(x.shape)))]


@register("Crop")
def crop(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = x[..., o_a : o_a + s_a, ...] over axes a >= axis, s the shape of bottom 1."""
    if len(bottoms) != 2:
        raise _bad(spec, f"Crop needs 2 bottoms, got {len(bottoms)}")
    x, like = bottoms
    p = spec.param("crop_param")
    ndim = x.dim()
    start = canonical_axis(int(p["axis"]), ndim, spec)
    offsets = [int(o) for o in p["offset"]]
    if len(offsets) > 1 and start + len(offsets) != ndim:
        raise _bad(spec, f"{len(offsets)} offsets for the {ndim - start} axes from {start}")
    if like.dim() < ndim:
        raise _bad(spec, f"bottom 1 has {like.dim()} axes, fewer than bottom 0's {ndim}")
    index: list[slice] = []
    for a in range(ndim):
        if a < start:
            index.append(slice(None))
            continue
        o = offsets[0] if len(offsets) == 1 else offsets[a - start] if offsets else 0
        size = like.shape[a]
        if x.shape[a] - o < size:
            raise _bad(
                spec, f"crop of axis {a} out of bounds: size {size}, offset {o}, of {x.shape[a]}"
            )
        index.append(slice(o, o + size))
    return [x[tuple(index)]]


@register("Softmax")
def softmax(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """p = exp(x - max x) / sum exp(x - max x) along axis."""
    (x,) = bottoms
    axis = canonical_axis(int(spec.param("softmax_param")["axis"]), x.dim(), spec)
    return [_softmax(x, axis)]
