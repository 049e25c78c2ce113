"""Both heads as ONNX models: exported from the PyTorch reference, validated, run under
onnxruntime and ``onnx.reference``, and checked against Caffe before anything is written.

- ``export``: the reference head (``reference/heads.py``) through ``torch.onnx.export`` (the
  dynamo exporter, its default) with a dynamic batch axis; the input is named after the Caffe
  input blob (``pool5``) and the outputs after the Caffe blobs (``<ip>``, ``pred01``/``prob``,
  ``pred_age``); opset, exporter and head go in ``metadata_props``. The graph is exported
  from placeholder weights; ``with_weights`` writes real ones into the two learnable
  initializers, so one export per net shape serves any weights.
- ``validate``: ``onnx.checker`` (full check), strict shape inference with the batch axis
  symbolic, the learnable initializers feeding the InnerProduct node, and the fixed constant
  (the Scale's 99, or the arange(K) kernel) an initializer or Constant, bit for bit, and never
  a graph input a runtime could override.
- ``Runtime``: a model loaded in onnxruntime or the ONNX reference evaluator.
- ``load_caffe_head`` / ``export_caffe_head``: a Caffe head (deploy prototxt + caffemodel)
  identified, its weights transferred, exported, checked against Caffe on generated inputs
  (within ``tolerances.cross`` of the forward bounds), then written atomically.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import re
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from onnx import numpy_helper
from torch import Tensor, nn

from . import __version__, outputs, transfer
from . import tolerances as tol
from .compare import Comparison, exact
from .errors import CrossvalError
from .heads import HEADS, Case, Head
from .inputs import check_net, read_prototxt
from .worker import CaffeCrash, CaffeError, CaffeWorker

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]

OUTPUT = "pred_age"
BATCH_AXIS = "batch"
EXPORTER = "torch.onnx.export (dynamo)"


class OnnxInputError(CrossvalError):
    """Bad input: a file that is not what it should be, or a net that is not one of the heads."""


class OnnxModelInvalid(CrossvalError):
    """An ONNX model fails validation (checker, shapes, structure or the fixed constants)."""


class OnnxCheckFailed(CrossvalError):
    """The exported model failed its checks; nothing was written (exit status 1)."""

    exit_code = 1

    def __init__(self, message: str, comparisons: list[Comparison] | None = None) -> None:
        super().__init__(message)
        self.comparisons = comparisons or []


# ---- the head to export -------------------------------------------------------------------


@dataclass(frozen=True)
class HeadSpec:
    """What an exported file holds beside the head's own description (``heads.HEADS``): the
    head of that shape (D, K or the scale, the InnerProduct's Caffe name) and the input
    blob's name and per-example dims. Blobs, params, the fixed constant and the reference
    module all come from the head's row, through `shape`."""

    head: str
    features: int
    bins: int = 100  # K, where the head has bins
    scale: float = 99.0  # where the head has a scale
    ip_layer: str = ""  # default: the head's (fc1 / fc<K>)
    input_blob: str = "pool5"
    input_dims: tuple[int, ...] = ()  # per-example input dims; default (features,)

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise OnnxInputError(f"unknown head {self.head!r}; known: {', '.join(HEADS)}")
        row = HEADS[self.head]
        try:
            row.check(self.case(np.zeros((1, max(self.features, 0)), np.float32), {}))
        except ValueError as exc:
            raise OnnxInputError(str(exc)) from None
        if not self.ip_layer:
            object.__setattr__(self, "ip_layer", row.default_ip_name(self.bins))
        if not self.input_dims:
            object.__setattr__(self, "input_dims", (self.features,))
        if int(np.prod(self.input_dims)) != self.features:
            raise OnnxInputError(
                f"input {self.input_blob!r} has per-example dims {self.input_dims} "
                f"({int(np.prod(self.input_dims))} values), not the {self.features} features"
            )

    @classmethod
    def from_case(cls, case: Case) -> HeadSpec:
        return cls(case.head, case.features, case.bins, case.scale, case.ip_name)

    @property
    def row(self) -> Head:
        return HEADS[self.head]

    @property
    def shape(self) -> Case:
        """A case of this head's shape (one zero example, no weights): what the head's row
        reads its blobs, params and constants from."""
        return self.case(np.zeros((1, self.features), np.float32), {})

    @property
    def outputs(self) -> int:
        """The InnerProduct's num_output."""
        return self.row.outputs(self.shape)

    @property
    def blobs(self) -> tuple[str, ...]:
        return self.row.blobs(self.shape)

    @property
    def learnable(self) -> tuple[str, ...]:
        return self.row.learnable(self.shape)

    def fixed_value(self) -> F32:
        """The constant the head must hold (the Scale's [99.], the kernel arange(K)[None])."""
        return self.row.fixed_value(self.shape)

    def fixed_text(self) -> str:
        return self.row.fixed_text(self.shape)

    def module(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The reference head (learnable weights as PyTorch initialises them)."""
        return self.row.module(self.shape).to(dtype).eval()

    def describe(self) -> str:
        text = f"{self.head} D={self.features} {self.row.shape_text(self.shape)}"
        return text + (f" ip={self.ip_layer}" if self.row.renamable else "")

    def case(self, x: F32, weights: Mapping[str, F32], region: str = "") -> Case:
        """The case the head and tolerance tables describe: this head, shape and
        InnerProduct name (a custom one, such as fc8-101, carried by the case)."""
        row = HEADS[self.head]
        custom = self.ip_layer and self.ip_layer != row.default_ip_name(self.bins)
        target = np.zeros((x.shape[0], 1), dtype=np.float32)
        return Case(
            self.head,
            "euclidean",
            x,
            target,
            dict(weights),
            bins=self.bins,
            scale=self.scale,
            region=region,
            ip_name=self.ip_layer if custom else "",
        )

    def metadata(self) -> dict[str, str]:
        meta = {
            "crossval.head": self.head,
            "crossval.features": str(self.features),
            "crossval.ip_layer": self.ip_layer,
            "crossval.input": self.input_blob,
            "crossval.input_dims": ",".join(map(str, self.input_dims)),
            "crossval.outputs": ",".join(self.blobs),
        }
        meta.update({f"crossval.{k}": v for k, v in self.row.shape_metadata(self.shape).items()})
        return meta

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> HeadSpec:
        head = props.get("crossval.head")
        if head is None:
            raise OnnxInputError(
                "the model carries no crossval metadata (crossval.head): name the head to "
                "expect instead"
            )
        try:
            features = int(props["crossval.features"])
            dims = tuple(int(d) for d in props.get("crossval.input_dims", "").split(",") if d)
            return cls(
                head,
                features,
                bins=int(props.get("crossval.bins", "100")),
                scale=float(props.get("crossval.scale", "99.0")),
                ip_layer=props.get("crossval.ip_layer", ""),
                input_blob=props.get("crossval.input", "pool5"),
                input_dims=dims,
            )
        except (KeyError, ValueError) as exc:
            raise OnnxInputError(f"the model's crossval metadata is unreadable: {exc}") from None


# ---- export ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs optional-op registrations, deprecations and opset-conversion
    fallbacks: keep them off the CLI (a failed conversion is reported by `export` itself)."""
    logs = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def plain(text: str) -> str:
    """Captured exporter text without its terminal colour codes."""
    return ANSI_ESCAPE.sub("", text)


class _Interrupts:
    """Notes a Ctrl-C (SIGINT) while active: the exporter may wrap the KeyboardInterrupt in
    an error of its own, which must still end crossval as interrupted."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)

            def noted(signum: int, frame: FrameType | None) -> None:
                self.seen = True
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, noted)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def caused(self, exc: BaseException) -> bool:
        seen: set[int] = set()
        cause: BaseException | None = exc
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, KeyboardInterrupt):
                return True
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        return self.seen


def exporter_versions() -> dict[str, str]:
    import onnxscript

    return {
        "exporter": EXPORTER,
        "exporter.torch": torch.__version__,
        "exporter.onnxscript": str(onnxscript.__version__),
        "exporter.onnx": onnx.__version__,
        "crossval.version": __version__,
    }


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise OnnxModelInvalid("the model imports no default-domain (ai.onnx) opset")


def export(
    spec: HeadSpec,
    weights: Mapping[str, F32] | None = None,
    opset: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> onnx.ModelProto:
    """The reference head as a validated ONNX model with a dynamic batch axis.

    The graph is exported once from the reference holding placeholder weights (a fixed
    pseudo-random draw), and `weights` (by state_dict key) are then written into its two
    learnable initializers (`with_weights`): the exporter's optimizer sees generic values, so
    the graph's structure cannot depend on the weights (it drops an all-zero bias, for one).
    The fixed constant always comes from the reference and is checked bit for bit.
    """
    module = spec.module(torch.float32)
    state = module.state_dict()
    rng = np.random.default_rng(0)
    placeholders = {}
    for key in spec.learnable:
        shape = tuple(state[key].shape)
        placeholders[key] = (rng.standard_normal(shape) * 0.1 + 0.01).astype(np.float32)
        state[key] = torch.from_numpy(placeholders[key])
    module.load_state_dict(state)
    example = torch.zeros((2, *spec.input_dims), dtype=torch.float32)
    interrupts = _Interrupts()
    try:
        with _quiet_exporter(), interrupts:
            program = torch.onnx.export(
                module,
                (example,),
                input_names=[spec.input_blob],
                output_names=list(spec.blobs),
                opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim(BATCH_AXIS)},),
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:
        if interrupts.caused(exc):
            raise KeyboardInterrupt from None
        first = (plain(str(exc)).strip().splitlines() or [""])[0]
        at = f" at opset {opset}" if opset is not None else ""
        raise OnnxInputError(
            f"torch.onnx.export failed for {spec.describe()}{at}: {type(exc).__name__}: {first}"
        ) from None
    if program is None:
        raise OnnxInputError("torch.onnx.export returned no program")
    model: onnx.ModelProto = program.model_proto
    if opset is not None and opset_of(model) != opset:
        raise OnnxInputError(
            f"torch.onnx.export could not give {spec.describe()} opset {opset} (its version "
            f"converter left opset {opset_of(model)}); choose an opset it supports"
        )
    model = with_weights(model, spec, placeholders if weights is None else weights)
    props = {**spec.metadata(), **exporter_versions(), "opset": str(opset_of(model))}
    props.update(metadata or {})
    onnx.helper.set_model_props(model, props)
    model.doc_string = f"crossval: {spec.describe()}, {spec.fixed_text()}"
    validate(model, spec)
    return model


def with_weights(
    model: onnx.ModelProto, spec: HeadSpec, weights: Mapping[str, F32]
) -> onnx.ModelProto:
    """A copy of `model` whose learnable initializers (by state_dict key, exactly the two the
    InnerProduct node reads) hold `weights`; nothing else changes."""
    if set(weights) != set(spec.learnable):
        raise OnnxInputError(
            f"weights {sorted(weights)} are not the learnable params {list(spec.learnable)} "
            f"of {spec.describe()}"
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    where = _learnable_initializers(out.graph, spec)
    for key in spec.learnable:
        value = np.asarray(weights[key])
        if value.dtype != np.float32:
            raise OnnxInputError(f"weight {key!r} is {value.dtype}, not float32")
        init = out.graph.initializer[where[key]]
        if tuple(init.dims) != value.shape:
            raise OnnxInputError(
                f"weight {key!r} has shape {value.shape}, the model's initializer "
                f"{tuple(init.dims)}"
            )
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), key))
    return out


# ---- validation -----------------------------------------------------------------------------


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _learnable_initializers(graph: onnx.GraphProto, spec: HeadSpec) -> dict[str, int]:
    """Index of each learnable initializer; each must exist once and feed the IP node."""
    node = _producers(graph).get(spec.ip_layer)
    if node is None:
        raise OnnxModelInvalid(f"no node computes the InnerProduct output {spec.ip_layer!r}")
    index: dict[str, int] = {}
    for i, init in enumerate(graph.initializer):
        if init.name in spec.learnable:
            if init.name in index:
                raise OnnxModelInvalid(f"initializer {init.name!r} appears twice")
            index[init.name] = i
    for key in spec.learnable:
        if key not in index:
            raise OnnxModelInvalid(
                f"the model has no initializer {key!r} (initializers: "
                f"{', '.join(t.name for t in graph.initializer)})"
            )
        if key not in node.input:
            raise OnnxModelInvalid(
                f"initializer {key!r} does not feed the {node.op_type} node computing "
                f"{spec.ip_layer!r} (its inputs: {', '.join(node.input)})"
            )
    return index


def _constant(graph: onnx.GraphProto, name: str) -> tuple[F32, str] | None:
    """The value named `name` if it is an initializer or a Constant node's output."""
    for init in graph.initializer:
        if init.name == name:
            return np.asarray(numpy_helper.to_array(init)), "initializer"
    node = _producers(graph).get(name)
    if node is None or node.op_type != "Constant":
        return None
    for attr in node.attribute:
        if attr.name == "value":
            return np.asarray(numpy_helper.to_array(attr.t)), "Constant node"
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32), "Constant node"
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32), "Constant node"
    return None


