"""A big linear layer checked on a random sample of its elements.

The float64 reference of every element of every layer, with its bound, costs many times a
float32 forward and backward: on VGG-16 at 224 the Convolutions alone are 15 G multiply-adds
per pass, and the reference and its bound take six passes in float64 per side. A local check
does not need every element: a layer computed wrongly is wrong at many of its elements, or at
elements we know where to look for (the borders, where padding and rounding mistakes live).

A Convolution (two spatial axes) or InnerProduct, alone or with ReLUs and TEST Dropouts in
place on its top (``segments`` rule ``segment_chain``), whose one pass costs more than
``SAMPLE_ABOVE`` multiply-adds (or an InnerProduct whose weight has ``SAMPLE_WEIGHTS``
elements or more: checked whole, its weight diff, bound and comparison are float64 arrays
that size whatever the batch) is checked on restricted problems, each of which the float64
reference computes exactly as it computes those elements inside the whole layer, through
``segments.segment`` (the same reference, the same chain logic, the same bounds):

- a slab: ``SLAB`` output channels (Convolution, of one group) or outputs (InnerProduct),
  drawn at random, over every image and position: the layer with num_output cut to them
  gives their tops (every border and padded position of those channels) and their weight
  and bias diffs, which sum over every image and position and so are whole. A
  Convolution's slab is computed on strips of top rows, each the layer without padding on
  the rows of the bottom it reads (padded by hand with Caffe's zeros), stacked as images:
  every top element sums the same products, and a weight diff sums over the N S strips of
  R rows the same N H W terms (torch's float64 convolution unfolds the whole bottom at
  once, out of cache; ``tolerances.layers.forward`` runs it image by image);
- output patches (Convolution): ``PATCHES`` windows of ``SIDE`` x ``SIDE`` top positions, every
  channel, one image each, the first on an edge of the top: the layer without padding on the
  crop of the bottom they read, padded by hand with Caffe's zeros;
- bottom patches: windows of bottom positions, every channel, one image each, the first on an
  edge: the crop read by every top position that reads them, so each of their diffs sums
  every term it sums in the whole layer (InnerProduct: one whole image).

The terms counted in each bound are the whole layer's: a slab's top sums the same
C k products and its weight diffs the same N H W terms, a patch's bottom diffs the same
num_output / group k terms. So every compared element has the value and the bound it has
in the exhaustive check, and is compared with the same element of the port or of Caffe.

Why sampling and not a random projection (Freivalds' check: compare r . y with r . f(x) for
a random r): the projection's bound is the sum of every element's bound, so an error that
moves a few elements by a little more than their own bound hides in it, and a failure could
no longer name the element. Sampling keeps each element's own bound and coordinates.
What it gives up: a mistake confined to few elements that no sample meets. The slab meets
every position of its channels (padding, rounding of the output size, the last rows) and the
patches every channel of theirs (a channel or group permutation, a missing bias); a wrong
kernel, stride, dilation or weight layout changes nearly every element. Examples repeat the
draw with other channels and positions, so a mistake present at a fraction f of a layer's
elements escapes k examples of s samples each with chance (1 - f)^(k s).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from crossval.reference.layers import LayerSpec
from crossval.reference.layers.vision import conv_geometry

from . import F64, TABLE, Rule

SAMPLE_ABOVE = 2**25  # multiply-adds of one pass of the layer above which it is sampled
SAMPLE_WEIGHTS = 2**24  # elements of an InnerProduct's weight from which it is sampled
SLAB = 2  # output channels of a Convolution's slab (InnerProduct: 8 outputs)
SLAB_IP = 8
PATCHES = 2  # output patches and bottom patches, each
SIDE = 3  # a patch is SIDE x SIDE positions
STRIP = 2**19  # elements of a slab strip's unfolded bottom (see _strip_rows)

TABLE["sampled"] = Rule(
    "sampled",
    "a Convolution or InnerProduct (with ReLU / Dropout in place) too big to check whole",
    "each compared element's own bound, as in the exhaustive check: restricted problems "
    "(a slab of output channels, windows of top and bottom positions) computed by the same "
    "float64 reference with the whole layer's term counts (crossval.tolerances.sampled)",
)

Idx = NDArray[np.int64]


def macs(layers: Sequence[LayerSpec], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Multiply-adds of one forward pass of the segment's linear layer (0: not samplable)."""
    head = layers[0]
    if len(head.bottoms) != 1 or len(head.tops) != 1:
        return 0
    shape = tuple(shapes[head.bottoms[0]])
    if head.type == "Convolution":
        try:
            g = conv_geometry(head, shape)
        except ValueError:
            return 0  # the reference rejects it: the exhaustive check says why
        if g.axis != 1 or g.spatial != 2 or len(shape) != 4:
            return 0
        out = [(shape[2 + i] + 2 * g.pad[i] - g.extent(i)) // g.stride[i] + 1 for i in range(2)]
        if min(out) <= 0:
            return 0
        return shape[0] * g.num_output * out[0] * out[1] * shape[1] // g.group * math.prod(g.kernel)
    if head.type == "InnerProduct":
        p = head.param("inner_product_param")
        if int(p["axis"]) not in (1, 1 - len(shape)) or len(shape) < 2:
            return 0
        return shape[0] * math.prod(shape[1:]) * int(p["num_output"])
    return 0


def worth_it(layers: Sequence[LayerSpec], shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Sampled: more than ``SAMPLE_ABOVE`` multiply-adds a pass, or an InnerProduct whose
    weight has ``SAMPLE_WEIGHTS`` elements or more (checked whole, its weight diff, the
    bound's magnitudes and the comparison are each a float64 array that size, whatever the
    batch: VGG's fc7 at batch 1)."""
    from .segments import is_chain

    if not (len(layers) == 1 or is_chain(layers)):
        return False
    cost = macs(layers, shapes)
    if cost > SAMPLE_ABOVE:
        return True
    if layers[0].type != "InnerProduct" or cost == 0:
        return False
    return cost // int(shapes[layers[0].bottoms[0]][0]) >= SAMPLE_WEIGHTS  # its weight's size


class _Sample:
    """The sampled elements of every value and diff: values, bounds and flat positions."""

    def __init__(self) -> None:
        self.parts: dict[Any, list[tuple[Idx, F64, F64]]] = {}

    def add(self, key: Any, shape: Sequence[int], index: Any, value: F64, bound: F64) -> None:
        flat = np.ravel_multi_index(tuple(np.asarray(i) for i in index), tuple(shape))
        flat = np.asarray(flat, dtype=np.int64).reshape(-1)
        self.parts.setdefault(key, []).append(
            (flat, np.asarray(value, dtype=np.float64).reshape(-1), np.asarray(bound).reshape(-1))
        )

    def merged(self, key: Any) -> tuple[Idx, F64, F64]:
        flat = np.concatenate([p[0] for p in self.parts[key]])
        value = np.concatenate([p[1] for p in self.parts[key]])
        bound = np.concatenate([p[2] for p in self.parts[key]])
        _, first = np.unique(flat, return_index=True)  # an element drawn twice counts once
        first = np.sort(first)
        return flat[first], value[first], bound[first]


def _grid(*axes: Any) -> tuple[Any, ...]:
    return tuple(np.ix_(*[np.atleast_1d(np.asarray(a)) for a in axes]))


def _window(rng: np.random.Generator, size: int, side: int, edge: bool) -> tuple[int, int]:
    """A window of `side` (or all) positions along an axis of `size`: at either end, or
    anywhere."""
    side = min(side, size)
    if edge:
        start = 0 if rng.integers(2) == 0 else size - side
    else:
        start = int(rng.integers(size - side + 1))
    return start, start + side


def sampled(
    layers: Sequence[LayerSpec],
    params: Mapping[str, Sequence[Any]],
    inputs: Mapping[str, Any],
    outputs: Sequence[str],
    top_diffs: Mapping[str, Any] | None,
    seed: int,
) -> Any:
    """Like ``segments.segment`` on a Convolution or InnerProduct segment, on a sample of
    its elements: a ``SegmentResult`` whose arrays are the sampled elements (flat) and whose
    ``positions`` give their flat indices in the whole arrays."""
    from .segments import SegmentResult

    head = layers[0]
    (bottom,) = head.bottoms
    (top,) = head.tops
    x = np.asarray(inputs[bottom])
    ws = [np.asarray(p) for p in params.get(head.name, [])]
    rng = np.random.default_rng([seed & 0xFFFFFFFF, *map(ord, head.name)])
    sample = _Sample()
    g_top = None if top_diffs is None else np.asarray(top_diffs[top])
    if head.type == "Convolution":
        top_shape = _conv(layers, ws, x, g_top, rng, sample)
    else:
        top_shape = _inner_product(layers, ws, x, g_top, rng, sample)
    out = SegmentResult(values={}, value_bounds={}, rule="tolerances.sampled")
    shapes: dict[Any, tuple[int, ...]] = {("v", top): top_shape}
    for key in sample.parts:
        kind, name = key
        pos, value, bound = sample.merged(key)
        if kind == "v":
            out.values[name], out.value_bounds[name] = value, bound
        elif kind == "x":
            out.input_diffs[name], out.input_diff_bounds[name] = value, bound
            shapes[key] = x.shape
        else:
            out.param_diffs[name], out.param_diff_bounds[name] = value, bound
            shapes[key] = ws[name[1]].shape
        out.positions[key] = pos
    out.shapes = shapes
    del outputs  # the segment has one output, its linear layer's top
    return out


def _segment(
    layers: Sequence[LayerSpec],
    head: LayerSpec,
    ws: Sequence[Any],
    x: Any,
    g: Any,
    bottom_diffs: bool = True,
    param_diffs: bool = True,
) -> Any:
    from .segments import segment

    (top,) = layers[0].tops
    return segment(
        [head, *layers[1:]],
        {head.name: list(ws)},
        {head.bottoms[0]: x},
        [top],
        None if g is None else {top: g},
        bottom_diffs=bottom_diffs,
        param_diffs=param_diffs,
    )


def _strip_rows(out_rows: int, per_row: int) -> int:
    """Top rows per strip of a slab: the most that divide the top's `out_rows` and whose
    unfolded bottom (`per_row` elements a row: the float64 convolution's im2col) holds at
    most ``STRIP`` elements; at least one."""
    return max(
        (r for r in range(1, out_rows + 1) if out_rows % r == 0 and r * per_row <= STRIP),
        default=1,
    )


def _stacked(a: Any, strips: int) -> Any:
    """(N, C, S R, W) -> (N S, C, R, W): each image's strips of R rows as images."""
    n, c, h, w = a.shape
    a = a.reshape(n, c, strips, h // strips, w).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(a.reshape(n * strips, c, h // strips, w))


def _unstacked(a: Any, n: int) -> Any:
    """(N S, C, R, W) -> (N, C, S R, W): the inverse of ``_stacked``."""
    ns, c, r, w = a.shape
    a = np.asarray(a).reshape(n, ns // n, c, r, w).transpose(0, 2, 1, 3, 4)
    return a.reshape(n, c, ns // n * r, w)


def _slab_param_diffs(
    sample: _Sample,
    head: LayerSpec,
    ws: Sequence[Any],
    res: Any,
    outputs: Idx,
    transposed: bool = False,
) -> None:
    """A slab's param diffs (in `res`, the restricted problem's) into `sample`: of each of
    the layer's params `ws`, the elements of the slab's `outputs` along the first axis (the
    second of an InnerProduct's transposed weight)."""
    for j, w in enumerate(ws):
        key = (head.name, j)
        if key not in res.param_diffs:
            continue
        if j == 0 and transposed:
            where = _grid(np.arange(w.shape[0]), outputs)
        else:
            where = _grid(outputs, *[np.arange(s) for s in w.shape[1:]])
        sample.add(("p", key), w.shape, where, res.param_diffs[key], res.param_diff_bounds[key])


def _conv(
    layers: Sequence[LayerSpec],
    ws: Sequence[Any],
    x: Any,
    g_top: Any,
    rng: np.random.Generator,
    sample: _Sample,
) -> tuple[int, ...]:
    head = layers[0]
    (top,) = head.tops
    geo = conv_geometry(head, x.shape)
    n_img, channels, height, width = x.shape
    size = (height, width)
    out_hw = tuple(
        (size[i] + 2 * geo.pad[i] - geo.extent(i)) // geo.stride[i] + 1 for i in range(2)
    )
    cout, group = geo.num_output, geo.group
    top_shape = (n_img, cout, *out_hw)
    cin_g, cout_g = channels // group, cout // group

    unpadded = head.with_param("convolution_param", pad=[], pad_h=0, pad_w=0)

    def crop(
        img: int, lo: Sequence[int], hi: Sequence[int], chans: slice = slice(None)
    ) -> tuple[Any, list[int]]:
        """The bottom rows/cols [lo, hi) of image `img` (outside the bottom: Caffe's zero
        padding), and where row/col 0 of the crop lies in the bottom."""
        inside = [(min(max(lo[i], 0), size[i]), max(min(hi[i], size[i]), 0)) for i in range(2)]
        inside = [(a, max(a, b)) for a, b in inside]  # a window wholly in the padding: none
        part = x[img : img + 1, chans, slice(*inside[0]), slice(*inside[1])]
        # the window's rows/cols above and below the bottom
        pads = [(0, 0), (0, 0)] + [
            (max(0, min(hi[i], 0) - lo[i]), max(0, hi[i] - max(lo[i], size[i]))) for i in range(2)
        ]
        return np.pad(part, pads), list(lo)

    def rows_read(o_lo: Sequence[int], o_hi: Sequence[int]) -> tuple[list[int], list[int]]:
        """Bottom rows/cols [lo, hi) read by top positions [o_lo, o_hi)."""
        lo = [o_lo[i] * geo.stride[i] - geo.pad[i] for i in range(2)]
        hi = [(o_hi[i] - 1) * geo.stride[i] - geo.pad[i] + geo.extent(i) for i in range(2)]
        return lo, hi

    # the slab: a few output channels of one group, every image and position, computed on
    # strips of `rows` top rows stacked as images (see _strip_rows)
    grp = int(rng.integers(group))
    chans = np.sort(rng.choice(cout_g, size=min(SLAB, cout_g), replace=False)) + grp * cout_g
    slab_spec = unpadded.with_param("convolution_param", num_output=len(chans), group=1)
    slab_ws = [ws[0][chans]] + ([ws[1][chans]] if len(ws) > 1 else [])
    rows = _strip_rows(out_hw[0], cin_g * math.prod(geo.kernel) * out_hw[1])
    strips = out_hw[0] // rows
    in_group = slice(grp * cin_g, (grp + 1) * cin_g)
    stack = np.concatenate(
        [
            crop(img, *rows_read([i * rows, 0], [(i + 1) * rows, out_hw[1]]), in_group)[0]
            for img in range(n_img)
            for i in range(strips)
        ]
    )
    g_slab = None
    if g_top is not None:  # (N, c, S R, W) -> (N S, c, R, W): the strips' top diffs
        g_slab = _stacked(g_top[:, chans], strips)
    res = _segment(layers, slab_spec, slab_ws, stack, g_slab, bottom_diffs=False)
    grid = _grid(np.arange(n_img), chans, np.arange(out_hw[0]), np.arange(out_hw[1]))
    sample.add(
        ("v", top),
        top_shape,
        grid,
        _unstacked(res.values[top], n_img),
        _unstacked(res.value_bounds[top], n_img),
    )
    _slab_param_diffs(sample, head, ws, res, chans)

    for k in range(PATCHES):  # top patches: every channel
        img = int(rng.integers(n_img))
        edge_axis = int(rng.integers(2))
        win = [_window(rng, out_hw[i], SIDE, k == 0 and i == edge_axis) for i in range(2)]
        o_lo, o_hi = [w[0] for w in win], [w[1] for w in win]
        part, _ = crop(img, *rows_read(o_lo, o_hi))
        res = _segment(layers, unpadded, ws, part, None)
        grid = _grid(img, np.arange(cout), np.arange(o_lo[0], o_hi[0]), np.arange(o_lo[1], o_hi[1]))
        sample.add(("v", top), top_shape, grid, res.values[top], res.value_bounds[top])

    if g_top is None:
        return top_shape
    for k in range(PATCHES):  # bottom patches: every channel, every term of their diffs
        img = int(rng.integers(n_img))
        edge_axis = int(rng.integers(2))
        win = [_window(rng, size[i], SIDE, k == 0 and i == edge_axis) for i in range(2)]
        # the top positions reading bottom rows [a, b): ceil((a + pad - extent + 1) / stride)
        # to floor((b - 1 + pad) / stride), within the top
        o_lo = [
            max(0, -(-(win[i][0] + geo.pad[i] - geo.extent(i) + 1) // geo.stride[i]))
            for i in range(2)
        ]
        o_hi = [min(out_hw[i], (win[i][1] - 1 + geo.pad[i]) // geo.stride[i] + 1) for i in range(2)]
        if any(o_hi[i] <= o_lo[i] for i in range(2)):
            continue  # no top position reads them: their diff is 0 with nothing to sum
        lo, hi = rows_read(o_lo, o_hi)
        part, origin = crop(img, lo, hi)
        g = g_top[img : img + 1, :, o_lo[0] : o_hi[0], o_lo[1] : o_hi[1]]
        res = _segment(layers, unpadded, ws, part, g, param_diffs=False)
        # bottom positions of the window inside the crop (the others no top reads)
        keep = [np.arange(max(win[i][0], lo[i]), min(win[i][1], hi[i])) for i in range(2)]
        if not all(len(k_) for k_ in keep):
            continue
        at = _grid(0, np.arange(channels), keep[0] - origin[0], keep[1] - origin[1])
        grid = _grid(img, np.arange(channels), keep[0], keep[1])
        sample.add(
            ("x", head.bottoms[0]),
            x.shape,
            grid,
            res.input_diffs[head.bottoms[0]][at],
            res.input_diff_bounds[head.bottoms[0]][at],
        )
    return top_shape


def _inner_product(
    layers: Sequence[LayerSpec],
    ws: Sequence[Any],
    x: Any,
    g_top: Any,
    rng: np.random.Generator,
    sample: _Sample,
) -> tuple[int, ...]:
    head = layers[0]
    (top,) = head.tops
    p = head.param("inner_product_param")
    n_img = x.shape[0]
    num = int(p["num_output"])
    top_shape = (n_img, num)
    rows = np.sort(rng.choice(num, size=min(SLAB_IP, num), replace=False))
    w = ws[0]
    slab_w = w[:, rows] if p["transpose"] else w[rows]
    slab_ws = [slab_w] + ([ws[1][rows]] if len(ws) > 1 else [])
    spec = head.with_param("inner_product_param", num_output=len(rows))
    g_slab = None if g_top is None else g_top[:, rows]
    res = _segment(layers, spec, slab_ws, x, g_slab, bottom_diffs=False)
    sample.add(
        ("v", top), top_shape, _grid(np.arange(n_img), rows), res.values[top], res.value_bounds[top]
    )
    _slab_param_diffs(sample, head, ws, res, rows, transposed=bool(p["transpose"]))
    if g_top is None:
        return top_shape
    img = int(rng.integers(n_img))  # one image, whole: its bottom diff sums every output
    res = _segment(layers, head, ws, x[img : img + 1], g_top[img : img + 1], param_diffs=False)
    d = res.input_diffs[head.bottoms[0]]
    grid = _grid(img, *[np.arange(s) for s in x.shape[1:]])
    sample.add(("x", head.bottoms[0]), x.shape, grid, d, res.input_diff_bounds[head.bottoms[0]])
    return top_shape
