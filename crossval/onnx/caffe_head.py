"""Recognise a Caffe head (deploy prototxt + caffemodel) as one of the two heads, with its
weights and input shape."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray
from torch import Tensor

from .. import transfer
from ..compare import exact
from ..heads import HEADS
from ..inputs import check_net, read_prototxt
from ..worker import CaffeCrash, CaffeError, CaffeWorker
from .spec import OUTPUT, HeadSpec, OnnxInputError

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]


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
        got = worker.run(
            prototxt=self.text,
            inputs={self.spec.input_blob: x.reshape(n, *self.input_shape[1:])},
            phase="TEST",
            weights=str(self.weights),
        )
        return {b: np.asarray(got.blobs[b]).reshape(n, -1) for b in self.spec.blobs}


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
        got = worker.params(text, phase="TEST", weights=str(weights))
    except (CaffeError, CaffeCrash) as exc:
        raise OnnxInputError(f"{prototxt} with {weights}: {exc}") from None
    params = {name: [np.asarray(b) for b in blobs] for name, blobs in got.params.items()}
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
