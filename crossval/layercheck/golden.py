"""Golden vectors for every layer type: frozen one-layer cases with the float64 reference's
tops and diffs, so that `crossval check-build` names a build whose Convolution, Pooling or
LRN regressed by layer type, as it names the heads' layers.

Each type gets ``PER_TYPE`` cases, the first ones its case strategy generates
(derandomized), written by ``python -m crossval golden --out crossval/golden --force`` into
``crossval/golden/layers/`` and never edited by hand. One ``.npz`` per case: ``meta`` (JSON:
type, prototxt, the layer's spec as Caffe parsed it, which bottoms get no diff), float32
inputs ``b<i>`` (bottoms), ``p<i>`` (params), ``g<i>`` (top diffs), and float64 values
``t<i>`` (tops), ``db<i>`` and ``dp<i>`` (bottom and param diffs).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import find
from hypothesis.errors import NoSuchExample
from numpy.typing import NDArray

from crossval.reference import layers as ref
from crossval.reference.layers import LayerSpec

from ..caffe_side.replies import CaffeLayerSpec
from ..errors import CrossvalError
from ..profiles import fixed_settings
from ..tolerances.layers import LAYER_BOUNDS
from ..worker import CaffeWorker
from . import CASES
from .run import LAYER, LayerCase, caffe_spec, param_shapes, spec_of

FORMAT = 1
PER_TYPE = 2
SUBDIR = "layers"

F64 = NDArray[np.float64]


@dataclass
class LayerGolden:
    """One frozen layer case: its inputs and the float64 reference's outputs."""

    name: str
    type: str
    prototxt: str
    spec: CaffeLayerSpec
    bottoms: list[NDArray[np.float32]]
    blobs: list[NDArray[np.float32]]
    top_diffs: list[NDArray[np.float32]]
    tops: list[F64]
    bottom_diffs: dict[int, F64]
    param_diffs: dict[int, F64]

    @property
    def layer_spec(self) -> LayerSpec:
        return LayerSpec.from_caffe(self.spec)


def draw(type_name: str, n: int = PER_TYPE) -> list[LayerCase]:
    """The first `n` cases the type's strategy generates (derandomized)."""
    got: list[LayerCase] = []

    def enough(case: LayerCase) -> bool:
        got.append(case)
        return len(got) >= n

    try:
        find(
            CASES[type_name](),
            enough,
            settings=fixed_settings(n, generate_only=True),
        )
    except NoSuchExample:
        pass
    return got[:n]


def _t(a: NDArray[Any]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def reference_values(
    spec: LayerSpec,
    bottoms: list[NDArray[np.float32]],
    blobs: list[NDArray[np.float32]],
    top_diffs: list[NDArray[np.float32]],
    no_diff: tuple[int, ...] = (),
) -> tuple[list[F64], dict[int, F64], dict[int, F64]]:
    """The float64 reference's tops, bottom diffs and param diffs on these values."""
    tops, gb, gp = ref.vjp(
        spec, [_t(b) for b in bottoms], [_t(p) for p in blobs], [_t(g) for g in top_diffs]
    )
    return (
        [t.numpy() for t in tops],
        {i: g.numpy() for i, g in enumerate(gb) if g is not None and i not in no_diff},
        {i: g.numpy() for i, g in enumerate(gp) if g is not None},
    )


def compute(worker: CaffeWorker, name: str, case: LayerCase) -> LayerGolden:
    """Freeze `case`: Caffe's parse of its layer, its params and top diffs drawn from its
    seed, and the float64 reference on them."""
    spec = spec_of(worker, case)
    rng = np.random.default_rng(case.seed)
    blobs = (
        list(case.blobs)
        if case.blobs is not None
        else [
            (rng.standard_normal(s) * case.weight_scale).astype(np.float32)
            for s in param_shapes(worker, case.prototxt())
        ]
    )
    tops = ref.forward(spec, [_t(b) for b in case.bottoms], [_t(p) for p in blobs])
    diffs = [rng.standard_normal(tuple(t.shape)).astype(np.float32) for t in tops]
    t64, db, dp = reference_values(spec, list(case.bottoms), blobs, diffs, case.no_diff)
    raw = caffe_spec(worker, case.prototxt())
    return LayerGolden(
        name, case.type, case.prototxt(), raw, list(case.bottoms), blobs, diffs, t64, db, dp
    )


def encode(g: LayerGolden) -> dict[str, NDArray[Any]]:
    meta = {
        "format": FORMAT,
        "name": g.name,
        "type": g.type,
        "prototxt": g.prototxt,
        "spec": g.spec.to_dict(),
        "made_by": "python -m crossval golden --out crossval/golden --force",
    }
    arrays: dict[str, NDArray[Any]] = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    groups: tuple[tuple[str, list[NDArray[Any]]], ...] = (
        ("b", list(g.bottoms)),
        ("p", list(g.blobs)),
        ("g", list(g.top_diffs)),
        ("t", list(g.tops)),
    )
    for prefix, values in groups:
        arrays.update({f"{prefix}{i}": v for i, v in enumerate(values)})
    arrays.update({f"db{i}": v for i, v in g.bottom_diffs.items()})
    arrays.update({f"dp{i}": v for i, v in g.param_diffs.items()})
    return arrays


def cases_to_write(worker: CaffeWorker) -> dict[str, LayerGolden]:
    """Every layer type's golden cases, by file name (without .npz)."""
    out: dict[str, LayerGolden] = {}
    for type_name in sorted(CASES):
        for i, case in enumerate(draw(type_name)):
            name = f"{_slug(type_name)}-{i}"
            out[name] = compute(worker, name, case)
    return out


def write(worker: CaffeWorker, out: Path, force: bool = False) -> list[Path]:
    """Compute every layer golden case and write one .npz each into `out` (checked first:
    files already there are replaced only with `force`)."""
    from .. import outputs

    cases = cases_to_write(worker)
    where = outputs.directory(out, "golden --out", force=force, names=[f"{n}.npz" for n in cases])
    where.make()
    written = []
    for name, g in cases.items():
        buf = io.BytesIO()
        np.savez_compressed(buf, **encode(g))  # type: ignore[arg-type]
        written.append(outputs.write_bytes(where.file(f"{name}.npz"), buf.getvalue()))
    return written


def _slug(type_name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z][a-z])", "-", type_name).lower()


