"""Caffe layers with Caffe's semantics, as PyTorch functions in float64 or float32.

Each layer type is one function ``f(spec, bottoms, blobs) -> tops`` registered under its
Caffe type name; it reads the layer's parameters from ``spec`` exactly as the Caffe layer
reads its LayerParameter (defaults are Caffe's own, filled in by the worker from caffe.proto,
see ``crossval.caffe_side.server.layer_spec``). The function computes in the dtype of its
inputs, so one implementation serves as the float64 reference and as a float32 port; where
Caffe's backward is not the derivative of its forward (ties, kinks, clamps), the function
uses a custom autograd rule that mirrors Caffe's backward, so ``vjp`` gives Caffe's diffs.

The families live in their own modules (imported at the end of this file, which registers
them); ``LAYERS`` maps each supported type to its implementation.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "FAMILIES",
    "LAYERS",
    "LayerSpec",
    "LayerType",
    "ParsedLayer",
    "UnsupportedLayer",
    "forward",
    "lookup",
    "register",
    "vjp",
]


class ParsedLayer(Protocol):
    """A layer as Caffe parses it (``crossval.caffe_side.replies.CaffeLayerSpec``)."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def bottoms(self) -> Sequence[str]: ...
    @property
    def tops(self) -> Sequence[str]: ...
    @property
    def params(self) -> Mapping[str, Mapping[str, Any]]: ...
    @property
    def set_fields(self) -> Mapping[str, Sequence[str]]: ...


@dataclass(frozen=True)
class LayerSpec:
    """One Caffe layer as the reference reads it: its name, type, blob names, phase, and its
    parameter messages by field name (``"convolution_param"``: {field: value, ...}) with
    every field present at Caffe's default when the prototxt leaves it out."""

    name: str
    type: str
    bottoms: tuple[str, ...] = ()
    tops: tuple[str, ...] = ()
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    phase: str = "TEST"
    set_fields: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def from_caffe(cls, parsed: ParsedLayer, phase: str = "TEST") -> LayerSpec:
        """From one layer of the Caffe worker's ``layer_specs`` reply."""
        return cls(
            name=parsed.name,
            type=parsed.type,
            bottoms=tuple(parsed.bottoms),
            tops=tuple(parsed.tops),
            params=dict(parsed.params),
            phase=phase,
            set_fields={k: frozenset(v) for k, v in parsed.set_fields.items()},
        )

    def has(self, kind: str, name: str) -> bool:
        """Whether the prototxt sets field `name` of `kind` (Caffe's ``has_<name>()``)."""
        return name in self.set_fields.get(kind, frozenset())

    def with_param(self, kind: str, **fields: Any) -> LayerSpec:
        """This spec with some fields of its `kind` message changed (and counted as set)."""
        params = {**self.params, kind: {**self.param(kind), **fields}}
        set_fields = {**self.set_fields, kind: self.set_fields.get(kind, frozenset()) | set(fields)}
        return dataclasses.replace(self, params=params, set_fields=set_fields)

    def param(self, kind: str) -> Mapping[str, Any]:
        """The ``<kind>`` parameter message (e.g. ``"pooling_param"``)."""
        try:
            return self.params[kind]
        except KeyError:
            raise ValueError(
                f"layer {self.name!r} ({self.type}): no {kind} in its spec "
                f"(has: {', '.join(self.params) or 'none'})"
            ) from None


LayerFn = Callable[[LayerSpec, Sequence[Tensor], Sequence[Tensor]], list[Tensor]]


@dataclass(frozen=True)
class LayerType:
    """A supported Caffe layer type: its forward (autograd gives Caffe's backward)."""

    type: str
    forward: LayerFn
    formula: str


LAYERS: dict[str, LayerType] = {}


def register(type_name: str) -> Callable[[LayerFn], LayerFn]:
    """Register `f` as the reference of Caffe layer type `type_name` (its docstring's first
    line is the formula shown in reports)."""

    def deco(f: LayerFn) -> LayerFn:
        if type_name in LAYERS:
            raise ValueError(f"layer type {type_name!r} registered twice")
        doc = (f.__doc__ or "").strip().splitlines()
        LAYERS[type_name] = LayerType(type_name, f, doc[0] if doc else "")
        return f

    return deco


class UnsupportedLayer(ValueError):
    """A layer whose type the reference does not implement: never silently passed."""

    def __init__(self, name: str, type_name: str) -> None:
        self.layer = name
        self.type = type_name
        super().__init__(
            f"layer {name!r} has type {type_name!r}, which the reference layer library does "
            f"not implement (supported: {', '.join(sorted(LAYERS))})"
        )


def lookup(spec: LayerSpec) -> LayerType:
    try:
        return LAYERS[spec.type]
    except KeyError:
        raise UnsupportedLayer(spec.name, spec.type) from None


def forward(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """The layer's tops for `bottoms` and param `blobs`, in their dtype."""
    return lookup(spec).forward(spec, bottoms, blobs)


_DIFFS: ContextVar[tuple[bool, bool]] = ContextVar("diffs", default=(True, True))


@contextmanager
def diffs_of(bottoms: bool = True, params: bool = True) -> Iterator[None]:
    """Within: ``vjp`` computes only these diffs and treats the other blobs as constants
    (their diffs None), for a caller that needs, of a big layer, only one kind."""
    token = _DIFFS.set((bottoms, params))
    try:
        yield
    finally:
        _DIFFS.reset(token)


def _own(t: Tensor, copy: bool) -> Tensor:
    return t.detach().clone() if copy else t.detach()


def vjp(
    spec: LayerSpec,
    bottoms: Sequence[Tensor],
    blobs: Sequence[Tensor],
    top_diffs: Sequence[Tensor],
    fn: LayerFn | None = None,
) -> tuple[list[Tensor], list[Tensor | None], list[Tensor | None]]:
    """Tops, and Caffe's diffs of every floating bottom and param blob for the given top
    diffs (None where the layer computes none: integer label bottoms). `fn` replaces the
    reference (a port of the layer, or a deliberately wrong one)."""
    # a port or a wrong layer (`fn`) may write to its inputs: it gets copies
    copy = fn is not None
    want_b, want_p = _DIFFS.get()
    bs = [_own(b, copy).requires_grad_(b.is_floating_point() and want_b) for b in bottoms]
    ps = [_own(p, copy).requires_grad_(want_p) for p in blobs]
    tops = (fn or lookup(spec).forward)(spec, bs, ps)
    leaves = [*bs, *ps]
    wanted = [t for t in leaves if t.requires_grad]
    pairs = [(t, g) for t, g in zip(tops, top_diffs, strict=True) if t.requires_grad]
    grads: Sequence[Tensor | None] = [None] * len(wanted)
    if wanted and pairs:
        grads = torch.autograd.grad(
            [t for t, _ in pairs],
            wanted,
            [g.to(t.dtype) for t, g in pairs],
            allow_unused=True,
        )
    by_leaf = {id(t): g for t, g in zip(wanted, grads, strict=True)}
    full: list[Tensor | None] = []
    for t in leaves:
        g = by_leaf.get(id(t))
        # A leaf the tops do not depend on gets Caffe's zero diff, not "no diff".
        full.append(None if not t.requires_grad else g if g is not None else torch.zeros_like(t))
    return [t.detach() for t in tops], full[: len(bs)], full[len(bs) :]


# The families: each a module of this package that registers its layer types on import.
# The tolerance package has a module of bounds for each (crossval.tolerances.layers).
FAMILIES = ("loss", "neuron", "normalization", "structure", "vision")
for _family in FAMILIES:
    importlib.import_module(f"crossval.reference.layers.{_family}")
