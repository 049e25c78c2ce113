"""One layer case: build the one-layer net, run Caffe and the reference, compare."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from crossval.reference import layers as ref
from crossval.reference.layers import LayerSpec

from ..caffe_side.replies import CaffeLayerSpec
from ..compare import Comparison, three_way
from ..tolerances.layers import LAYER_BOUNDS
from ..worker import CaffeWorker

F32 = NDArray[np.float32]
LAYER = "layer"  # the name of the layer under test in every case's net


@dataclass(eq=False)
class LayerCase:
    """One layer under test: its type, its parameter text (prototxt fields inside the layer,
    e.g. ``pooling_param { pool: AVE kernel_size: 3 }``), float32 bottom values, how many
    tops, and param values (None: drawn from `seed` at the shapes Caffe gives the layer)."""

    type: str
    bottoms: tuple[F32, ...]
    params: str = ""
    tops: int = 1
    blobs: tuple[F32, ...] | None = None
    seed: int = 0
    weight_scale: float = 1.0
    no_diff: tuple[int, ...] = ()  # bottoms Caffe computes no diff for (labels)
    region: str = ""

    def prototxt(self) -> str:
        names = [f"b{i}" for i in range(len(self.bottoms))]
        shapes = "".join(
            " shape {" + "".join(f" dim: {d}" for d in b.shape) + " }" for b in self.bottoms
        )
        tops = "".join(f' top: "t{i}"' for i in range(self.tops))
        return (
            "force_backward: true\n"
            'layer { name: "input" type: "Input"'
            + "".join(f' top: "{n}"' for n in names)
            + f" input_param {{{shapes} }} }}\n"
            f'layer {{ name: "{LAYER}" type: "{self.type}"'
            + "".join(f' bottom: "{n}"' for n in names)
            + f"{tops} {self.params} }}\n"
        )

    def describe(self) -> str:
        shapes = ", ".join("x".join(map(str, b.shape)) for b in self.bottoms)
        text = f"{self.type} {{{self.params.strip()}}} on {shapes}, seed {self.seed}"
        return text + (f" ({self.region})" if self.region else "")


@dataclass
class LayerResult:
    case: LayerCase
    comparisons: list[Comparison] = field(default_factory=list)
    shape_errors: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]

    @property
    def passed(self) -> bool:
        return not self.shape_errors and not self.failures and bool(self.comparisons)

    @property
    def ratio(self) -> float:
        return max((c.ratio for c in self.comparisons), default=0.0)

    def summary(self) -> str:
        lines = [f"{self.case.describe()}: {len(self.comparisons)} comparisons"]
        lines += self.shape_errors
        lines += [str(c) for c in self.failures[:5]]
        return "\n".join(lines)


@functools.lru_cache(maxsize=256)
def caffe_spec(worker: CaffeWorker, text: str) -> CaffeLayerSpec:
    """The layer under test as Caffe parses the prototxt `text`."""
    return next(s for s in worker.layer_specs(text) if s.name == LAYER)


@functools.lru_cache(maxsize=256)
def param_shapes(worker: CaffeWorker, text: str) -> tuple[tuple[int, ...], ...]:
    params = worker.params(text).params
    return tuple(tuple(p.shape) for p in params.get(LAYER, []))


def spec_of(worker: CaffeWorker, case: LayerCase) -> LayerSpec:
    """The layer's spec as Caffe parses the case's prototxt."""
    return LayerSpec.from_caffe(caffe_spec(worker, case.prototxt()))


def _tensors(arrays: tuple[F32, ...] | list[F32], dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(a, dtype=np.float64)).to(dtype) for a in arrays]


def _np(t: torch.Tensor | None) -> NDArray[np.float64]:
    if t is None:
        raise ValueError("the float32 reference computed no diff where the float64 one did")
    return t.detach().to(torch.float64).numpy()


def run_case(worker: CaffeWorker, case: LayerCase, port: ref.LayerFn | None = None) -> LayerResult:
    """Caffe, the float32 reference (or `port`, an implementation of the layer under test)
    and the float64 reference on one case; every top, bottom diff and param diff compared
    three ways within the layer's bound."""
    text = case.prototxt()
    spec = spec_of(worker, case)
    bound = LAYER_BOUNDS.get(case.type)
    if bound is None:
        raise ValueError(f"layer type {case.type!r} has no bound in crossval.tolerances.layers")
    rng = np.random.default_rng(case.seed)
    if case.blobs is None:
        shapes = param_shapes(worker, text)
        blobs = tuple(
            (rng.standard_normal(s) * case.weight_scale).astype(np.float32) for s in shapes
        )
    else:
        blobs = case.blobs
    b64, p64 = _tensors(case.bottoms, torch.float64), _tensors(blobs, torch.float64)
    tops64 = ref.forward(spec, b64, p64)
    diffs = [rng.standard_normal(tuple(t.shape)).astype(np.float32) for t in tops64]
    caffe = worker.run(
        prototxt=text,
        inputs={f"b{i}": b for i, b in enumerate(case.bottoms)},
        params={LAYER: list(blobs)} if blobs else None,
        phase="TEST",
        backward=True,
        top_diffs={f"t{i}": g for i, g in enumerate(diffs)},
        all_diffs=True,
        return_params=False,
    )
    result = LayerResult(case)
    for i, t in enumerate(tops64):
        got = caffe.blobs[f"t{i}"].shape
        if tuple(got) != tuple(t.shape):
            result.shape_errors.append(
                f"forward: top {i} has shape {tuple(got)} in Caffe, {tuple(t.shape)} in the "
                f"reference [{case.describe()}]"
            )
    if result.shape_errors:
        return result
    g64, g32 = _tensors(diffs, torch.float64), _tensors(diffs, torch.float32)
    t64, gb64, gp64 = ref.vjp(spec, b64, p64, g64)
    b32, p32 = _tensors(case.bottoms, torch.float32), _tensors(blobs, torch.float32)
    with torch.no_grad():  # shapes first: a port's wrong shape is a finding, not a crash
        try:
            f32 = (port or ref.lookup(spec).forward)(spec, b32, p32)
        except (RuntimeError, IndexError, ValueError) as exc:
            if port is None:
                raise
            # A port that cannot run on Caffe's input (torch.cat over a dim whose sizes
            # differ) is a finding about the port, like a wrong shape.
            result.shape_errors.append(f"forward: the port raised {exc!r} [{case.describe()}]")
            return result
    if len(f32) != len(t64):
        result.shape_errors.append(
            f"forward: {len(f32)} tops in the float32 side, {len(t64)} in the reference "
            f"[{case.describe()}]"
        )
        return result
    for i, (t, p) in enumerate(zip(t64, f32, strict=True)):
        if tuple(p.shape) != tuple(t.shape):
            result.shape_errors.append(
                f"forward: top {i} has shape {tuple(p.shape)} in the float32 side, "
                f"{tuple(t.shape)} in the reference [{case.describe()}]"
            )
    if result.shape_errors:
        return result
    t32, gb32, gp32 = ref.vjp(spec, b32, p32, g32, port)
    arrays = [b.numpy() for b in b64], [p.numpy() for p in p64]
    tops_np = [t.numpy() for t in t64]
    diffs_np = [g.numpy() for g in g64]
    fb = bound.forward(spec, *arrays, tops_np)
    bb, bp = bound.backward(spec, *arrays, tops_np, diffs_np)
    where = case.describe()

    def compare(
        check: str,
        name: str,
        caffe_value: NDArray[Any],
        f32: torch.Tensor | None,
        f64: torch.Tensor,
        b: NDArray[np.float64],
        rule: str,
    ) -> None:
        """Caffe's value and the float32 side's against the float64 reference `f64`."""
        result.comparisons += three_way(
            check, name, caffe_value, _np(f32), f64.numpy(), b, f"tolerances.{rule}", where
        )

    for i, (t, b) in enumerate(zip(t64, fb, strict=True)):
        compare("forward", f"t{i}", caffe.blobs[f"t{i}"], t32[i], t, b, bound.forward_rule)
    for i, (g, gb) in enumerate(zip(gb64, bb, strict=True)):
        if g is not None and gb is not None and i not in case.no_diff:
            caffe_diff = caffe.diffs[f"b{i}"]
            compare("backward", f"d/d b{i}", caffe_diff, gb32[i], g, gb, bound.backward_rule)
    for i, (g, pb) in enumerate(zip(gp64, bp, strict=True)):
        if g is not None and pb is not None:
            caffe_diff = caffe.param_diffs[LAYER][i]
            compare("backward", f"d/d {LAYER}/{i}", caffe_diff, gp32[i], g, pb, bound.backward_rule)
    return result
