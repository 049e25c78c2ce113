"""Whole Caffe nets (deploy, TEST phase) written with pycaffe's NetSpec, for port checks.

Each builder returns prototxt text with one ``Input`` layer named ``data`` (N x 3 x H x W
for DEX, N x 3 x size x size for the tiny net). Layer and top names are the ones a port must
return its blobs under; see ``tests/ports/`` for PyTorch ports that follow them.

- ``dex_vgg16``: the DEX age net (VGG-16 with a softmax over age bins, as in the released
  ``age.prototxt``). ReLU and Dropout are in place, as in the real VGG prototxt, so after a
  forward the blob ``conv1_1`` holds the post-ReLU value and ``fc6`` / ``fc7`` the
  post-Dropout (in TEST: post-ReLU) value.
- ``tiny_cnn``: a small net of standard layers, nothing in place, for fast tests. Its MAX
  pooling runs on an odd size (9 by default), where Caffe's ceil rounding (5x5) and
  PyTorch's default floor (4x4) disagree.
- ``levi_hassner_age``: Levi and Hassner's age net (2015): LRN, overhanging MAX pools,
  Dropout; ReLU and Dropout in place, as published. ``levi_hassner_age_v1`` writes the same
  net in the V1 format with an ``input_dim`` header, the form in which it was published.
- ``caffenet_age``: a CaffeNet-style age net with grouped convolutions (group 2).
- ``googlenet_block``: one GoogLeNet inception block (names with ``/``), Concat, AVE pooling.
- ``resnet_block``: a ResNet-style block: bias-free convolutions, BatchNorm + Scale + ReLU
  in place, an identity shortcut joined by Eltwise SUM, global AVE pooling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import caffe
from caffe import layers as L
from caffe import params as P
from caffe.proto import caffe_pb2

__all__ = [
    "ZOO",
    "caffenet_age",
    "dex_vgg16",
    "googlenet_block",
    "levi_hassner_age",
    "levi_hassner_age_v1",
    "resnet_block",
    "tiny_cnn",
]

# (block, convolutions in the block, output channels): VGG-16's configuration "D".
VGG16_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (1, 2, 64),
    (2, 2, 128),
    (3, 3, 256),
    (4, 3, 512),
    (5, 3, 512),
)


def _max_pool(bottom: Any) -> Any:
    return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=2, stride=2)


def dex_vgg16(batch: int = 1, size: int = 224, bins: int = 101) -> str:
    """Deploy prototxt of the DEX age net: VGG-16 + ``fc8-<bins>`` + ``prob`` (Softmax)."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 3, size, size]))
    x = n.data
    for block, convs, channels in VGG16_BLOCKS:
        for i in range(1, convs + 1):
            conv = L.Convolution(x, num_output=channels, kernel_size=3, pad=1)
            setattr(n, f"conv{block}_{i}", conv)
            setattr(n, f"relu{block}_{i}", L.ReLU(conv, in_place=True))
            x = conv
        pool = _max_pool(x)
        setattr(n, f"pool{block}", pool)
        x = pool
    n.fc6 = L.InnerProduct(x, num_output=4096)
    n.relu6 = L.ReLU(n.fc6, in_place=True)
    n.drop6 = L.Dropout(n.fc6, dropout_ratio=0.5, in_place=True)
    n.fc7 = L.InnerProduct(n.fc6, num_output=4096)
    n.relu7 = L.ReLU(n.fc7, in_place=True)
    n.drop7 = L.Dropout(n.fc7, dropout_ratio=0.5, in_place=True)
    logits = L.InnerProduct(n.fc7, num_output=bins)
    setattr(n, f"fc8-{bins}", logits)
    n.prob = L.Softmax(logits)
    return str(n.to_proto())