def _numbered(arrays: dict[str, NDArray[Any]], prefix: str) -> dict[int, NDArray[Any]]:
    pattern = re.compile(rf"{prefix}(\d+)$")
    return {int(m.group(1)): v for k, v in arrays.items() if (m := pattern.match(k))}


def load_file(path: Path) -> LayerGolden:
    """One layer golden file; a file that is not one gets an error naming it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(str(arrays.pop("meta")))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")

        def listed(prefix: str) -> list[NDArray[Any]]:
            got = _numbered(arrays, prefix)
            return [got[i] for i in range(len(got))]

        return LayerGolden(
            meta["name"],
            meta["type"],
            meta["prototxt"],
            CaffeLayerSpec.from_dict(meta["spec"]),
            listed("b"),
            listed("p"),
            listed("g"),
            listed("t"),
            _numbered(arrays, "db"),
            _numbered(arrays, "dp"),
        )
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as exc:
        raise CrossvalError(f"{path} is not a crossval layer golden file: {exc}") from None


def load(directory: Path) -> list[LayerGolden]:
    """Every layer golden file in `directory`/layers (none: an empty list)."""
    sub = directory / SUBDIR
    return [load_file(p) for p in sorted(sub.glob("*.npz"))] if sub.is_dir() else []


@dataclass
class GoldenValue:
    """One output of a layer golden case: Caffe's value, the stored one, the bound."""

    kind: str  # "forward" or "backward"
    key: str  # "t<i>", "b<i>" (a bottom's diff) or "layer/<i>" (a param's diff)
    actual: NDArray[Any]
    desired: F64
    bound: F64
    rule: str


def caffe_values(worker: CaffeWorker, g: LayerGolden) -> list[GoldenValue]:
    """Run `g` through the Caffe behind `worker`; each output beside its stored value."""
    spec = g.layer_spec
    bound = LAYER_BOUNDS[g.type]
    caffe = worker.run(
        prototxt=g.prototxt,
        inputs={f"b{i}": b for i, b in enumerate(g.bottoms)},
        params={LAYER: list(g.blobs)} if g.blobs else None,
        phase="TEST",
        backward=True,
        top_diffs={f"t{i}": d for i, d in enumerate(g.top_diffs)},
        all_diffs=True,
        return_params=False,
    )
    b64 = [np.asarray(b, np.float64) for b in g.bottoms]
    p64 = [np.asarray(p, np.float64) for p in g.blobs]
    d64 = [np.asarray(d, np.float64) for d in g.top_diffs]
    fwd = bound.forward(spec, b64, p64, g.tops)
    bb, bp = bound.backward(spec, b64, p64, g.tops, d64)
    frule, brule = f"tolerances.{bound.forward_rule}", f"tolerances.{bound.backward_rule}"
    values = [
        GoldenValue("forward", f"t{i}", caffe.blobs[f"t{i}"], t, fwd[i], frule)
        for i, t in enumerate(g.tops)
    ]
    for i, d in sorted(g.bottom_diffs.items()):
        b = bb[i]
        if b is not None:
            values.append(GoldenValue("backward", f"b{i}", caffe.diffs[f"b{i}"], d, b, brule))
    for i, d in sorted(g.param_diffs.items()):
        b = bp[i]
        if b is not None:
            actual = caffe.param_diffs[LAYER][i]
            values.append(GoldenValue("backward", f"{LAYER}/{i}", actual, d, b, brule))
    return values


__all__ = [
    "PER_TYPE",
    "GoldenValue",
    "LayerGolden",
    "caffe_values",
    "cases_to_write",
    "compute",
    "draw",
    "encode",
    "load",
    "load_file",
    "reference_values",
    "write",
]
