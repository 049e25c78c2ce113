"""Run an ONNX model (onnxruntime or onnx.reference) and compare its blobs with the float64
reference within the forward bounds."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from torch import nn

from .. import tolerances as tol
from ..compare import Comparison
from ..errors import CrossvalError
from .spec import HeadSpec, OnnxInputError, OnnxModelInvalid

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]


# ---- running ----------------------------------------------------------------------------------

RUNTIMES = ("onnxruntime", "reference")


class Runtime:
    """One model loaded in onnxruntime (CPU, one thread, default graph optimizations) or in
    ``onnx.reference.ReferenceEvaluator``; called with features, returns every output."""

    def __init__(self, model: onnx.ModelProto | bytes, runtime: str = "onnxruntime") -> None:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
        self.runtime = runtime
        self.input = proto.graph.input[0].name
        self.outputs = [o.name for o in proto.graph.output]
        self._run: Any
        try:
            if runtime == "onnxruntime":
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                opts.inter_op_num_threads = 1
                opts.log_severity_level = 3
                data = model if isinstance(model, bytes) else model.SerializeToString()
                self._run = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]).run
            elif runtime == "reference":
                from onnx.reference import ReferenceEvaluator

                self._run = ReferenceEvaluator(proto).run
            else:
                raise OnnxInputError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
        except CrossvalError:
            raise
        except Exception as exc:
            raise OnnxModelInvalid(
                f"{runtime} cannot load the model: {type(exc).__name__}: {exc}"
            ) from None

    def __call__(self, x: F32) -> dict[str, F32]:
        got = self._run(self.outputs, {self.input: np.ascontiguousarray(x, dtype=np.float32)})
        return {name: np.asarray(v) for name, v in zip(self.outputs, got, strict=True)}


@functools.lru_cache(maxsize=64)
def _module64(spec: HeadSpec) -> nn.Module:
    return spec.module(torch.float64)


def reference64(
    spec: HeadSpec, x: F32, weights: Mapping[str, F32]
) -> tuple[dict[str, F64], dict[str, F64]]:
    """The float64 reference's blobs on (x, weights), and each blob's float32 error bound
    from the tolerance table (``Head.forward_bounds``)."""
    module = _module64(spec)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for key in spec.learnable:
            params[key].copy_(torch.from_numpy(np.asarray(weights[key], dtype=np.float64)))
        out = module(torch.from_numpy(np.asarray(x, dtype=np.float64)))
    blobs = {k: v.numpy().copy() for k, v in out.items()}
    case = spec.case(np.asarray(x, dtype=np.float32), weights)
    head = spec.row
    ref: dict[str, F64] = dict(blobs)
    ref["pool5"] = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
    for key in head.learnable(case):
        ref[key] = np.asarray(case.weights[key], dtype=np.float64)
    return blobs, head.forward_bounds(ref, case)


def _rule(spec: HeadSpec, blob: str) -> str:
    return "tolerances." + spec.row.forward_rule(blob, spec.shape)


def forward_comparisons(
    spec: HeadSpec,
    x: F32,
    weights: Mapping[str, F32],
    runs: Mapping[str, Mapping[str, NDArray[Any]]],
    desc: str = "",
    blobs: tuple[str, ...] | None = None,
) -> list[Comparison]:
    """Each run ("onnxruntime", "reference", ...) against the float64 reference within the
    forward bound, and against the "caffe" run (if given) within ``tolerances.cross`` of it;
    Caffe itself against the float64 reference too."""
    ref, bounds = reference64(spec, x, weights)
    out: list[Comparison] = []
    n = x.shape[0]
    for blob in blobs or spec.blobs:
        rule = _rule(spec, blob)
        caffe = runs.get("caffe")
        for name, run in runs.items():
            got = np.asarray(run[blob]).reshape(n, -1)
            out.append(
                Comparison(f"forward {name}~ref64", blob, got, ref[blob], bounds[blob], rule, desc)
            )
            if caffe is not None and name != "caffe":
                want = np.asarray(caffe[blob]).reshape(n, -1)
                out.append(
                    Comparison(
                        f"forward {name}~caffe",
                        blob,
                        got,
                        want,
                        tol.cross(bounds[blob]),
                        rule,
                        desc,
                    )
                )
    return out