def tiny_cnn(batch: int = 2, size: int = 9, bins: int = 7) -> str:
    """Deploy prototxt of a small CNN: conv, ReLU, MAX pool (ceil), IP, ReLU, Dropout, IP,
    Softmax; every layer writes its own top."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 3, size, size]))
    n.conv1 = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1)
    n.relu1 = L.ReLU(n.conv1)
    n.pool1 = _max_pool(n.relu1)
    n.fc1 = L.InnerProduct(n.pool1, num_output=16)
    n.relu_fc1 = L.ReLU(n.fc1)
    n.drop1 = L.Dropout(n.relu_fc1, dropout_ratio=0.5)
    n.fc2 = L.InnerProduct(n.drop1, num_output=bins)
    n.prob = L.Softmax(n.fc2)
    return str(n.to_proto())


# lr and decay multipliers of weight and bias, as in the published age nets.
_LEARN = [dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]
_LRN = dict(local_size=5, alpha=1e-4, beta=0.75)


def _pool(bottom: Any, kernel: int, stride: int, pool: Any = None, pad: int = 0) -> Any:
    kw: dict[str, Any] = dict(kernel_size=kernel, stride=stride)
    if pad:
        kw["pad"] = pad
    return L.Pooling(bottom, pool=P.Pooling.MAX if pool is None else pool, **kw)


def levi_hassner_age(batch: int = 1, size: int = 227, bins: int = 8) -> str:
    """Deploy prototxt of Levi and Hassner's age net (``bins`` 8 for age, 2 for gender).

    At 227 the three MAX pools go 56 -> 28 -> 14 -> 7 where floor rounding gives 27, 13, 6;
    at 67 (a fast size) 16 -> 8 -> 4 -> 2 where floor gives 7, 3, 1."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 3, size, size]))
    n.conv1 = L.Convolution(n.data, num_output=96, kernel_size=7, stride=4, param=_LEARN)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = _pool(n.conv1, 3, 2)
    n.norm1 = L.LRN(n.pool1, **_LRN)
    n.conv2 = L.Convolution(n.norm1, num_output=256, kernel_size=5, pad=2, param=_LEARN)
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.pool2 = _pool(n.conv2, 3, 2)
    n.norm2 = L.LRN(n.pool2, **_LRN)
    n.conv3 = L.Convolution(n.norm2, num_output=384, kernel_size=3, pad=1, param=_LEARN)
    n.relu3 = L.ReLU(n.conv3, in_place=True)
    n.pool5 = _pool(n.conv3, 3, 2)
    n.fc6 = L.InnerProduct(n.pool5, num_output=512, param=_LEARN)
    n.relu6 = L.ReLU(n.fc6, in_place=True)
    n.drop6 = L.Dropout(n.fc6, dropout_ratio=0.5, in_place=True)
    n.fc7 = L.InnerProduct(n.fc6, num_output=512, param=_LEARN)
    n.relu7 = L.ReLU(n.fc7, in_place=True)
    n.drop7 = L.Dropout(n.fc7, dropout_ratio=0.5, in_place=True)
    n.fc8 = L.InnerProduct(n.fc7, num_output=bins, param=_LEARN)
    n.prob = L.Softmax(n.fc8)
    return str(n.to_proto())


def to_v1(prototxt: str) -> str:
    """The same net in the V1 format: ``layers {`` with enum types, ``blobs_lr`` and
    ``weight_decay``, and an ``input`` / ``input_dim`` header for its one Input layer."""
    from google.protobuf import text_format

    from crossval.caffe_side.upgrade import V1_TYPES

    enum_of = {v: k for k, v in V1_TYPES.items()}
    net = caffe_pb2.NetParameter()
    text_format.Merge(prototxt, net)
    header = caffe_pb2.NetParameter()
    if net.name:
        header.name = net.name
    out = caffe_pb2.NetParameter()
    for layer in net.layer:
        if layer.type == "Input":
            for top, shape in zip(layer.top, layer.input_param.shape, strict=True):
                if len(shape.dim) != 4:
                    raise ValueError(f"input {top!r}: input_dim needs 4 axes, has {shape.dim}")
                header.input.append(top)
                header.input_dim.extend(shape.dim)
            continue
        if layer.type not in enum_of:
            raise ValueError(f"layer {layer.name!r}: type {layer.type} has no V1 form")
        v1 = out.layers.add()
        v1.name = layer.name
        v1.type = caffe_pb2.V1LayerParameter.LayerType.Value(enum_of[layer.type])
        v1.bottom.extend(layer.bottom)
        v1.top.extend(layer.top)
        for p in layer.param:
            v1.blobs_lr.append(p.lr_mult)
            v1.weight_decay.append(p.decay_mult)
        v1.loss_weight.extend(layer.loss_weight)
        for rule in layer.include:
            v1.include.add().CopyFrom(rule)
        for rule in layer.exclude:
            v1.exclude.add().CopyFrom(rule)
        for fd, value in layer.ListFields():
            if fd.name.endswith("_param") and fd.message_type is not None:
                if fd.name not in v1.DESCRIPTOR.fields_by_name:
                    raise ValueError(f"layer {layer.name!r}: {fd.name} has no V1 form")
                getattr(v1, fd.name).CopyFrom(value)
    # The header first, as published (text_format would write it after the layers).
    return str(text_format.MessageToString(header) + text_format.MessageToString(out))


