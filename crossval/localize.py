"""The first failing layer of a net: the one localisation rule of check-build and
validate-port. A failing value is fixed (a param that must not change), forward (a top) or
backward (a bottom diff or a param diff); the culprit is the first layer with a wrong fixed
param, else the first in forward order with a wrong top, else the first in backward order
whose bottom or param diffs are wrong while its top diffs are right."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from .net import NetLayer


class Failing(Protocol):
    """A failing value as `localize` reads it (a check-build Value, a validate-port check)."""

    @property
    def kind(self) -> str: ...  # "fixed", "forward" or "backward"
    @property
    def key(self) -> str: ...  # blob name or a param's state_dict key
    @property
    def name(self) -> str: ...


def localize(
    layers: Sequence[NetLayer],
    failing: Sequence[Failing],
    *,
    param_key: Callable[[NetLayer, int], str] = lambda lay, i: f"{lay.name}/{i}",
    diff_key: Callable[[str], str] = lambda blob: blob,
) -> tuple[str, set[str]]:
    """The first layer whose output goes wrong and in which pass, with the keys (blobs or
    params) of that layer's wrong outputs. Shared with validate-port (crossval.portcheck),
    whose failing values name a param `layer/index` and a blob's diff `d/d blob`:
    `param_key` and `diff_key` give a caller's names."""
    if not failing:
        return "", set()
    bad_fixed = {v.key for v in failing if v.kind == "fixed"}
    bad_fwd = {v.key for v in failing if v.kind == "forward"}
    bad_bwd = {v.key for v in failing if v.kind == "backward"}

    def params(layer: NetLayer) -> set[str]:
        return {param_key(layer, p.index) for p in layer.params}

    for layer in layers:
        if bad_fixed & params(layer):
            return f"fixed param of layer {layer.label}", bad_fixed & params(layer)
    for layer in layers:
        if bad_fwd & set(layer.tops):
            return f"forward of layer {layer.label}", bad_fwd & set(layer.tops)
    for layer in reversed(layers):
        outputs = bad_bwd & ({diff_key(b) for b in layer.bottoms} | params(layer))
        if outputs and not bad_bwd & {diff_key(t) for t in layer.tops}:
            return f"backward of layer {layer.label}", outputs
    return "no single layer (" + ", ".join(sorted(v.name for v in failing)) + ")", set()
