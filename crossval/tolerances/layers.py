"""Per-layer float32 error bounds for the reference layer library (crossval.reference.layers).

A layer is checked on its own: Caffe's float32 top (or a port's) for given float32 bottoms
and params, against the float64 reference on the same values. So these bounds carry no input
error: each is the float32 rounding error of the layer's own computation, per element,
evaluated at the actual inputs. Their rules are entries of the one table (``TABLE``).

Linear layers (InnerProduct, Convolution, Deconvolution, Scale...) share one derivation:
every output element is a sum of n products, so its error is at most gamma(n) times the same
sum taken over absolute values; that sum is the layer itself applied to |bottoms| and
|params|, and the backward magnitudes are its vector-Jacobian product at |top diffs|. The
reference computes both, so no layer's index arithmetic is written twice.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from crossval.reference import layers as ref
from crossval.reference.layers import LayerSpec
from crossval.reference.layers.vision import conv_geometry

from . import ETA32, F64, TABLE, Rule, gamma

Arrays = Sequence[F64]
ForwardBound = Callable[[LayerSpec, Arrays, Arrays, Arrays], list[F64]]
BackwardTerms = Callable[[LayerSpec, Arrays, Arrays, Arrays], tuple[list[int], list[int]]]
BackwardBound = Callable[
    [LayerSpec, Arrays, Arrays, Arrays, Arrays], tuple[list[F64 | None], list[F64 | None]]
]


@dataclass(frozen=True)
class LayerBound:
    """The bounds of one layer type: forward (per top) and backward (per bottom and param
    diff, None where the layer computes no diff), each citing its rule of the table."""

    forward_rule: str
    forward: ForwardBound
    backward_rule: str
    backward: BackwardBound
    # a linear layer's: how many terms each bottom and param diff sums (its backward bound
    # is gamma(n) times the magnitudes of the diff plus n ETA32)
    backward_terms: (
        Callable[[LayerSpec, Arrays, Arrays, Arrays], tuple[list[int], list[int]]] | None
    ) = None


LAYER_BOUNDS: dict[str, LayerBound] = {}

RULES = (
    Rule(
        "layer_linear",
        "a layer whose every output is a sum of n products of bottoms and params "
        "(InnerProduct; any order of summation, BLAS or direct)",
        "gamma(n) * f(|x|, |w|) + n ETA32, with f the layer itself on absolute values (which "
        "is sum |w| |x| per output) and n the terms per output, bias included; the backward "
        "diffs likewise with the vjp of f at |g| and n the terms each diff sums",
    ),
    Rule(
        "layer_copy",
        "a layer whose outputs only move, select, copy or flip the sign of its inputs "
        "(Dropout in TEST, AbsVal and its diff g sign(x), Concat, Slice, Flatten, Reshape, "
        "Crop, Split forward, Eltwise MAX forward and backward)",
        "0: no arithmetic and no rounding at all, so Caffe, a port and the reference must "
        "reproduce the float32 values bit for bit",
    ),
)
TABLE.update({r.name: r for r in RULES})


class WideCache:
    """float64 copies of big arrays (and of their absolute values), made once: the bounds of
    a layer read its weights several times, a sampled check (``tolerances.sampled``) several
    restricted problems of one layer, and with a user's trained weights every example reads
    the same. Caches only inside ``active()`` (validate-port's engine, which reads arrays
    and never writes them); elsewhere every use widens afresh. An entry keeps its source
    array alive, so no other array can take its address while it is cached."""

    SMALLEST = 1 << 16  # elements: smaller arrays are widened on every use

    def __init__(self) -> None:
        self.entries: dict[tuple[Any, ...], tuple[np.ndarray, torch.Tensor]] = {}
        self.on = False

    @contextmanager
    def active(self, keep: Sequence[np.ndarray] = ()) -> Iterator[None]:
        """Cache within; on leaving, forget every entry but those of `keep` (arrays the next
        use will read again, unchanged: a trained net's weights) and of their copies."""
        self.on = True
        try:
            yield
        finally:
            self.on = False
            kept = {id(a) for a in keep}
            hold = {k: e for k, e in self.entries.items() if id(e[0]) in kept}
            wide = {e[1].data_ptr() for e in hold.values()}
            hold.update(
                {
                    k: e
                    for k, e in self.entries.items()
                    if e[0].__array_interface__["data"][0] in wide
                }
            )
            self.entries = hold

    def get(self, a: Any, absolute: bool) -> torch.Tensor:
        arr = np.asarray(a)
        if not self.on or arr.size < self.SMALLEST:
            return self._widen(arr, absolute)
        where = arr.__array_interface__["data"][0]
        key = (where, arr.shape, arr.strides, arr.dtype.str, absolute)
        hit = self.entries.get(key)
        if hit is None:
            hit = (arr, self._widen(arr, absolute))
            self.entries[key] = hit
        return hit[1]

    @staticmethod
    def _widen(arr: np.ndarray, absolute: bool) -> torch.Tensor:
        wide = np.asarray(arr, dtype=np.float64, order="C")  # a 0-d array stays 0-d
        return torch.from_numpy(np.asarray(np.abs(wide)) if absolute else wide)


WIDE = WideCache()


def _t(a: F64) -> torch.Tensor:
    return WIDE.get(a, absolute=True)


SPLIT_ABOVE = 1 << 19  # elements of a batch's unfolded bottom above which it goes by image


def forward(
    spec: LayerSpec, bottoms: Sequence[torch.Tensor], blobs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``ref.forward``, with a Convolution over a batch whose unfolded bottom (torch's
    im2col of a float64 convolution, made for the whole batch at once) holds more than
    ``SPLIT_ABOVE`` elements computed image by image: each image's top is the same
    convolution of the same values, and autograd sums the images' param diffs; unfolded
    one image at a time it stays in cache (a sampled slab, ``tolerances.sampled``, stacks
    strips of a big image as images for that)."""
    if spec.type != "Convolution" or len(bottoms) != 1 or bottoms[0].dim() < 3:
        return ref.forward(spec, bottoms, blobs)
    (x,) = bottoms
    try:
        g = conv_geometry(spec, tuple(x.shape))
    except ValueError:
        return ref.forward(spec, bottoms, blobs)  # the reference says why
    per_image = x[0].numel() // g.group * math.prod(g.kernel)
    if g.axis != 1 or x.shape[0] < 2 or x.shape[0] * per_image <= SPLIT_ABOVE:
        return ref.forward(spec, bottoms, blobs)
    return [torch.cat([ref.forward(spec, [x[i : i + 1]], blobs)[0] for i in range(len(x))])]


def magnitudes(spec: LayerSpec, bottoms: Arrays, blobs: Arrays) -> list[F64]:
    """The layer applied to |bottoms| and |params| in float64: each output's sum of |terms|."""
    tops = forward(spec, [_t(b) for b in bottoms], [_t(p) for p in blobs])
    return [t.numpy() for t in tops]


def diff_magnitudes(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """The vjp of the layer on absolute values: each diff's sum of |terms|."""
    _, gb, gp = ref.vjp(
        spec,
        [_t(b) for b in bottoms],
        [_t(p) for p in blobs],
        [_t(g) for g in top_diffs],
        fn=forward if spec.type == "Convolution" else None,
    )
    return (
        [None if g is None else g.numpy() for g in gb],
        [None if g is None else g.numpy() for g in gp],
    )


def linear(
    terms_forward: Callable[[LayerSpec, Arrays, Arrays], int],
    terms_backward: Callable[[LayerSpec, Arrays, Arrays, Arrays], tuple[list[int], list[int]]],
) -> LayerBound:
    """A LayerBound for a linear layer, given how many terms each output and each diff sums:
    see TABLE['layer_linear']."""

    def fwd(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
        n = terms_forward(spec, bottoms, blobs)
        return [gamma(n) * m + n * ETA32 for m in magnitudes(spec, bottoms, blobs)]

    def bwd(
        spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
    ) -> tuple[list[F64 | None], list[F64 | None]]:
        nb, npar = terms_backward(spec, bottoms, blobs, top_diffs)
        mb, mp = diff_magnitudes(spec, bottoms, blobs, top_diffs)
        return (
            [None if m is None else gamma(n) * m + n * ETA32 for m, n in zip(mb, nb, strict=True)],
            [
                None if m is None else gamma(n) * m + n * ETA32
                for m, n in zip(mp, npar, strict=True)
            ],
        )

    return LayerBound("layer_linear", fwd, "layer_linear", bwd, terms_backward)


def copy_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """Exact: see TABLE['layer_copy']."""
    return [np.zeros(np.shape(t)) for t in tops]


def copy_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """Exact: see TABLE['layer_copy']."""
    return [np.zeros(np.shape(b)) for b in bottoms], []


# The bounds of every layer that only moves, selects or copies elements (neuron and
# structural layers alike).
COPY = LayerBound("layer_copy", copy_forward, "layer_copy", copy_backward)


# The bounds of each reference family, in a module of the same name, register (with their
# rules) on import.
for _family in ref.FAMILIES:
    importlib.import_module(f"crossval.tolerances.{_family}")