def levi_hassner_age_v1(batch: int = 1, size: int = 227, bins: int = 8) -> str:
    """`levi_hassner_age` as published: V1 format, ``input_dim`` header."""
    return to_v1(levi_hassner_age(batch, size, bins))


def _even(channels: float) -> int:
    """A channel count divisible by the group count 2, at least 2."""
    return max(2, 2 * round(channels / 2))


def caffenet_age(batch: int = 1, size: int = 227, bins: int = 8, width: float = 1.0) -> str:
    """Deploy prototxt of a CaffeNet-style age net; `width` scales every channel count and
    the fully connected layers (0.125 for a fast version). conv2, conv4 and conv5 have
    group 2; ReLU and Dropout in place; pool then LRN, as in CaffeNet."""
    c1, c2, c3, c4, c5, fc = (_even(c * width) for c in (96, 256, 384, 384, 256, 4096))
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 3, size, size]))
    n.conv1 = L.Convolution(n.data, num_output=c1, kernel_size=11, stride=4, param=_LEARN)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = _pool(n.conv1, 3, 2)
    n.norm1 = L.LRN(n.pool1, **_LRN)
    n.conv2 = L.Convolution(n.norm1, num_output=c2, kernel_size=5, pad=2, group=2, param=_LEARN)
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.pool2 = _pool(n.conv2, 3, 2)
    n.norm2 = L.LRN(n.pool2, **_LRN)
    n.conv3 = L.Convolution(n.norm2, num_output=c3, kernel_size=3, pad=1, param=_LEARN)
    n.relu3 = L.ReLU(n.conv3, in_place=True)
    n.conv4 = L.Convolution(n.conv3, num_output=c4, kernel_size=3, pad=1, group=2, param=_LEARN)
    n.relu4 = L.ReLU(n.conv4, in_place=True)
    n.conv5 = L.Convolution(n.conv4, num_output=c5, kernel_size=3, pad=1, group=2, param=_LEARN)
    n.relu5 = L.ReLU(n.conv5, in_place=True)
    n.pool5 = _pool(n.conv5, 3, 2)
    n.fc6 = L.InnerProduct(n.pool5, num_output=fc, param=_LEARN)
    n.relu6 = L.ReLU(n.fc6, in_place=True)
    n.drop6 = L.Dropout(n.fc6, dropout_ratio=0.5, in_place=True)
    n.fc7 = L.InnerProduct(n.fc6, num_output=fc, param=_LEARN)
    n.relu7 = L.ReLU(n.fc7, in_place=True)
    n.drop7 = L.Dropout(n.fc7, dropout_ratio=0.5, in_place=True)
    n.fc8 = L.InnerProduct(n.fc7, num_output=bins, param=_LEARN)
    n.prob = L.Softmax(n.fc8)
    return str(n.to_proto())


