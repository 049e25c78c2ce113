"""Reading a prototxt as Caffe reads it: its upgrade of old formats, and its phase filter.

Caffe upgrades a net when it loads it (``UpgradeNetAsNeeded`` in util/upgrade_proto.cpp):
V1 nets (``layers {`` with enum types, ``blobs_lr``, ``weight_decay``) become ``layer``
entries, the ``input`` / ``input_dim`` / ``input_shape`` header becomes an ``Input`` layer
named ``input``, and BatchNorm layers that declare three ``param`` entries get their
multipliers set to 0. Then ``Net::FilterNet`` keeps the layers whose include / exclude rules
the net's state meets. crossval parses prototxts itself in the worker, so it mirrors both
here: `parse_net` for the upgrade, `filter_net` for the phase. What it cannot upgrade (V0
layers, the old data-transformation fields, an unknown V1 type) is a ValueError naming the
layer, where Caffe would log and carry on or abort.
"""

from __future__ import annotations

import re
from typing import Any

from caffe.proto import caffe_pb2
from google.protobuf import text_format

__all__ = ["V1_TYPES", "filter_net", "parse_net", "upgrade_net"]

# UpgradeV1LayerType: V1LayerParameter.LayerType enum name -> layer type string.
V1_TYPES: dict[str, str] = {
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution",
    "DATA": "Data",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}

# V1 data layers whose old transformation fields Caffe moves to transform_param
# (NetNeedsDataUpgrade); crossval refuses them instead.
_DATA_FIELDS = {
    "DATA": "data_param",
    "IMAGE_DATA": "image_data_param",
    "WINDOW_DATA": "window_data_param",
}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def _v1_name(v1: Any, index: int) -> str:
    return f"V1 layer {v1.name!r}" if v1.name else f"V1 layer {index} (unnamed)"


def _upgrade_v1_layer(v1: Any, index: int, layer: Any) -> None:
    """UpgradeV1LayerParameter: one V1 layer into the (empty) LayerParameter `layer`."""
    enum = caffe_pb2.V1LayerParameter.LayerType
    type_name = enum.Name(v1.type) if v1.HasField("type") else "NONE"
    if v1.HasField("layer"):
        raise ValueError(
            f"{_v1_name(v1, index)} holds a V0 layer definition, which crossval does not "
            "upgrade (Caffe ignores it); rewrite the net with upgrade_net_proto_text"
        )
    if type_name not in V1_TYPES:
        raise ValueError(f"{_v1_name(v1, index)} has no type (V1 type {type_name})")
    data_field = _DATA_FIELDS.get(type_name)
    if data_field is not None and v1.HasField(data_field):
        old = [f for f in _TRANSFORM_FIELDS if getattr(v1, data_field).HasField(f)]
        if old:
            raise ValueError(
                f"{_v1_name(v1, index)} ({type_name}) sets {', '.join(old)} in {data_field}, "
                "the old data transformation fields, which crossval does not upgrade"
            )
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    if v1.HasField("name"):
        layer.name = v1.name
    for rule in v1.include:
        layer.include.add().CopyFrom(rule)
    for rule in v1.exclude:
        layer.exclude.add().CopyFrom(rule)
    layer.type = V1_TYPES[type_name]
    for blob in v1.blobs:
        layer.blobs.add().CopyFrom(blob)

    def param(i: int) -> Any:
        while len(layer.param) <= i:
            layer.param.add()
        return layer.param[i]

    for i, name in enumerate(v1.param):
        param(i).name = name
    modes = caffe_pb2.ParamSpec.DimCheckMode
    v1_modes = caffe_pb2.V1LayerParameter.DimCheckMode
    for i, mode in enumerate(v1.blob_share_mode):
        param(i).share_mode = modes.Value(v1_modes.Name(mode))
    for i, lr in enumerate(v1.blobs_lr):
        param(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        param(i).decay_mult = decay
    layer.loss_weight.extend(v1.loss_weight)
    # Every *_param message of V1 has a field of the same name and type in LayerParameter.
    for fd, value in v1.ListFields():
        if fd.name.endswith("_param") and fd.message_type is not None:
            getattr(layer, fd.name).CopyFrom(value)


def _upgrade_input(net: Any) -> None:
    """UpgradeNetInput: the input / input_dim / input_shape header to an Input layer first."""
    has_shape = len(net.input_shape) > 0
    has_dim = len(net.input_dim) > 0
    if has_shape and len(net.input_shape) != len(net.input):
        raise ValueError(
            f"the net's header has {len(net.input)} input(s) and {len(net.input_shape)} "
            "input_shape(s); Caffe needs one shape per input"
        )
    if has_dim and not has_shape and len(net.input_dim) != 4 * len(net.input):
        raise ValueError(
            f"the net's header has {len(net.input)} input(s) and {len(net.input_dim)} "
            "input_dim(s); Caffe reads four input_dim per input"
        )
    if has_shape or has_dim:
        layers = list(net.layer)
        del net.layer[:]
        layer = net.layer.add()
        layer.name = "input"
        layer.type = "Input"
        for i, top in enumerate(net.input):
            layer.top.append(top)
            shape = layer.input_param.shape.add()
            if has_shape:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i : 4 * i + 4])
        for old in layers:
            net.layer.add().CopyFrom(old)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")


