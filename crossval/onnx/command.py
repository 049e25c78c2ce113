"""crossval export-onnx: a Caffe head exported, checked against Caffe on generated inputs and
written atomically only when every check passes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from numpy.typing import NDArray

from .. import outputs
from ..compare import Comparison
from ..provision.source import sha256_file
from ..worker import CaffeWorker
from .caffe_head import CaffeHead, load_caffe_head
from .export import export, opset_of
from .runtime import Runtime, forward_comparisons
from .spec import EXPORTER, OUTPUT, HeadSpec, OnnxCheckFailed, OnnxInputError, OnnxModelInvalid
from .validate import fixed_constant, validate

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]


# ---- export a Caffe head, checked ---------------------------------------------------------

SPREADS: tuple[float | None, ...] = (None, 1.0, 25.0, 60.0, 120.0, 300.0)


def check_inputs(
    head: CaffeHead, examples: int, batch: int, seed: int = 0
) -> Iterator[tuple[str, F32]]:
    """Generated inputs: the features as drawn (standard normal), then scaled so the largest
    |pre-activation| (sigmoid) or logit spread (expectation) reaches 1, 25, 60, 120 and 300
    (saturation, exp underflow); batch 1 every fourth input, `batch` otherwise."""
    rng = np.random.default_rng(seed)
    w = head.params[head.spec.ip_layer][0].astype(np.float64)
    for i in range(examples):
        n = 1 if i % 4 == 0 else batch
        x = rng.standard_normal((n, head.spec.features))
        spread = SPREADS[i % len(SPREADS)]
        label = "as drawn"
        if spread is not None:
            z = x @ w.T
            reach = float(head.spec.row.reach(z))
            if reach > 0:
                x *= spread / reach
                label = f"spread {spread:g}"
        yield f"input {i} N={n} {label}", x.astype(np.float32).reshape(n, *head.spec.input_dims)


@dataclass
class ExportReport:
    out: Path
    spec: HeadSpec
    opset: int
    ir_version: int
    size: int
    export_seconds: float
    check_seconds: float
    inputs: int
    comparisons: list[Comparison] = field(repr=False, default_factory=list)
    constant: str = ""
    notes: list[str] = field(default_factory=list)

    def margins(self) -> dict[tuple[str, str], float]:
        """Largest err/bound per (check, blob) over all inputs (below 1 passes)."""
        worst: dict[tuple[str, str], float] = {}
        for c in self.comparisons:
            key = (c.check, c.blob)
            worst[key] = max(worst.get(key, 0.0), c.ratio)
        return worst

    def __str__(self) -> str:
        s = self.spec
        ip_type, act_type, out_type = s.row.layer_types
        chain = (
            f"{s.ip_layer} ({ip_type} {s.features} -> {s.outputs}) -> "
            f"{s.row.activation} ({act_type}) -> {OUTPUT} ({out_type}, {s.fixed_text()})"
        )
        margins = self.margins()
        lines = [
            f"head       {s.head}: {s.input_blob} -> {chain}",
            f"exported   {EXPORTER}, torch {torch.__version__}, opset {self.opset}, "
            f"IR {self.ir_version}, batch axis dynamic ({self.export_seconds:.1f} s)",
            "validated  onnx.checker full check, strict shape inference, "
            f"{self.constant} bit for bit (not a graph input)",
            f"checked    {self.inputs} generated inputs (batch 1 and more, spreads up to "
            f"{max(x for x in SPREADS if x is not None):g}) in {self.check_seconds:.1f} s; "
            "largest err/bound:",
        ]
        for check in ("onnxruntime~caffe", "onnxruntime~ref64", "caffe~ref64"):
            row = [
                f"{b} {margins[(f'forward {check}', b)]:.3g}"
                for b in s.blobs
                if (f"forward {check}", b) in margins
            ]
            lines.append(f"           {check:<18} " + ", ".join(row))
        lines += [f"note       {note}" for note in self.notes]
        lines.append(f"wrote      {self.out} ({self.size} bytes)")
        return "\n".join(lines)


def check_against_caffe(
    worker: CaffeWorker,
    head: CaffeHead,
    data: bytes,
    examples: int = 20,
    batch: int = 8,
    seed: int = 0,
) -> list[Comparison]:
    """The serialized model under onnxruntime against Caffe (within cross(bound)) and the
    float64 reference (within bound) on generated inputs; Caffe against float64 too."""
    runtime = Runtime(data, "onnxruntime")
    weights = head.learnable()
    out: list[Comparison] = []
    for label, x in check_inputs(head, examples, batch, seed):
        caffe = head.forward(worker, x)
        ort = runtime(x)
        flat = x.reshape(x.shape[0], -1)
        out += forward_comparisons(
            head.spec,
            flat,
            weights,
            {"caffe": caffe, "onnxruntime": ort},
            f"{head.spec.describe()} {label}",
        )
    return out


def export_caffe_head(
    worker: CaffeWorker,
    prototxt: Path,
    weights: Path,
    out: Path,
    *,
    examples: int = 20,
    batch: int = 8,
    opset: int | None = None,
    force: bool = False,
    seed: int = 0,
) -> ExportReport:
    """Caffe head -> validated ONNX file: identify the head and read its weights through
    Caffe, transfer them onto the reference, export, validate, check the serialized model
    under onnxruntime against Caffe on `examples` generated inputs, and only then write `out`
    (through a temporary file, reloaded and compared byte for byte before it replaces
    anything). A model that fails is not written: OnnxCheckFailed (exit status 1) says why."""
    prototxt, weights, out = Path(prototxt), Path(weights), Path(out)
    if examples < 1 or batch < 1:
        raise OnnxInputError(f"--examples and --batch-check must be >= 1 ({examples}, {batch})")
    target = outputs.target(out, "-o", force=force, inputs=[prototxt, weights])
    head = load_caffe_head(worker, prototxt, weights)
    source = {
        "crossval.source.prototxt": prototxt.name,
        "crossval.source.caffemodel": weights.name,
        "crossval.source.caffemodel_sha256": sha256_file(weights),
    }
    t0 = time.perf_counter()
    try:
        model = export(head.spec, head.transferred(), opset=opset, metadata=source)
    except OnnxModelInvalid as exc:
        raise OnnxCheckFailed(f"the exported model is invalid; not writing {out}: {exc}") from None
    export_seconds = time.perf_counter() - t0
    # Everything below checks the very bytes that will be written.
    data = model.SerializeToString()
    t1 = time.perf_counter()
    try:
        validate(onnx.load_model_from_string(data), head.spec)
        name, _, where = fixed_constant(model, head.spec)
        comparisons = check_against_caffe(worker, head, data, examples, batch, seed)
    except OnnxModelInvalid as exc:
        raise OnnxCheckFailed(f"the exported model is invalid; not writing {out}: {exc}") from None
    check_seconds = time.perf_counter() - t1
    failed = [c for c in comparisons if not c.passed]
    if failed:
        inputs = len({c.case for c in failed})
        shown = "\n  ".join(str(c) for c in failed[:6])
        more = f"\n  ... and {len(failed) - 6} more" if len(failed) > 6 else ""
        raise OnnxCheckFailed(
            f"the exported model disagrees on {inputs} of {examples} inputs "
            f"({len(failed)} comparisons); not writing {out}:\n  {shown}{more}",
            comparisons,
        )
    notes = []
    if not head.params[head.spec.ip_layer][0].any():
        notes.append(
            f"{head.spec.ip_layer}'s weights are all zero (a fresh net, as `crossval surgery` "
            "leaves it): every age is the same, whatever the input"
        )
    outputs.write_bytes(target, data)
    return ExportReport(
        out,
        head.spec,
        opset_of(model),
        int(model.ir_version),
        len(data),
        export_seconds,
        check_seconds,
        examples,
        comparisons,
        f"{name} = {head.spec.fixed_text()} ({where})",
        notes,
    )