def googlenet_block(
    batch: int = 1,
    size: int = 28,
    channels: int = 192,
    bins: int = 8,
    width: float = 1.0,
    global_pool: bool = False,
    branch_pool: str = "MAX",
) -> str:
    """Deploy prototxt of GoogLeNet's inception_3a on an N x `channels` x size x size input,
    then AVE pooling (7/1, or global), Dropout 0.4, an InnerProduct and a Softmax.

    Branch widths are inception_3a's (64; 96 -> 128; 16 -> 32; pool -> 32) times `width`.
    `branch_pool` "AVE" makes the pool branch an AVE pool 3/1 pad 1 (as in BN-Inception),
    whose border cells Caffe divides by 9, padding counted."""
    w = [max(1, round(c * width)) for c in (64, 96, 128, 16, 32, 32)]
    pre = "inception_3a/"
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, channels, size, size]))

    def conv_relu(bottom: Any, name: str, out: int, k: int) -> Any:
        conv = L.Convolution(bottom, num_output=out, kernel_size=k, pad=k // 2, param=_LEARN)
        n[pre + name] = conv
        n[pre + "relu_" + name] = L.ReLU(conv, in_place=True)
        return conv

    b1 = conv_relu(n.data, "1x1", w[0], 1)
    b3 = conv_relu(conv_relu(n.data, "3x3_reduce", w[1], 1), "3x3", w[2], 3)
    b5 = conv_relu(conv_relu(n.data, "5x5_reduce", w[3], 1), "5x5", w[4], 5)
    kind = {"MAX": P.Pooling.MAX, "AVE": P.Pooling.AVE}[branch_pool]
    n[pre + "pool"] = _pool(n.data, 3, 1, kind, pad=1)
    bp = conv_relu(n[pre + "pool"], "pool_proj", w[5], 1)
    n[pre + "output"] = L.Concat(b1, b3, b5, bp)
    if global_pool:
        n["pool5/7x7_s1"] = L.Pooling(n[pre + "output"], pool=P.Pooling.AVE, global_pooling=True)
    else:
        n["pool5/7x7_s1"] = _pool(n[pre + "output"], 7, 1, P.Pooling.AVE)
    n["pool5/drop_7x7_s1"] = L.Dropout(n["pool5/7x7_s1"], dropout_ratio=0.4, in_place=True)
    n["loss3/classifier"] = L.InnerProduct(n["pool5/7x7_s1"], num_output=bins, param=_LEARN)
    n.prob = L.Softmax(n["loss3/classifier"])
    return str(n.to_proto())


def resnet_block(
    batch: int = 1,
    size: int = 8,
    channels: int = 16,
    bins: int = 8,
    coeff: tuple[float, float] | None = None,
) -> str:
    """Deploy prototxt of a ResNet-style net: conv1 (3x3, no bias) -> bn_conv1 ->
    scale_conv1 -> conv1_relu, then res2a: two such units (the second without its ReLU)
    on branch 2, an identity shortcut, Eltwise SUM, ReLU; global AVE pooling, fc, Softmax.
    BatchNorm, Scale and ReLU are in place, as in the published ResNet prototxts. `coeff`
    sets the Eltwise SUM's coefficients (shortcut, branch)."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 3, size, size]))

    def unit(bottom: Any, conv: str, bn: str, scale: str, relu: str | None) -> Any:
        top = L.Convolution(bottom, num_output=channels, kernel_size=3, pad=1, bias_term=False)
        n[conv] = top
        n[bn] = L.BatchNorm(top, use_global_stats=True, in_place=True)
        n[scale] = L.Scale(top, bias_term=True, in_place=True)
        if relu:
            n[relu] = L.ReLU(top, in_place=True)
        return top

    x = unit(n.data, "conv1", "bn_conv1", "scale_conv1", "conv1_relu")
    a = unit(x, "res2a_branch2a", "bn2a_branch2a", "scale2a_branch2a", "res2a_branch2a_relu")
    b = unit(a, "res2a_branch2b", "bn2a_branch2b", "scale2a_branch2b", None)
    extra = {"coeff": list(coeff)} if coeff is not None else {}
    n.res2a = L.Eltwise(x, b, operation=P.Eltwise.SUM, **extra)
    n.res2a_relu = L.ReLU(n.res2a, in_place=True)
    n.pool5 = L.Pooling(n.res2a, pool=P.Pooling.AVE, global_pooling=True)
    n.fc = L.InnerProduct(n.pool5, num_output=bins)
    n.prob = L.Softmax(n.fc)
    return str(n.to_proto())


ZOO: dict[str, Callable[..., str]] = {
    "dex_vgg16": dex_vgg16,
    "tiny_cnn": tiny_cnn,
    "levi_hassner_age": levi_hassner_age,
    "levi_hassner_age_v1": levi_hassner_age_v1,
    "caffenet_age": caffenet_age,
    "googlenet_block": googlenet_block,
    "resnet_block": resnet_block,
}