def upgrade_net(net: Any) -> Any:
    """UpgradeNetAsNeeded on a parsed NetParameter, in place (and returned)."""
    if len(net.layers) > 0:
        if len(net.layer) > 0:
            raise ValueError(
                "the net has both 'layer' and 'layers' (V1) entries; Caffe refuses to upgrade "
                "it: write every layer in one format"
            )
        v1_layers = list(net.layers)
        net.ClearField("layers")
        for i, v1 in enumerate(v1_layers):
            _upgrade_v1_layer(v1, i, net.layer.add())
    if len(net.input) > 0:
        _upgrade_input(net)
    for layer in net.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for p in layer.param:
                p.lr_mult = 0.0
                p.decay_mult = 0.0
    return net


_ENUM_ERROR = re.compile(r'Enum type "caffe\.V1LayerParameter\.LayerType" has no value named (\w+)')


def _enclosing_v1_layer(text: str, line: int) -> str:
    """The name of the V1 ``layers {`` block around 1-based `line` (best effort)."""
    lines = text.splitlines()
    start = 0
    for i in range(min(line, len(lines)) - 1, -1, -1):
        if re.match(r"\s*layers\s*\{", lines[i]):
            start = i
            break
    for candidate in lines[start:]:
        m = re.match(r"\s*name\s*:\s*[\"']([^\"']*)[\"']", candidate)
        if m:
            return m.group(1)
    return "?"


def parse_net(text: str) -> Any:
    """The caffe_pb2.NetParameter of prototxt `text`, upgraded as Caffe upgrades it on load."""
    net = caffe_pb2.NetParameter()
    try:
        text_format.Merge(text, net)
    except text_format.ParseError as exc:
        m = _ENUM_ERROR.search(str(exc))
        if m and exc.GetLine() is not None:
            name = _enclosing_v1_layer(text, exc.GetLine())
            raise ValueError(
                f"V1 layer {name!r} has type {m.group(1)}, which is not a V1 layer type "
                f"(known: {', '.join(sorted(V1_TYPES))})"
            ) from None
        raise ValueError(f"malformed prototxt: {exc}") from None
    return upgrade_net(net)


def _meets(state: Any, rule: Any) -> bool:
    """Net::StateMeetsRule."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(s not in state.stage for s in rule.stage):
        return False
    return not any(s in state.stage for s in rule.not_stage)


def filter_net(net: Any, phase: str = "TEST") -> list[Any]:
    """Net::FilterNet: the layers (LayerParameter) a net loaded in `phase` keeps, in order.

    The state is the one pycaffe's ``caffe.Net(file, phase)`` gives: that phase, level 0,
    and the stages the prototxt's own ``state`` lists."""
    if phase not in ("TRAIN", "TEST"):
        raise ValueError(f"phase must be TRAIN or TEST, got {phase!r}")
    state = caffe_pb2.NetState()
    state.CopyFrom(net.state)
    state.phase = caffe_pb2.Phase.Value(phase)
    state.level = 0
    kept = []
    for layer in net.layer:
        if len(layer.include) and len(layer.exclude):
            raise ValueError(
                f"layer {layer.name!r} has both include and exclude rules; Caffe accepts one kind"
            )
        included = len(layer.include) == 0
        if included and any(_meets(state, r) for r in layer.exclude):
            included = False
        if not included and any(_meets(state, r) for r in layer.include):
            included = True
        if included:
            kept.append(layer)
    return kept
