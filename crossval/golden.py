"""Golden vectors: frozen cases with the float64 reference's blobs, loss and every gradient.

`crossval check-build` runs each through the Caffe under test and compares against these
stored values (not a live reference, so a change to the reference cannot hide a build's
regression, nor a build's regression hide behind the reference). The files are produced by

    python -m crossval golden --out crossval/golden --force

from ``GOLDEN_CASES`` below and never edited by hand; tests/test_golden.py regenerates them
and checks the stored ones are exactly what the command writes.

One ``.npz`` per case: ``meta`` (JSON: head, loss, parameters), the inputs ``x`` and
``target``, ``w:<state_dict key>`` for the learnable weights (float32), ``fwd:<blob>`` and
``loss`` (float64 forward), ``grad:<name>`` (float64 d loss / d pool5, each blob and param).
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import outputs
from .checks import REFERENCE, run_torch
from .errors import CrossvalError
from .heads import HEADS, Case
from .strategies import build_case

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
FORMAT = 1
REGENERATE = "python -m crossval golden --out crossval/golden --force"

# name -> build_case arguments (each with its own seed, so adding a case changes no other).
# Each covers a head x loss and one hard region.
GOLDEN_CASES: dict[str, dict[str, Any]] = {
    "sigmoid-euclidean": dict(seed=7, head="sigmoid_scale", loss="euclidean", batch=8, spread=3.0),
    "sigmoid-euclidean-saturated": dict(
        seed=8, head="sigmoid_scale", loss="euclidean", batch=8, spread=40.0, targets="ends"
    ),
    "sigmoid-euclidean-single": dict(
        seed=9, head="sigmoid_scale", loss="euclidean", batch=1, features=1
    ),
    "sigmoid-smoothl1": dict(seed=10, head="sigmoid_scale", loss="smooth_l1", batch=8, spread=3.0),
    "sigmoid-smoothl1-sigma3": dict(
        seed=11,
        head="sigmoid_scale",
        loss="smooth_l1",
        batch=8,
        spread=6.0,
        sigma=3.0,
        near_prediction=True,
    ),
    "expectation-euclidean-k100": dict(
        seed=1, head="expectation", loss="euclidean", bins=100, spread=5.0
    ),
    "expectation-euclidean-k101-spread150": dict(
        seed=2, head="expectation", loss="euclidean", bins=101, spread=150.0
    ),
    "expectation-smoothl1-sigma2": dict(
        seed=3, head="expectation", loss="smooth_l1", bins=101, spread=8.0, sigma=2.0
    ),
    "expectation-softmax-valid": dict(
        seed=6, head="expectation", loss="softmax_with_loss", bins=101, spread=10.0
    ),
    "expectation-softmax-full-ignore": dict(
        seed=4,
        head="expectation",
        loss="softmax_with_loss",
        bins=100,
        spread=30.0,
        normalization="FULL",
        ignoring="some",
    ),
    "expectation-softmax-k2-batchsize": dict(
        seed=5,
        head="expectation",
        loss="softmax_with_loss",
        bins=2,
        batch=1,
        spread=4.0,
        normalization="BATCH_SIZE",
    ),
}
_DEFAULTS: dict[str, Any] = dict(batch=8, features=32)


@dataclass
class Reference:
    """A case and the float64 reference's values for it."""

    name: str
    case: Case
    blobs: dict[str, np.ndarray]  # forward, float64
    loss: float
    grads: dict[str, np.ndarray]  # d loss / d (pool5, blobs, learnable params), float64


def case_of(name: str) -> Case:
    args = {**_DEFAULTS, **GOLDEN_CASES[name]}
    case = build_case(**args)
    return Case(**{**case.__dict__, "region": name})


def compute(name: str, case: Case) -> Reference:
    """The float64 reference on `case` (the same call every check makes)."""
    t64 = run_torch(HEADS[case.head], REFERENCE, case, torch.float64)
    return Reference(name, case, t64.blobs, t64.loss, t64.grads)


def live(case: Case) -> Reference:
    return compute(case.region or case.describe(), case)


def _meta(case: Case) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "head": case.head,
        "loss": case.loss,
        "bins": case.bins,
        "scale": case.scale,
        "sigma": case.sigma,
        "normalization": case.normalization,
        "ignore_label": case.ignore_label,
        "name": case.region,
        "made_by": REGENERATE,
    }


def encode(ref: Reference) -> dict[str, np.ndarray]:
    arrays = {
        "meta": np.array(json.dumps(_meta(ref.case), sort_keys=True)),
        "x": ref.case.x,
        "target": ref.case.target,
        "loss": np.array(ref.loss, dtype=np.float64),
    }
    arrays.update({f"w:{k}": v for k, v in ref.case.weights.items()})
    arrays.update({f"fwd:{k}": np.asarray(v, np.float64) for k, v in ref.blobs.items()})
    arrays.update({f"grad:{k}": np.asarray(v, np.float64) for k, v in ref.grads.items()})
    return arrays


def write(out: Path, force: bool = False) -> list[Path]:
    """Compute every golden case and write one .npz each into `out`.

    Files already there are replaced only with `force` (crossval.outputs' policy).
    """
    d = outputs.directory(out, "--out", force=force, names=[f"{n}.npz" for n in GOLDEN_CASES])
    targets = {name: d.file(f"{name}.npz") for name in GOLDEN_CASES}
    for name, target in targets.items():
        buf = io.BytesIO()
        np.savez_compressed(buf, **encode(compute(name, case_of(name))))  # type: ignore[arg-type]
        outputs.write_bytes(target, buf.getvalue())
    return [t.path for t in targets.values()]


def load_file(path: Path) -> Reference:
    """One golden file; a file that is not one gets an error naming it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise CrossvalError(f"{path} is not a crossval golden file: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CrossvalError(f"{path}: golden format {meta.get('format')}, expected {FORMAT}")
    weights = {k[2:]: v for k, v in arrays.items() if k.startswith("w:")}
    case = Case(
        head=meta["head"],
        loss=meta["loss"],
        x=arrays["x"],
        target=arrays["target"],
        weights=weights,
        bins=meta["bins"],
        scale=meta["scale"],
        sigma=meta["sigma"],
        normalization=meta["normalization"],
        ignore_label=meta["ignore_label"],
        region=meta["name"],
    )
    return Reference(
        meta["name"],
        case,
        {k[4:]: v for k, v in arrays.items() if k.startswith("fwd:")},
        float(arrays["loss"]),
        {k[5:]: v for k, v in arrays.items() if k.startswith("grad:")},
    )


def load(directory: Path = GOLDEN_DIR) -> list[Reference]:
    paths = sorted(directory.glob("*.npz"))
    if not paths:
        raise CrossvalError(f"no golden files (*.npz) in {directory}; make them with {REGENERATE}")
    return [load_file(p) for p in paths]


__all__ = ["GOLDEN_CASES", "GOLDEN_DIR", "REGENERATE", "Reference", "case_of", "load", "write"]
