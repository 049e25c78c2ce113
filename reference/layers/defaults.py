"""Caffe's proto defaults of the parameter messages that code (not a prototxt) builds layers
with: the seed's heads. A layer read from a prototxt gets its defaults from Caffe's own parse
instead; tests/test_layers.py checks these against that parse."""

from __future__ import annotations

from typing import Any

from crossval.reference.layers import LayerSpec

DEFAULTS: dict[str, dict[str, Any]] = {
    "inner_product_param": {"num_output": 0, "bias_term": True, "axis": 1, "transpose": False},
    "convolution_param": {
        "num_output": 0,
        "bias_term": True,
        "pad": [],
        "kernel_size": [],
        "stride": [],
        "dilation": [],
        "pad_h": 0,
        "pad_w": 0,
        "kernel_h": 0,
        "kernel_w": 0,
        "stride_h": 0,
        "stride_w": 0,
        "group": 1,
        "engine": "DEFAULT",
        "axis": 1,
        "force_nd_im2col": False,
    },
    "scale_param": {"axis": 1, "num_axes": 1, "bias_term": False},
    "softmax_param": {"engine": "DEFAULT", "axis": 1},
    "sigmoid_param": {"engine": "DEFAULT"},
}

KIND = {
    "InnerProduct": "inner_product_param",
    "Convolution": "convolution_param",
    "Scale": "scale_param",
    "Softmax": "softmax_param",
    "Sigmoid": "sigmoid_param",
}


def layer(name: str, type_name: str, **fields: Any) -> LayerSpec:
    """The spec Caffe would parse from ``layer { name type <kind> { fields } }``."""
    kind = KIND[type_name]
    params = {kind: {**DEFAULTS[kind], **fields}}
    return LayerSpec(name, type_name, params=params, set_fields={kind: frozenset(fields)})
