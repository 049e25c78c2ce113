"""The conformance case grid: one-layer nets drawn from the layer reference's parameter
grid (``crossval.layercheck.CASES``), and the zoo nets at small sizes.

A layer case is the first cases its type's strategy generates (derandomized, so the grid is
the same on every run): its prototxt (``LayerCase.prototxt``: an Input layer ``input`` with
tops ``b0``, ``b1``... and the layer ``layer`` with tops ``t0``...), its param blobs (the
case's own, or drawn from its seed as the layer reference draws them) written by Caffe as
the caffemodel, and one example: the case's own bottoms and params. A layer case's inputs
are shaped for its layer (a positive base for Log, exponents kept finite for Exp, class
indices for labels), so it is run on them as drawn; the variety comes from the cases.

A zoo net is run on the engine's generated examples (``portcheck.command.generated``:
inputs from 1e-3 to 1e3, weights 0.1 to 10 times their fan-in scale), its caffemodel
holding generated weights (BatchNorm statistics with a scale factor other than 1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from crossval.reference.layers.vision import pool_geometry

from ..caffe_side.replies import NetDescription
from ..errors import CrossvalError
from ..inputs import closest
from ..layercheck import CASES
from ..layercheck.golden import draw
from ..layercheck.run import LAYER, LayerCase, param_shapes, spec_of
from ..portcheck.command import generated
from ..portcheck.engine import PortExample
from ..worker import CaffeWorker
from .options import Profile

Arrays = tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]


POOL = 48  # cases drawn per layer type, the profiles' cases picked among them


@dataclass(frozen=True)
class ZooNet:
    """A zoo net at a size that runs in seconds (``crossval.caffe_side.zoo``)."""

    builder: str
    kwargs: Mapping[str, Any]
    batch: int = 2


ZOO_NETS: dict[str, ZooNet] = {
    "levi_hassner": ZooNet("levi_hassner_age", {"size": 67}),
    "caffenet": ZooNet("caffenet_age", {"size": 67, "width": 0.125}),
    "googlenet_block": ZooNet(
        "googlenet_block", {"size": 9, "channels": 16, "width": 0.25, "branch_pool": "AVE"}
    ),
    "resnet_block": ZooNet("resnet_block", {"size": 8, "channels": 8, "coeff": (1.0, -0.5)}),
    "dex": ZooNet("dex_vgg16", {"size": 32, "bins": 101}),
}

ZOO = "zoo"  # the pseudo layer type of the zoo nets' rows


@dataclass
class Case:
    """One row of the table: a net, its caffemodel's params, and the examples to run."""

    id: str  # "Pooling/2", "zoo/resnet_block"
    type: str  # the layer type, or "zoo"
    params: str  # the layer's parameters (or the net's description), one line
    prototxt: str
    weights: dict[str, list[NDArray[np.float32]]]
    examples: list[tuple[PortExample, Arrays | None]] = field(default_factory=list)
    generate: bool = False  # learnable weights generated per example (zoo nets)

    @property
    def slug(self) -> str:
        """The case's directory name under --out."""
        return self.id.replace("/", "-")


