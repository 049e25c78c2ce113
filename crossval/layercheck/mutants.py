"""Layer mutants: how converters and hand ports get single Caffe layers wrong.

Each is a port of one layer type, written the way a PyTorch port writes it (torch.nn.functional
and the layer's Caffe parameters), with one realistic mistake. The kill table searches the
layer type's cases (``crossval.layercheck.CASES``) with each as the float32 side of
``run_case`` until a comparison fails; the unmutated reference must pass the same cases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from crossval.reference import layers as ref
from crossval.reference.layers import LayerSpec


@dataclass(frozen=True)
class LayerMutant:
    """A wrong port of Caffe layer type `type`: `mistake` says what it gets wrong, `shows`
    where it shows."""

    type: str
    mistake: str
    shows: str
    port: ref.LayerFn


def _pair(p: Mapping[str, Any], name: str, default: int) -> tuple[int, int]:
    """Pooling's kernel/pad/stride: `<name>_h`/`<name>_w` when set, else `<name>_size` or
    `<name>` (a port reads the plain field and its _h/_w forms as Caffe does)."""
    h, w = int(p.get(f"{name}_h", 0)), int(p.get(f"{name}_w", 0))
    if h or w:
        return h, w
    v = p.get(f"{name}_size", p.get(name, default))
    if isinstance(v, list):
        v = v[0] if v else default
    return int(v), int(v)


def _pool_floor(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """Pooling with PyTorch's default floor rounding (padding applied explicitly, as a port
    does where F.max_pool2d refuses a pad over half the kernel)."""
    p = spec.param("pooling_param")
    (x,) = bottoms
    if p.get("global_pooling"):
        k = (x.shape[2], x.shape[3])
    else:
        k = _pair(p, "kernel", 1)
    s, (ph, pw) = _pair(p, "stride", 1), _pair(p, "pad", 0)
    if p["pool"] == "MAX":
        padded = F.pad(x, (pw, pw, ph, ph), value=-torch.inf)
        y, index = F.max_pool2d(padded, k, s, return_indices=True)
        # Caffe's optional second top is the argmax mask, h * width + w in the input.
        h, w = index // padded.shape[3] - ph, index % padded.shape[3] - pw
        return [y, (h * x.shape[3] + w).to(y.dtype)][: len(spec.tops) or 1]
    return [F.avg_pool2d(F.pad(x, (pw, pw, ph, ph)), k, s)]


def _ave_pool_exclude_pad(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """The reference, except AVE pooling divides by the cells inside the image only."""
    p = spec.param("pooling_param")
    tops = ref.forward(spec, bottoms, blobs)
    if p["pool"] != "AVE":
        return tops  # MAX, with its mask top when it has one
    (top,) = tops
    ones = torch.ones_like(bottoms[0][:1, :1])
    counted = ref.forward(spec, [ones], blobs)[0]  # Caffe's AVE of ones: in-image share
    return [top / counted.clamp_min(torch.finfo(top.dtype).tiny)]


def _lrn_alpha_not_divided(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """LRN with alpha applied to the window sum, not to its mean (alpha * local_size)."""
    p = spec.param("lrn_param")
    wrong = spec.with_param("lrn_param", alpha=float(p["alpha"]) * int(p["local_size"]))
    return ref.forward(wrong, bottoms, blobs)


def _lrn_torch(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """F.local_response_norm for both regions (it normalizes across channels only)."""
    p = spec.param("lrn_param")
    n = int(p["local_size"])
    return [
        F.local_response_norm(bottoms[0], n, float(p["alpha"]), float(p["beta"]), float(p["k"]))
    ]


def _batchnorm_factor_ignored(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """BatchNorm (global stats) reading blobs 0 and 1 as the mean and variance themselves."""
    p = spec.param("batch_norm_param")
    mean, var = blobs[0], blobs[1]
    x = bottoms[0]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return [(x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + float(p["eps"]))]


def _eltwise_folded(operation: str, combine: Callable[[Tensor, Tensor], Tensor]) -> ref.LayerFn:
    """Eltwise `operation` as the bottoms folded pairwise with `combine`; the reference for
    the other operations."""

    def port(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        if spec.param("eltwise_param")["operation"] != operation:
            return ref.forward(spec, bottoms, blobs)
        out = bottoms[0]
        for b in bottoms[1:]:
            out = combine(out, b)
        return [out]

    return port


def _softmax_last_axis(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """Softmax over the last axis (a converter's default) instead of Caffe's axis."""
    return [torch.softmax(bottoms[0], dim=-1)]


def _bias_where_none(bias_type: str) -> ref.LayerFn:
    def port(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        """The reference, plus the constant bias a module keeps when bias_term is false."""
        (top,) = ref.forward(spec, bottoms, blobs)
        if spec.param(bias_type)["bias_term"]:
            return [top]
        shape = [1] * top.dim()
        axis = 1 if top.dim() > 1 else 0
        shape[axis] = top.shape[axis]
        bias = 0.01 * torch.arange(1, top.shape[axis] + 1, dtype=top.dtype)
        return [top + bias.reshape(shape)]

    return port


def _dropout_active(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """Dropout left in training mode (the module never put in eval())."""
    ratio = float(spec.param("dropout_param")["dropout_ratio"])
    gen = torch.Generator().manual_seed(0)
    keep = (torch.rand(bottoms[0].shape, generator=gen) >= ratio).to(bottoms[0].dtype)
    return [bottoms[0] * keep / (1.0 - ratio)]


def _scale_last_axis(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """Scale broadcast along the trailing axes (NumPy rules) instead of from `axis`."""
    x = bottoms[0]
    s = bottoms[1] if len(bottoms) > 1 else blobs[0]
    try:
        y = x * s
    except RuntimeError:
        return ref.forward(spec, bottoms, blobs)
    has_bias = spec.param("scale_param")["bias_term"]
    if has_bias:
        y = y + blobs[-1]
    if tuple(y.shape) != tuple(x.shape):
        return ref.forward(spec, bottoms, blobs)
    return [y]


def _deconv_weight_transposed(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """Deconvolution with the weight's first two axes swapped (loaded as a Convolution's)."""
    w = blobs[0]
    if w.shape[0] != w.shape[1]:
        return ref.forward(spec, bottoms, blobs)
    return ref.forward(spec, bottoms, [w.transpose(0, 1), *blobs[1:]])


def _conv_groups_interleaved(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """Grouped Convolution taking group g's input channels as c % group == g (interleaved)
    instead of Caffe's contiguous ranges."""
    group = int(spec.param("convolution_param")["group"])
    x = bottoms[0]
    if group == 1 or x.dim() < 2:
        return ref.forward(spec, bottoms, blobs)
    c = x.shape[1]
    order = torch.arange(c).reshape(c // group, group).T.reshape(-1)
    return ref.forward(spec, [x[:, order], *bottoms[1:]], blobs)


def _relu_slope_ignored(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """nn.ReLU for a leaky ReLU (negative_slope dropped)."""
    return [torch.relu(bottoms[0])]


def _concat_channels(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """torch.cat over dim 1 whatever Caffe's axis (dim 0 on 1-D blobs, which have no dim 1)."""
    return [torch.cat(list(bottoms), dim=min(1, bottoms[0].dim() - 1))]


def _crop_offset_ignored(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """Crop from the top-left corner, ignoring the offsets."""
    x, like = bottoms
    axis = int(spec.param("crop_param")["axis"]) % x.dim()
    index = tuple(slice(0, like.shape[d]) if d >= axis else slice(None) for d in range(x.dim()))
    return [x[index]]


def _power_shift_after(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """Power as scale * x^power + shift instead of (shift + scale x)^power."""
    p = spec.param("power_param")
    power, scale, shift = float(p["power"]), float(p["scale"]), float(p["shift"])
    if power == 1.0 or (scale == 1.0 and shift == 0.0):
        return ref.forward(spec, bottoms, blobs)
    return [scale * torch.pow(bottoms[0], power) + shift]


def _elu_alpha_ignored(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """nn.ELU() with its default alpha 1, whatever Caffe's alpha."""
    return [F.elu(bottoms[0])]


def _prelu_shared_ignored(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """A channel-shared PReLU slope applied as if per channel from the first channel only."""
    x, a = bottoms[0], blobs[0]
    if not spec.param("prelu_param")["channel_shared"] or x.dim() < 2 or x.shape[1] < 2:
        return ref.forward(spec, bottoms, blobs)
    slope = torch.zeros(x.shape[1], dtype=x.dtype)
    slope[0] = a.reshape(-1)[0]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return [torch.where(x > 0, x, x * slope.reshape(shape))]


def _ip_flatten_nhwc(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """InnerProduct on a 4-D bottom flattened channels-last (a TensorFlow-style port)."""
    x = bottoms[0]
    if x.dim() != 4 or int(spec.param("inner_product_param")["axis"]) % 4 != 1:
        return ref.forward(spec, bottoms, blobs)
    return ref.forward(spec, [x.permute(0, 2, 3, 1).reshape(x.shape)], blobs)


def _log_softmax_loss(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """SigmoidCrossEntropyLoss as the naive -t log s - (1 - t) log (1 - s), unclamped."""
    x, t = bottoms
    s = torch.sigmoid(x)
    per = -(t * torch.log(s) + (1 - t) * torch.log(1 - s))
    return [per.sum().reshape(()) / x.shape[0]]


def _euclidean_mean(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """nn.MSELoss() (mean over every element) for EuclideanLoss (sum / 2N)."""
    a, b = bottoms
    return [F.mse_loss(a, b.reshape(a.shape)).reshape(())]


LAYER_MUTANTS: dict[str, LayerMutant] = {
    "pool-floor": LayerMutant(
        "Pooling",
        "floor rounding of the pooled size (PyTorch's default)",
        "forward shapes",
        _pool_floor,
    ),
    "pool-ave-exclude-pad": LayerMutant(
        "Pooling",
        "AVE divisor counts only in-image cells (count_include_pad=False)",
        "forward, AVE with pad",
        _ave_pool_exclude_pad,
    ),
    "lrn-alpha-not-divided": LayerMutant(
        "LRN", "alpha scales the window's sum, not its mean", "forward", _lrn_alpha_not_divided
    ),
    "lrn-torch-within-channel": LayerMutant(
        "LRN",
        "F.local_response_norm (across channels) for WITHIN_CHANNEL too",
        "forward, WITHIN_CHANNEL",
        _lrn_torch,
    ),
    "batchnorm-factor-ignored": LayerMutant(
        "BatchNorm",
        "mean and variance blobs used without dividing by the scale factor",
        "forward, factor != 1",
        _batchnorm_factor_ignored,
    ),
    "eltwise-coeff-ignored": LayerMutant(
        "Eltwise",
        "SUM ignores coeff",
        "forward, coeff != 1",
        _eltwise_folded("SUM", torch.add),  # a plain sum, whatever the coeffs
    ),
    "eltwise-max-tie-split": LayerMutant(
        "Eltwise",
        "MAX through torch.maximum: a tie splits the diff between bottoms",
        "backward, ties",
        _eltwise_folded("MAX", torch.maximum),  # its backward splits a tie between bottoms
    ),
    "softmax-last-axis": LayerMutant(
        "Softmax",
        "softmax over the last axis instead of Caffe's axis (default 1)",
        "forward on blobs with more than 2 axes",
        _softmax_last_axis,
    ),
    "ip-bias-when-no-bias-term": LayerMutant(
        "InnerProduct",
        "a bias added where bias_term is false",
        "forward",
        _bias_where_none("inner_product_param"),
    ),
    "conv-bias-when-no-bias-term": LayerMutant(
        "Convolution",
        "a bias added where bias_term is false",
        "forward",
        _bias_where_none("convolution_param"),
    ),
    "ip-flatten-nhwc": LayerMutant(
        "InnerProduct",
        "a 4-D bottom flattened channels-last",
        "forward, 4-D bottoms",
        _ip_flatten_nhwc,
    ),
    "dropout-active-in-test": LayerMutant(
        "Dropout",
        "dropout applied in TEST (module left in training mode)",
        "forward",
        _dropout_active,
    ),
    "scale-ignores-axis": LayerMutant(
        "Scale",
        "scale broadcast over the trailing axes instead of from axis",
        "forward, axis or num_axes not trailing",
        _scale_last_axis,
    ),
    "deconv-weight-transposed": LayerMutant(
        "Deconvolution",
        "weight loaded as a Convolution's (first two axes swapped)",
        "forward",
        _deconv_weight_transposed,
    ),
    "conv-groups-interleaved": LayerMutant(
        "Convolution",
        "group g takes channels c % group == g instead of a contiguous range",
        "forward, group > 1",
        _conv_groups_interleaved,
    ),
    "relu-slope-ignored": LayerMutant(
        "ReLU", "nn.ReLU for a leaky ReLU", "forward, negative_slope != 0", _relu_slope_ignored
    ),
    "concat-channels": LayerMutant(
        "Concat",
        "concatenation over dim 1 whatever the axis",
        "forward, axis != 1",
        _concat_channels,
    ),
    "crop-offset-ignored": LayerMutant(
        "Crop",
        "offsets ignored (cropped from the corner)",
        "forward, offset != 0",
        _crop_offset_ignored,
    ),
    "power-shift-after": LayerMutant(
        "Power", "scale x^p + shift instead of (shift + scale x)^p", "forward", _power_shift_after
    ),
    "elu-alpha-ignored": LayerMutant(
        "ELU", "nn.ELU() default alpha", "forward, alpha != 1, x < 0", _elu_alpha_ignored
    ),
    "prelu-shared-ignored": LayerMutant(
        "PReLU",
        "channel_shared slope read per channel",
        "forward, channel_shared",
        _prelu_shared_ignored,
    ),
    "sigmoid-xent-naive": LayerMutant(
        "SigmoidCrossEntropyLoss",
        "the naive log form (inf/NaN at large |x|)",
        "loss at large logits",
        _log_softmax_loss,
    ),
    "euclidean-mse-mean": LayerMutant(
        "EuclideanLoss", "nn.MSELoss() (mean) for sum / 2N", "loss, gradients", _euclidean_mean
    ),
}

__all__ = ["LAYER_MUTANTS", "LayerMutant"]
