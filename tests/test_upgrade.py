"""Published prototxts read as Caffe reads them (crossval.caffe_side.upgrade), in the worker.

A V1 net and its V2 form must give the same layer specs and, in real Caffe (which runs its
own upgrade), the same blobs bit for bit; the input headers become an Input layer; layers
follow include / exclude phase rules; what cannot be upgraded is named.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from crossval.caffe_side.replies import ParamMults
from crossval.worker import CaffeError, CaffeWorker

V1_NET = """
name: "v1_small"
input: "data"
input_dim: 2
input_dim: 3
input_dim: 6
input_dim: 6
layers {
  name: "conv"
  type: CONVOLUTION
  bottom: "data"
  top: "conv"
  blobs_lr: 1
  blobs_lr: 2
  weight_decay: 1
  weight_decay: 0
  convolution_param { num_output: 4 kernel_size: 3 }
}
layers {
  name: "drop_train"
  type: DROPOUT
  bottom: "conv"
  top: "conv"
  include { phase: TRAIN }
  dropout_param { dropout_ratio: 0.3 }
}
layers {
  name: "relu_test"
  type: RELU
  bottom: "conv"
  top: "conv"
  exclude { phase: TRAIN }
  relu_param { negative_slope: 0.25 }
}
layers {
  name: "pool"
  type: POOLING
  bottom: "conv"
  top: "pool"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 }
}
layers {
  name: "fc"
  type: INNER_PRODUCT
  bottom: "pool"
  top: "fc"
  blobs_lr: 0
  blobs_lr: 0
  inner_product_param { num_output: 3 }
}
layers {
  name: "prob"
  type: SOFTMAX
  bottom: "fc"
  top: "prob"
  loss_weight: 0.5
}
"""

V2_NET = """
name: "v2_small"
layer { name: "input" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer {
  name: "conv" type: "Convolution" bottom: "data" top: "conv"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 }
}
layer { name: "drop_train" type: "Dropout" bottom: "conv" top: "conv"
        include { phase: TRAIN } dropout_param { dropout_ratio: 0.3 } }
