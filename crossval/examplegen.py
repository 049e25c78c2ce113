"""Inputs and weights of one validate-port example, from a few numbers (numpy only).

Both sides run this: the parent for the port, the Caffe worker for Caffe, so a full-size
net's weights (550 MB for VGG-16) are made twice instead of shipped through a pipe. Same
numpy, same seed: bit-identical arrays (validate-port checks that the weights Caffe used are
the port's, bit for bit, through a digest).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Recipe:
    """What `generate` needs to know of a net: each input as (name, shape, number of
    classes when it holds SoftmaxWithLoss labels, else 0), and each layer with params as
    (layer, [(shape, lr_mult) per param blob], whether it feeds a squashing layer)."""

    inputs: list[tuple[str, Shape, int]]
    params: list[tuple[str, list[tuple[Shape, float]], bool]]


def generate(
    recipe: Recipe,
    seed: int,
    input_scale: float,
    weight_scale: float,
    batch: int,
    base: dict[str, list[np.ndarray]] | None,
    learnable: bool,
) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    """The example drawn from `seed` for the net `recipe` describes. Labels of
    SoftmaxWithLoss are class indices; params with
    lr_mult 0 (and all params unless `learnable`) come from `base` (None: left out, the
    holder keeps its own); the others are He-scaled normals, the layer feeding a squashing
    layer scaled by `weight_scale`."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    for name, shape, classes in recipe.inputs:
        full = (batch, *shape[1:])
        if classes:
            inputs[name] = rng.integers(0, classes, size=full).astype(np.float32)
        else:
            inputs[name] = (rng.standard_normal(full) * input_scale).astype(np.float32)
    params: dict[str, list[np.ndarray]] = {}
    for layer, blobs, saturating in recipe.params:
        out = []
        for i, (shape, lr_mult) in enumerate(blobs):
            if not learnable or lr_mult == 0:
                if base is None:
                    continue
                out.append(base[layer][i])
                continue
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            boost = weight_scale if saturating else 1.0
            scale = boost * math.sqrt(2.0 / max(fan_in, 1))
            # drawn in float32 (numpy's float32 ziggurat: VGG-16's 138 M weights in about a
            # second, three times faster than drawing float64 and rounding)
            w = rng.standard_normal(tuple(shape), dtype=np.float32)
            w *= np.float32(scale)
            out.append(w)
        if out:
            params[layer] = out
    return inputs, params


def digest(params: dict[str, list[np.ndarray]]) -> str:
    """SHA-256 over every param's bytes, in order: equal digests, bit-identical weights."""
    h = hashlib.sha256()
    for layer in sorted(params):
        for i, a in enumerate(params[layer]):
            h.update(f"{layer}/{i}".encode())
            h.update(np.ascontiguousarray(a, dtype=np.float32).data.cast("B"))
    return h.hexdigest()


def top_diffs(seed: int, shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """The diffs a backward pass starts from: standard normal in float32, each blob's in
    the order given (the Caffe worker draws them at Caffe's shapes, the parent at the
    shapes it expects, and the two are compared)."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes}