def selection(layers: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The layer types and zoo nets that `--layers` names (None: all of them). Entries are
    layer types, ``zoo`` (every zoo net) or ``zoo:NAME``; an unknown one is bad usage."""
    types, nets = sorted(CASES), list(ZOO_NETS)
    if layers is None:
        return types, nets
    known = types + [ZOO] + [f"{ZOO}:{n}" for n in nets]
    want_types: list[str] = []
    want_nets: list[str] = []
    for entry in layers:
        if entry in CASES:
            want_types.append(entry)
        elif entry == ZOO:
            want_nets += nets
        elif entry.startswith(f"{ZOO}:") and entry[len(ZOO) + 1 :] in ZOO_NETS:
            want_nets.append(entry[len(ZOO) + 1 :])
        else:
            raise CrossvalError(
                f"--layers: {entry!r} is neither a layer type of the grid nor a zoo net"
                + closest(entry, known)
                + f" (types: {', '.join(types)}; nets: zoo or zoo:{'|'.join(nets)})"
            )
    return list(dict.fromkeys(want_types)), list(dict.fromkeys(want_nets))


def _tokens(worker: CaffeWorker, lc: LayerCase) -> set[str]:
    """What a case covers: each parameter value it sets, its rank and bottom count, its
    region, and for Pooling the regions where Caffe's pooling is its own (a ceil-rounded
    size larger than the floor one; an AVE window over padding, counted in the divisor)."""
    found = {f"{k}: {v}" for k, v in re.findall(r"(\w+):\s*([^\s}]+)", lc.params)}
    found |= {f"rank {lc.bottoms[0].ndim}", f"bottoms {len(lc.bottoms)}"}
    if lc.region:
        found.add(f"region {lc.region}")
    if lc.type == "Pooling":
        spec = spec_of(worker, lc)
        shape = lc.bottoms[0].shape
        try:
            ceil = pool_geometry(spec.with_param("pooling_param", round_mode="CEIL"), shape)
            floor = pool_geometry(spec.with_param("pooling_param", round_mode="FLOOR"), shape)
        except ValueError:
            return found
        p = spec.param("pooling_param")
        if str(p["round_mode"]) == "CEIL" and ceil.out != floor.out:
            found.add("region pooled size rounded up")
        if str(p["pool"]) == "AVE" and max(ceil.pad) > 0:
            found.add("region AVE window over padding")
    return found


def _engine_takes(worker: CaffeWorker, lc: LayerCase) -> bool:
    if any(b.ndim == 0 for b in lc.bottoms):
        return False
    blobs = lc.blobs if lc.blobs is not None else ()
    shapes = [np.shape(b) for b in blobs] or list(param_shapes(worker, lc.prototxt()))
    return all(len(s) > 0 for s in shapes)


def pick(worker: CaffeWorker, pool: Sequence[LayerCase], n: int) -> list[int]:
    """`n` cases of `pool` (indices): each in turn the one that covers the most regions, then
    parameter values, not covered yet (ties: more than one element, then the earlier).
    Cases with a 0-d bottom or param blob are left out (validate-port's engine takes no
    0-d blob)."""
    tokens = {i: _tokens(worker, c) for i, c in enumerate(pool) if _engine_takes(worker, c)}
    chosen: list[int] = []
    covered: set[str] = set()
    while len(chosen) < n and tokens:
        best = max(
            tokens,
            key=lambda i: (
                len({t for t in tokens[i] - covered if t.startswith("region ")}),
                len(tokens[i] - covered),
                sum(b.size for b in pool[i].bottoms) > 1,
                -i,
            ),
        )
        chosen.append(best)
        covered |= tokens.pop(best)
    return chosen


def layer_cases(worker: CaffeWorker, type_name: str, profile: Profile) -> list[Case]:
    """`profile.per_type` cases of the type, picked from the first POOL its strategy
    generates (derandomized: the same on every run; a case's id is its index there), each
    with its caffemodel's params."""
    out = []
    pool = draw(type_name, POOL)
    for i in pick(worker, pool, profile.per_type):
        lc = pool[i]
        text = lc.prototxt()
        blobs = _layer_blobs(worker, lc, text)
        inputs = {f"b{j}": b for j, b in enumerate(lc.bottoms)}
        params = {LAYER: list(blobs)} if blobs else {}
        example = PortExample(lc.seed, batch=int(lc.bottoms[0].shape[0]) if lc.bottoms else 1)
        out.append(
            Case(
                f"{type_name}/{i}",
                type_name,
                _one_line(lc),
                text,
                params,
                [(example, (inputs, params))],
            )
        )
    return out


def _layer_blobs(worker: CaffeWorker, lc: LayerCase, text: str) -> list[NDArray[np.float32]]:
    """The case's params: its own, or drawn from its seed as the layer reference does."""
    if lc.blobs is not None:
        return [np.asarray(b, dtype=np.float32) for b in lc.blobs]
    rng = np.random.default_rng(lc.seed)
    return [
        (rng.standard_normal(s) * lc.weight_scale).astype(np.float32)
        for s in param_shapes(worker, text)
    ]


def _one_line(lc: LayerCase) -> str:
    shapes = ", ".join("x".join(map(str, b.shape)) for b in lc.bottoms)
    text = " ".join(lc.params.split())
    return f"{text or '(defaults)'} on {shapes}" + (f" ({lc.region})" if lc.region else "")


def zoo_case(worker: CaffeWorker, name: str, profile: Profile, seed: int = 0) -> Case:
    """Zoo net `name` with generated weights, run on `profile.zoo_examples` examples."""
    net = ZOO_NETS[name]
    text = worker.prototxt(net.builder, batch=net.batch, **net.kwargs)
    described = worker.describe(text)
    params = zoo_params(described, np.random.default_rng(seed))
    args = ", ".join(f"{k} {v}" for k, v in net.kwargs.items())
    return Case(
        f"{ZOO}/{name}",
        ZOO,
        f"{net.builder} ({args}), batch {net.batch}",
        text,
        params,
        [(ex, None) for ex in generated(profile.zoo_examples, seed, net.batch)],
        generate=True,
    )


def zoo_params(
    described: NetDescription, rng: np.random.Generator
) -> dict[str, list[NDArray[np.float32]]]:
    """Weights for every layer at Caffe's shapes: He-scaled kernels and small biases;
    BatchNorm's mean and variance sums with a scale factor other than 1 (variances kept
    positive); Scale's multipliers near 1."""
    out: dict[str, list[NDArray[np.float32]]] = {}
    makers: dict[str, Callable[[list[tuple[int, ...]]], list[NDArray[Any]]]] = {
        "BatchNorm": lambda shapes: _batch_norm(shapes, rng),
        "Scale": lambda shapes: (
            [rng.normal(1.0, 0.25, shapes[0])] + [rng.normal(0.0, 0.1, s) for s in shapes[1:]]
        ),
    }
    for lay in described.layers:
        shapes = [p.shape for p in lay.params]
        if not shapes:
            continue
        make = makers.get(lay.type)
        if make is not None:
            blobs = make(shapes)
        else:
            fan_in = max(1, math.prod(shapes[0][1:]))
            blobs = [rng.normal(0.0, math.sqrt(2.0 / fan_in), shapes[0])]
            blobs += [rng.normal(0.0, 0.1, s) for s in shapes[1:]]
        out[lay.name] = [np.asarray(b, dtype=np.float32) for b in blobs]
    return out


def _batch_norm(shapes: list[tuple[int, ...]], rng: np.random.Generator) -> list[NDArray[Any]]:
    (channels,) = shapes[0][:1]
    factor = rng.uniform(0.5, 4.0)
    return [
        rng.normal(0.0, 0.5, channels) * factor,
        rng.uniform(0.05, 1.0, channels) * factor,
        np.array([factor]),
    ]


def build(
    worker: CaffeWorker, types: Sequence[str], nets: Sequence[str], profile: Profile
) -> list[Case]:
    """Every case of `types` (in that order), then the zoo nets."""
    cases: list[Case] = []
    for t in types:
        cases += layer_cases(worker, t, profile)
    for n in nets:
        cases.append(zoo_case(worker, n, profile))
    return cases
