"""Validate an ONNX model of a head: onnx.checker, strict shape inference, the learnable
initializers feeding the InnerProduct node, and the fixed constant bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import numpy_helper

from ..compare import Comparison, exact
from .spec import OUTPUT, HeadSpec, OnnxInputError, OnnxModelInvalid

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]


# ---- validation -----------------------------------------------------------------------------


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def learnable_initializers(graph: onnx.GraphProto, spec: HeadSpec) -> dict[str, int]:
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
    learnable_initializers(graph, spec)
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