layer { name: "relu_test" type: "ReLU" bottom: "conv" top: "conv"
        exclude { phase: TRAIN } relu_param { negative_slope: 0.25 } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
        param { lr_mult: 0 } param { lr_mult: 0 } inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" loss_weight: 0.5 }
"""


def _random(worker: CaffeWorker, text: str, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Generated params (by Caffe's own shapes) and inputs for the net `text`."""
    rng = np.random.default_rng(seed)
    described = worker.describe(text)
    params = {
        lay.name: [
            rng.standard_normal(p.shape).astype(np.float32) * np.float32(0.3) for p in lay.params
        ]
        for lay in described.layers
        if lay.params
    }
    inputs = {
        name: rng.standard_normal(shape).astype(np.float32)
        for name, shape in described.inputs.items()
    }
    return params, inputs


def _same_blobs(worker: CaffeWorker, a: str, b: str, phase: str, seed: int = 1) -> list[str]:
    params, inputs = _random(worker, a, seed)
    run_a = worker.run(a, inputs, params=params, phase=phase)
    run_b = worker.run(b, inputs, params=params, phase=phase)
    assert list(run_a.blobs) == list(run_b.blobs)
    for name, value in run_a.blobs.items():
        assert value.dtype == run_b.blobs[name].dtype
        assert np.array_equal(value, run_b.blobs[name]), f"blob {name} differs"
    return list(run_a.blobs)


def test_v1_net_has_the_layer_specs_of_its_v2_form(worker: CaffeWorker) -> None:
    for phase in ("TEST", "TRAIN"):
        v1 = worker.layer_specs(V1_NET, phase=phase)
        v2 = worker.layer_specs(V2_NET, phase=phase)
        assert v1 == v2
    conv = worker.layer_specs(V1_NET)[1]
    assert conv.param == [ParamMults(lr_mult=1.0, decay_mult=1.0), ParamMults(2.0, 0.0)]
    assert worker.layer_specs(V1_NET)[-1].loss_weight == [0.5]


def test_v1_net_runs_bit_for_bit_as_its_v2_form_in_caffe(worker: CaffeWorker) -> None:
    # TEST only: the TRAIN net has a Dropout, random in each run.
    blobs = _same_blobs(worker, V1_NET, V2_NET, "TEST")
    assert blobs == ["data", "conv", "pool", "fc", "prob"]


def test_published_levi_hassner_v1_matches_the_v2_builder(worker: CaffeWorker) -> None:
    v1 = worker.prototxt(head="levi_hassner_age_v1", batch=2, size=67)
    v2 = worker.prototxt(head="levi_hassner_age", batch=2, size=67)
    assert "layers {" in v1 and "input_dim: 67" in v1 and "CONVOLUTION" in v1
    assert "blobs_lr: 2" in v1 and "weight_decay: 0" in v1
    specs1 = worker.layer_specs(v1)
    specs2 = worker.layer_specs(v2)
    # Caffe names the layer made from the header "input"; the builder's is "data".
    assert specs1[0].name == "input" and specs2[0].name == "data"
    specs1[0] = dataclasses.replace(specs1[0], name="data")
    assert specs1 == specs2
    _same_blobs(worker, v1, v2, "TEST", seed=3)
    # The worker's description (param multipliers from the parsed, upgraded net) agrees too.
    d1 = worker.describe(v1)
    d2 = worker.describe(v2)
    assert d1.blobs == d2.blobs
    assert d1.layers[1:] == d2.layers[1:]
    assert d1.layers[1].params[1].lr_mult == 2.0


def test_input_headers_become_an_input_layer(worker: CaffeWorker) -> None:
    shape_header = V1_NET.replace(
        "input_dim: 2\ninput_dim: 3\ninput_dim: 6\ninput_dim: 6",
        "input_shape { dim: 2 dim: 3 dim: 6 dim: 6 }",
    )
    assert shape_header != V1_NET
    for text in (V1_NET, shape_header):
        first = worker.layer_specs(text)[0]
        assert (first.name, first.type, first.tops) == ("input", "Input", ["data"])
        assert first.params["input_param"]["shape"] == [{"dim": [2, 3, 6, 6]}]
        assert worker.describe(text).inputs == {"data": (2, 3, 6, 6)}
    _same_blobs(worker, shape_header, V2_NET, "TEST")


def test_layers_follow_the_phase(worker: CaffeWorker) -> None:
    for text in (V1_NET, V2_NET):
        test = [s.name for s in worker.layer_specs(text, phase="TEST")]
        train = [s.name for s in worker.layer_specs(text, phase="TRAIN")]
        assert "drop_train" not in test and "relu_test" in test
        assert "drop_train" in train and "relu_test" not in train
        # Caffe's own net in each phase has exactly these layers.
        for phase, names in (("TEST", test), ("TRAIN", train)):
            caffe_layers = worker.describe(text, phase=phase).layers
            assert [lay.name for lay in caffe_layers] == names
        assert worker.layer_types(text, phase="TEST") == [
            "Input",
            "Convolution",
            "ReLU",
            "Pooling",
            "InnerProduct",
            "Softmax",
        ]


def test_unknown_v1_type_is_named(worker: CaffeWorker) -> None:
    text = V1_NET.replace("type: RELU", "type: BATCHNORM")
    with pytest.raises(CaffeError, match="V1 layer 'relu_test' has type BATCHNORM"):
        worker.layer_specs(text)
    with pytest.raises(CaffeError, match="'relu_test'"):
        worker.describe(text)


def test_what_cannot_be_upgraded_is_named(worker: CaffeWorker) -> None:
    mixed = V1_NET + 'layer { name: "extra" type: "ReLU" bottom: "prob" top: "prob" }\n'
    with pytest.raises(CaffeError, match="both 'layer' and 'layers'"):
        worker.layer_specs(mixed)
    both = V2_NET.replace("include { phase: TRAIN }", "include { phase: TRAIN } exclude { }")
    with pytest.raises(CaffeError, match="'drop_train' has both include and exclude"):
        worker.layer_specs(both)
    short = V1_NET.replace("input_dim: 6\ninput_dim: 6", "input_dim: 6")
    with pytest.raises(CaffeError, match="four input_dim per input"):
        worker.layer_specs(short)


def test_the_comparisons_fail_on_a_changed_net(worker: CaffeWorker) -> None:
    slope = V1_NET.replace("negative_slope: 0.25", "negative_slope: 0.5")
    with pytest.raises(AssertionError, match="blob conv differs"):
        _same_blobs(worker, slope, V2_NET, "TEST")
    lr = V1_NET.replace("blobs_lr: 2", "blobs_lr: 1")
    assert worker.layer_specs(lr) != worker.layer_specs(V2_NET)


def test_v0_layers_and_old_data_fields_are_named(worker: CaffeWorker) -> None:
    v0 = 'layers { layer { name: "old" type: "conv" } bottom: "data" top: "x" }\n'
    with pytest.raises(CaffeError, match=r"V1 layer 0 \(unnamed\) holds a V0 layer"):
        worker.layer_specs(v0)
    data = 'layers { name: "d" type: DATA top: "data" data_param { source: "x" scale: 0.5 } }\n'
    with pytest.raises(CaffeError, match=r"V1 layer 'd' \(DATA\) sets scale in data_param"):
        worker.layer_specs(data)


def test_batchnorm_with_three_params_is_frozen_as_caffe_does(worker: CaffeWorker) -> None:
    text = V2_NET.replace(
        'layer { name: "pool"',
        'layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" '
        "param { lr_mult: 1 } param { lr_mult: 1 } param { lr_mult: 1 } }\n"
        'layer { name: "pool"',
    )
    assert text != V2_NET
    bn = next(s for s in worker.layer_specs(text) if s.name == "bn")
    assert bn.param == [ParamMults(lr_mult=0.0, decay_mult=0.0)] * 3
    layers = worker.describe(text).layers
    params = next(lay for lay in layers if lay.name == "bn").params
    assert [(p.lr_mult, p.decay_mult) for p in params] == [(0.0, 0.0)] * 3


def test_batchnorm_statistics_are_never_learnable(worker: CaffeWorker) -> None:
    """batch_norm_layer.cpp sets lr_mult 0 on each of its blobs (and aborts on another
    lr_mult given), so the description must not call them learnable."""
    text = worker.prototxt("resnet_block")
    layers = {lay.name: lay for lay in worker.describe(text).layers}
    assert [p.lr_mult for p in layers["bn_conv1"].params] == [0.0, 0.0, 0.0]
    assert [p.lr_mult for p in layers["scale_conv1"].params] == [1.0, 1.0]