def fixed_constant(model: onnx.ModelProto, spec: HeadSpec) -> tuple[str, F32, str]:
    """(name, value, where) of the constant the `pred_age` node multiplies by."""
    graph = model.graph
    node = _producers(graph).get(OUTPUT)
    act = spec.row.activation
    if node is None:
        raise OnnxModelInvalid(f"no node computes {OUTPUT!r}")
    if act not in node.input:
        raise OnnxModelInvalid(
            f"{OUTPUT!r} is computed by a {node.op_type} node from "
            f"{', '.join(node.input)}, not from {act!r}"
        )
    operands = [name for name in node.input if name and name != act]
    if len(operands) != 1:
        raise OnnxModelInvalid(
            f"the {node.op_type} node computing {OUTPUT!r} has operands {operands} besides "
            f"{act!r}; expected exactly one constant"
        )
    name = operands[0]
    found = _constant(graph, name)
    if found is None:
        producer = _producers(graph).get(name)
        how = f"computed by a {producer.op_type} node" if producer else "a graph input"
        raise OnnxModelInvalid(
            f"the {OUTPUT} operand {name!r} is {how}, not an initializer or Constant"
        )
    if name in {i.name for i in graph.input}:
        raise OnnxModelInvalid(
            f"the {OUTPUT} constant {name!r} is also a graph input: a runtime could override "
            f"the {spec.fixed_text()}"
        )
    return name, found[0], found[1]


def constants(model: onnx.ModelProto, spec: HeadSpec) -> list[Comparison]:
    """The fixed constant against the head's value, bit for bit (the Scale's 99, or the
    kernel arange(K)); a missing, computed, overridable or wrongly sized one is an error."""
    name, value, where = fixed_constant(model, spec)
    want = spec.fixed_value()
    if value.size != want.size:
        raise OnnxModelInvalid(
            f"the {OUTPUT} constant {name!r} has shape {value.shape} ({value.size} values); "
            f"{spec.describe()} needs {want.shape} ({spec.fixed_text()})"
        )
    return [
        exact(
            "onnx constant", f"{name} ({where})", value.reshape(want.shape), want, spec.describe()
        )
    ]


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in t.shape.dim]


def validate(model: onnx.ModelProto, spec: HeadSpec) -> list[Comparison]:
    """Check `model` as an export of `spec`; raise OnnxModelInvalid naming the first problem.

    onnx.checker with full_check, strict shape inference; one graph input (the features,
    float, [batch, dims...] with batch symbolic); outputs the Caffe blobs with shapes
    [batch, K] / [batch, 1]; the learnable initializers feeding the InnerProduct node; the
    fixed constant bit for bit (returned, all passed)."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise OnnxModelInvalid(f"onnx.checker (full check) rejects the model: {exc}") from None
    try:
        inferred = onnx.shape_inference.infer_shapes(
            model, check_type=True, strict_mode=True, data_prop=True
        )
    except Exception as exc:
        raise OnnxModelInvalid(f"shape inference fails: {exc}") from None
    graph = inferred.graph
    inputs = [i.name for i in graph.input]
    if inputs != [spec.input_blob]:
        raise OnnxModelInvalid(
            f"graph inputs are {inputs}, expected only {spec.input_blob!r}: weights and the "
            "fixed constant must be initializers a runtime cannot override"
        )
    x_dims = _dims(graph.input[0])
    elem = graph.input[0].type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise OnnxModelInvalid(
            f"input {spec.input_blob!r} is {onnx.TensorProto.DataType.Name(elem)}, not FLOAT"
        )
    if len(x_dims) != 1 + len(spec.input_dims) or not isinstance(x_dims[0], str):
        raise OnnxModelInvalid(
            f"input {spec.input_blob!r} has shape {x_dims}; expected [<symbolic batch>, "
            f"{', '.join(map(str, spec.input_dims))}]"
        )
    batch = x_dims[0]
    if tuple(x_dims[1:]) != spec.input_dims:
        raise OnnxModelInvalid(
            f"input {spec.input_blob!r} has shape {x_dims}; {spec.describe()} needs "
            f"[{batch}, {', '.join(map(str, spec.input_dims))}]"
        )
    outputs = {o.name: o for o in graph.output}
    want_out = {spec.ip_layer: spec.outputs, spec.row.activation: spec.outputs, OUTPUT: 1}
    if list(outputs) != list(spec.blobs):
        raise OnnxModelInvalid(f"graph outputs are {list(outputs)}, expected {list(spec.blobs)}")
    for name, width in want_out.items():
        dims = _dims(outputs[name])
        if dims != [batch, width]:
            raise OnnxModelInvalid(
                f"output {name!r} has shape {dims}; {spec.describe()} needs [{batch}, {width}]"
            )
        if outputs[name].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise OnnxModelInvalid(f"output {name!r} is not FLOAT")
    _learnable_initializers(graph, spec)
    checks = constants(model, spec)
    failed = [c for c in checks if not c.passed]
    if failed:
        raise OnnxModelInvalid("; ".join(str(c) for c in failed))
    return checks


def load_model(path: Path, expect: HeadSpec | None = None) -> tuple[onnx.ModelProto, HeadSpec]:
    """Read and validate an ONNX file written by `export_caffe_head` (or, with `expect`, any
    export of that head). Bad files are OnnxInputError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise OnnxInputError(f"no ONNX model at {path}")
    data = path.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # DecodeError, or RuntimeError from the upb parser
        raise OnnxInputError(
            f"{path} is not an ONNX model (truncated or another format; {len(data)} bytes): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if not model.HasField("graph") or not model.graph.node or not model.opset_import:
        raise OnnxInputError(
            f"{path} is not an ONNX model: it parses, but holds no graph or opset "
            f"({len(data)} bytes; truncated or another format)"
        )
    props = {p.key: p.value for p in model.metadata_props}
    if "crossval.head" in props:
        spec = HeadSpec.from_metadata(props)
        if expect is not None and spec != expect:
            raise OnnxInputError(f"{path} holds {spec.describe()}, not {expect.describe()}")
    elif expect is not None:
        spec = expect
    else:
        raise OnnxInputError(
            f"{path} carries no crossval metadata (crossval.head): name the head to expect"
        )
    try:
        validate(model, spec)
    except OnnxModelInvalid as exc:
        raise OnnxInputError(f"{path}: {exc}") from None
    return model, spec


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


# ---- a Caffe head ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _caffe_pb2(python_path: str) -> ModuleType:
    """Caffe's protobuf schema (caffe/proto/caffe_pb2.py of the pycaffe in use), loaded on its
    own: parsing a net needs only the schema, never libcaffe in this process."""
    where = Path(python_path) / "caffe" / "proto" / "caffe_pb2.py"
    spec = importlib.util.spec_from_file_location("_crossval_caffe_pb2", where)
    if spec is None or spec.loader is None:
        raise OnnxInputError(f"cannot load Caffe's schema from {where}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _in_test_phase(layer: Any, test: int) -> bool:
    """Whether Caffe's TEST-phase net (no stages, level 0) keeps `layer`."""

    def meets(rule: Any) -> bool:
        return (
            (not rule.HasField("phase") or rule.phase == test)
            and not rule.stage
            and (not rule.HasField("min_level") or rule.min_level <= 0)
            and (not rule.HasField("max_level") or rule.max_level >= 0)
        )

    if layer.include:
        return any(meets(r) for r in layer.include)
    return not any(meets(r) for r in layer.exclude)


@dataclass
class CaffeHead:
    """A Caffe head identified from its deploy net, with the params Caffe loaded."""

    spec: HeadSpec
    prototxt: Path
    weights: Path
    text: str
    input_shape: tuple[int, ...]
    params: dict[str, list[F32]]  # the IP and pred_age params, as Caffe holds them

    def learnable(self) -> dict[str, F32]:
        w, b = self.params[self.spec.ip_layer]
        return {self.spec.learnable[0]: w, self.spec.learnable[1]: b}

    def state_dict(self) -> dict[str, Tensor]:
        """Every Caffe param transferred onto the reference module (``crossval.transfer``)."""
        return transfer.caffe_to_state_dict(self.params, self.spec.module().state_dict())

    def transferred(self) -> dict[str, F32]:
        """The learnable weights as transferred, by state_dict key (bit-exact copies)."""
        state = self.state_dict()
        return {k: state[k].numpy() for k in self.spec.learnable}

    def forward(self, worker: CaffeWorker, x: F32) -> dict[str, F32]:
        """Caffe's TEST-phase forward with the caffemodel's weights; the head's blobs."""
        n = x.shape[0]
        got = worker.call(
            "run",
            prototxt=self.text,
            inputs={self.spec.input_blob: x.reshape(n, *self.input_shape[1:])},
            phase="TEST",
            weights=str(self.weights),
        )
        return {b: np.asarray(got["blobs"][b]).reshape(n, -1) for b in self.spec.blobs}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _blob_shape(blob: Any) -> tuple[int, ...]:
    """A caffemodel BlobProto's shape (``shape.dim``, or the legacy num/channels/h/w)."""
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    return (int(blob.num), int(blob.channels), int(blob.height), int(blob.width))


def _same_shapes(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> bool:
    """Equal up to leading 1s (legacy 4-d blobs pad their leading axes with 1)."""

    def strip(s: tuple[int, ...]) -> tuple[int, ...]:
        i = 0
        while i < len(s) - 1 and s[i] == 1:
            i += 1
        return s[i:]

    return len(a) == len(b) and all(strip(x) == strip(y) for x, y in zip(a, b, strict=True))


def _structure(net: Any, prototxt: Path, test: int) -> tuple[str, Any, str, tuple[int, ...]]:
    """(head, InnerProduct layer, input blob, input shape) of a deploy net, or OnnxInputError."""
    layers = [la for la in net.layer if _in_test_phase(la, test)]
    inputs: dict[str, tuple[int, ...]] = {}
    for la in layers:
        if la.type == "Input":
            shapes = list(la.input_param.shape)
            for i, top in enumerate(la.top):
                shape = shapes[i] if len(shapes) > 1 else (shapes[0] if shapes else None)
                inputs[top] = tuple(int(d) for d in shape.dim) if shape is not None else ()
    for i, name in enumerate(net.input):
        if net.input_shape:
            inputs[name] = tuple(int(d) for d in net.input_shape[i].dim)
        else:
            inputs[name] = tuple(int(d) for d in net.input_dim[4 * i : 4 * i + 4])
    body = [la for la in layers if la.type != "Input"]
    chain = " -> ".join(f"{la.name} ({la.type})" for la in body) or "no layers"
    hint = (
        "a head is exactly <input> -> InnerProduct 'fc1' -> Sigmoid 'pred01' -> Scale "
        "'pred_age', or <input> -> InnerProduct -> Softmax 'prob' -> Convolution 'pred_age' "
        f"(a deploy net, as `crossval prototxt HEAD --deploy` writes); {prototxt} has {chain}"
    )
    if len(inputs) != 1 or len(body) != 3:
        raise OnnxInputError(
            f"{prototxt} is not one of the heads: {len(inputs)} inputs "
            f"({', '.join(inputs) or 'none'}) and {len(body)} layers; {hint}"
        )
    (input_blob, input_shape), (ip, act, out) = next(iter(inputs.items())), body
    if len(input_shape) < 2:
        raise OnnxInputError(
            f"{prototxt}: input {input_blob!r} has shape {input_shape}; a head needs "
            "(batch, features...)"
        )
    for la, bottom in ((ip, input_blob), (act, ip.name), (out, act.name)):
        if list(la.bottom) != [bottom] or list(la.top) != [la.name]:
            raise OnnxInputError(
                f"{prototxt}: layer {la.name!r} reads {list(la.bottom)} and writes "
                f"{list(la.top)}; the head needs it to read [{bottom!r}] and write a blob "
                f"named after itself; {hint}"
            )
    if ip.type != "InnerProduct" or out.name != OUTPUT:
        raise OnnxInputError(f"{prototxt} is not one of the heads; {hint}")
    ipp = ip.inner_product_param
    if not ipp.bias_term or ipp.transpose or ipp.axis != 1:
        raise OnnxInputError(
            f"{prototxt}: InnerProduct {ip.name!r} must have a bias, axis 1 and no transpose "
            f"(it has bias_term {ipp.bias_term}, axis {ipp.axis}, transpose {ipp.transpose})"
        )
    by_types = {row.layer_types[1:]: row.name for row in HEADS.values()}
    head = by_types.get((act.type, out.type), "")
    if not head:
        raise OnnxInputError(
            f"{prototxt}: {act.name} ({act.type}) -> {out.name} ({out.type}) is neither "
            f"Sigmoid -> Scale nor Softmax -> Convolution; {hint}"
        )
    row = HEADS[head]
    if out.type == "Scale":
        sp = out.scale_param
        if sp.bias_term or sp.axis != 1 or sp.num_axes != 1:
            raise OnnxInputError(
                f"{prototxt}: Scale {OUTPUT!r} must be a plain scale (no bias, axis 1, num_axes 1)"
            )
    elif out.type == "Convolution":
        cp = out.convolution_param
        if act.softmax_param.axis not in (1, -1):
            raise OnnxInputError(
                f"{prototxt}: Softmax {act.name!r} is over axis {act.softmax_param.axis}, "
                "not the bins (axis 1)"
            )
        if (
            cp.bias_term
            or cp.num_output != 1
            or cp.kernel_size
            or cp.HasField("kernel_h")
            or cp.HasField("kernel_w")
            or cp.group != 1
        ):
            raise OnnxInputError(
                f"{prototxt}: Convolution {OUTPUT!r} must have num_output 1, bias_term false, "
                "no kernel size and one group (the seed's expectation layer)"
            )
    fixed_ip = row.default_ip_name(int(ipp.num_output)) if not row.renamable else ip.name
    if not row.has_bins and (ipp.num_output != 1 or ip.name != fixed_ip):
        raise OnnxInputError(
            f"{prototxt}: the {head} head's InnerProduct is {fixed_ip!r} with num_output "
            f"1; this one is {ip.name!r} with num_output {ipp.num_output}"
        )
    if act.name != row.activation:
        raise OnnxInputError(
            f"{prototxt}: the {act.type} layer must be named {row.activation!r} (the seed's "
            f"blob name), not {act.name!r}"
        )
    return head, ip, input_blob, input_shape


def load_caffe_head(worker: CaffeWorker, prototxt: Path, weights: Path) -> CaffeHead:
    """Identify the head in a deploy net and read its params through Caffe.

    The net must be exactly: one input -> InnerProduct ``fc1`` (num_output 1) -> Sigmoid
    ``pred01`` -> Scale ``pred_age``, or one input -> InnerProduct (any name, K outputs) ->
    Softmax ``prob`` -> Convolution ``pred_age`` (num_output 1, no bias, no kernel size). The
    caffemodel must hold the InnerProduct's weights with the prototxt's K and D, the Scale
    exactly 99 and the kernel exactly arange(K); anything else is OnnxInputError, raised
    before Caffe sees a mismatched file where it can.
    """
    prototxt, weights = Path(prototxt), Path(weights)
    text = read_prototxt(prototxt)
    if not weights.is_file():
        raise OnnxInputError(f"no caffemodel at {weights}")
    pb2 = _caffe_pb2(str(worker.install.python_path))
    from google.protobuf import text_format

    net = pb2.NetParameter()
    try:
        text_format.Merge(text, net)
    except text_format.ParseError as exc:
        raise OnnxInputError(f"{prototxt} is not a Caffe prototxt: {exc}") from None
    if net.layers:
        raise OnnxInputError(
            f"{prototxt} uses the V1 'layers' format; upgrade it (upgrade_net_proto_text)"
        )
    head, ip, input_blob, input_shape = _structure(net, prototxt, pb2.TEST)
    features = int(np.prod(input_shape[1:]))
    k = int(ip.inner_product_param.num_output)
    spec = HeadSpec(
        head,
        features,
        bins=HEADS[head].case_bins(k),
        ip_layer=ip.name,
        input_blob=input_blob,
        input_dims=input_shape[1:],
    )
    want = {ip.name: [(k, features), (k,)], OUTPUT: [spec.fixed_value().shape]}

    data = weights.read_bytes()
    model = pb2.NetParameter()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # DecodeError, or RuntimeError from the upb parser
        raise OnnxInputError(
            f"{weights} is not a caffemodel (truncated or another format; {len(data)} bytes): {exc}"
        ) from None
    if model.layers and not model.layer:
        raise OnnxInputError(f"{weights} is a V1 caffemodel; upgrade it (upgrade_net_proto_binary)")
    stored = {la.name: [_blob_shape(b) for b in la.blobs] for la in model.layer if la.blobs}
    if ip.name not in stored:
        raise OnnxInputError(
            f"{weights} holds no weights for InnerProduct {ip.name!r} (it has: "
            f"{', '.join(sorted(stored)) or 'none'}); Caffe would keep the filler values"
        )
    for layer, shapes in want.items():
        if layer in stored and not _same_shapes(stored[layer], shapes):
            what = HEADS[head].shape_text(spec.shape) if HEADS[head].has_bins else "num_output 1"
            raise OnnxInputError(
                f"{weights} holds {layer!r} with shapes {stored[layer]}, but {prototxt} makes "
                f"it {shapes} ({spec.head} head, {what}, {features} features): a head with "
                "another K or D"
            )

    check_net(worker, text, prototxt, weights=weights)
    try:
        got = worker.call("params", prototxt=text, phase="TEST", weights=str(weights))
    except (CaffeError, CaffeCrash) as exc:
        raise OnnxInputError(f"{prototxt} with {weights}: {exc}") from None
    params = {name: [np.asarray(b) for b in blobs] for name, blobs in got["params"].items()}
    if set(params) != set(want) or any(
        [b.shape for b in params[layer]] != shapes for layer, shapes in want.items()
    ):
        raise OnnxInputError(
            f"Caffe loaded params "
            f"{ {name: [b.shape for b in blobs] for name, blobs in params.items()} }; the "
            f"head needs {want}"
        )
    check = exact(
        weights.name, f"{OUTPUT}/0", params[OUTPUT][0], spec.fixed_value(), spec.describe()
    )
    if not check.passed:
        hint = f" ({spec.row.fixed_hint})"
        raise OnnxInputError(f"{OUTPUT} is not the fixed {spec.fixed_text()}{hint}: {check}")
    return CaffeHead(spec, prototxt, weights, text, input_shape, params)


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
        "crossval.source.caffemodel_sha256": _sha256(weights),
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


__all__ = [
    "CaffeHead",
    "ExportReport",
    "HeadSpec",
    "OnnxCheckFailed",
    "OnnxInputError",
    "OnnxModelInvalid",
    "Runtime",
    "check_against_caffe",
    "constants",
    "export",
    "export_caffe_head",
    "fixed_constant",
    "forward_comparisons",
    "load_caffe_head",
    "load_model",
    "reference64",
    "validate",
    "with_weights",
]
