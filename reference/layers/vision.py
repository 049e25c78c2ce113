"""Vision layers: InnerProduct, Convolution, Deconvolution, Pooling, LRN."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from crossval.reference.layers import LayerSpec, register

FLT_MAX = float(np.finfo(np.float32).max)


def canonical_axis(axis: int, ndim: int, layer: LayerSpec) -> int:
    """Caffe's Blob::CanonicalAxisIndex: a negative axis counts from the end."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"layer {layer.name!r}: axis {axis} out of range for a {ndim}-D blob")
    return axis % ndim


def _reject(layer: LayerSpec, why: str) -> ValueError:
    return ValueError(f"layer {layer.name!r} ({layer.type}): {why}")


def _image_params(spec: LayerSpec, kind: str, shape: Sequence[int]) -> Mapping[str, Any]:
    """The layer's `kind` message, after the check of Pooling and LRN that the input is
    images: 4 axes (num, channels, height, width)."""
    p = spec.param(kind)
    if len(shape) != 4:
        raise _reject(
            spec, f"input must have 4 axes (num, channels, height, width), not {len(shape)}"
        )
    return p


@register("InnerProduct")
def inner_product(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """y = x.flatten(axis) @ W.T + b (W stored K x N when transpose)."""
    p = spec.param("inner_product_param")
    (x,) = bottoms
    axis = canonical_axis(int(p["axis"]), x.dim(), spec)
    lead = tuple(x.shape[:axis])
    flat = x.reshape(math.prod(lead), -1)
    w = blobs[0]
    # F.linear keeps the weight as one operand (an exported ONNX model keeps it as the
    # named initializer); Caffe's separate bias gemm rounds once more, within the same bound.
    y = F.linear(flat, w.T if p["transpose"] else w, blobs[1] if p["bias_term"] else None)
    return [y.reshape(*lead, int(p["num_output"]))]


# -- Convolution and Deconvolution ---------------------------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """A (de)convolution's shape parameters as BaseConvolutionLayer::LayerSetUp sets them."""

    axis: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pad: tuple[int, ...]
    dilation: tuple[int, ...]
    group: int
    num_output: int
    bias_term: bool

    @property
    def spatial(self) -> int:
        return len(self.kernel)

    def extent(self, i: int) -> int:
        return self.dilation[i] * (self.kernel[i] - 1) + 1


def _per_axis(
    layer: LayerSpec,
    p: Mapping[str, Any],
    name: str,
    n: int,
    default: int | None,
) -> tuple[int, ...]:
    """`name` given once, once per spatial axis, or as name_h/name_w (2-D only)."""
    values = [int(v) for v in p[name]]
    hw = (name + "_h", name + "_w")
    if hw[0] in p and (int(p[hw[0]]) or int(p[hw[1]])):
        if n != 2:
            raise _reject(layer, f"{hw[0]} & {hw[1]} can only be used for 2D convolution")
        if values:
            raise _reject(layer, f"either {name} or {hw[0]}/{hw[1]} should be specified; not both")
        return int(p[hw[0]]), int(p[hw[1]])
    if len(values) not in ((1, n) if default is None else (0, 1, n)):
        raise _reject(
            layer,
            f"{name} must be specified once, or once per spatial dimension "
            f"({name} specified {len(values)} times; {n} spatial dims)",
        )
    if not values:
        return (default if default is not None else 0,) * n
    return tuple(values[0] if len(values) == 1 else values[i] for i in range(n))


def conv_geometry(spec: LayerSpec, shape: Sequence[int]) -> ConvGeometry:
    """Read convolution_param with Caffe's rules and defaults (and its rejections), for a
    bottom of `shape`."""
    p = spec.param("convolution_param")
    axis = canonical_axis(int(p["axis"]), len(shape), spec)
    n = len(shape) - axis - 1
    if p["kernel_h"] or p["kernel_w"]:
        if n != 2:
            raise _reject(spec, "kernel_h & kernel_w can only be used for 2D convolution")
        if p["kernel_size"]:
            raise _reject(spec, "either kernel_size or kernel_h/w should be specified; not both")
        kernel: tuple[int, ...] = (int(p["kernel_h"]), int(p["kernel_w"]))
    elif n == 0:
        if len(p["kernel_size"]) > 1:
            raise _reject(spec, "kernel_size given per axis on a blob with no spatial axis")
        kernel = ()
    else:
        kernel = _per_axis(spec, p, "kernel_size", n, None)
    if any(k <= 0 for k in kernel):
        raise _reject(spec, f"filter dimensions must be nonzero (kernel {kernel})")
    stride = _per_axis(spec, p, "stride", n, 1)
    if any(s <= 0 for s in stride):
        raise _reject(spec, f"stride dimensions must be nonzero (stride {stride})")
    pad = _per_axis(spec, p, "pad", n, 0)
    dilation = _per_axis(spec, p, "dilation", n, 1)
    if any(d <= 0 for d in dilation):
        raise _reject(spec, f"dilation must be positive (dilation {dilation})")
    num_output, group = int(p["num_output"]), int(p["group"])
    channels = int(shape[axis])
    if num_output <= 0:
        raise _reject(spec, "num_output must be positive")
    if group <= 0 or channels % group or num_output % group:
        raise _reject(
            spec,
            f"group {group} must divide both the {channels} input channels and "
            f"num_output {num_output}",
        )
    if n > 3:
        raise _reject(spec, f"the reference supports up to 3 spatial axes, not {n}")
    return ConvGeometry(
        axis, kernel, stride, pad, dilation, group, num_output, bool(p["bias_term"])
    )


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DECONV = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor], deconv: bool
) -> list[Tensor]:
    x0 = bottoms[0]
    g = conv_geometry(spec, x0.shape)
    for b in bottoms[1:]:
        if b.shape != x0.shape:
            raise _reject(spec, f"bottoms of shapes {tuple(x0.shape)} and {tuple(b.shape)}")
    n = g.spatial
    space = tuple(x0.shape[g.axis + 1 :])
    for i in range(n):
        if deconv:
            out = g.stride[i] * (space[i] - 1) + g.extent(i) - 2 * g.pad[i]
            if out <= 0:
                raise _reject(spec, f"spatial axis {i} would have output size {out}")
        elif space[i] + 2 * g.pad[i] < g.extent(i):
            raise _reject(
                spec,
                f"kernel extent {g.extent(i)} exceeds the padded input "
                f"{space[i]} + 2 * {g.pad[i]} on spatial axis {i}",
            )
    w = blobs[0]
    kw: dict[str, Any] = {
        "stride": g.stride,
        "padding": g.pad,
        "dilation": g.dilation,
        "groups": g.group,
    }
    if n == 0:  # Caffe's kernel-less case on an N x C blob: a 1x1 kernel on one point
        w = w.reshape(*w.shape, 1)
        kw = {"groups": g.group}
    op = (_DECONV if deconv else _CONV)[max(n, 1)]
    lead = tuple(x0.shape[: g.axis])
    tops = []
    for x in bottoms:
        if n == 0 and g.group == 1 and not deconv:
            # The kernel-less N x C case is a product with the (num_output, C) kernel: kept
            # as one (an exported ONNX model computes the seed's pred_age from prob by it).
            bias = blobs[1] if g.bias_term else None
            if x.dim() == 2:  # (N, C): no reshapes, so an export computes pred_age from prob
                tops.append(F.linear(x, blobs[0], bias))
            else:
                flat = x.reshape(math.prod(lead), -1)
                tops.append(F.linear(flat, blobs[0], bias).reshape(*lead, -1))
            continue
        xs = x.reshape(math.prod(lead), x.shape[g.axis], *(space or (1,)))
        y = op(xs, w, None, **kw)
        if g.bias_term:
            y = y + blobs[1].reshape(1, -1, *([1] * (y.dim() - 2)))
        tops.append(y.reshape(*lead, g.num_output, *y.shape[2:]) if n else y.reshape(*lead, -1))
    return tops


@register("Convolution")
def convolution(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """y[o] = sum_{c in group(o), k} W[o, c, k] x[c, stride * p + dilation * k - pad] + b[o]."""
    return _conv(spec, bottoms, blobs, deconv=False)


@register("Deconvolution")
def deconvolution(
    spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]
) -> list[Tensor]:
    """y = the transpose of Convolution applied to x, W stored (C_in, num_output / group, k) + b."""
    return _conv(spec, bottoms, blobs, deconv=True)


# -- Pooling -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolGeometry:
    """A pooling's windows as PoolingLayer::LayerSetUp and Reshape set them."""

    method: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    out: tuple[int, int]


def pool_geometry(spec: LayerSpec, shape: Sequence[int]) -> PoolGeometry:
    """Kernel, stride, pad and pooled size of a Pooling layer on a bottom of `shape`."""
    p = _image_params(spec, "pooling_param", shape)
    method = str(p["pool"])
    if method not in ("MAX", "AVE"):
        raise _reject(spec, f"pool {method} is not implemented on the CPU in Caffe")
    has_k, has_kh, has_kw = bool(p["kernel_size"]), bool(p["kernel_h"]), bool(p["kernel_w"])
    if p["global_pooling"]:
        if has_k or has_kh or has_kw:
            raise _reject(spec, "with global_pooling: true the filter size cannot be specified")
        kernel = (int(shape[2]), int(shape[3]))
    elif has_k == (has_kh and has_kw):
        raise _reject(spec, "filter size is kernel_size OR kernel_h and kernel_w; not both")
    else:
        kernel = (int(p["kernel_size"]),) * 2 if has_k else (int(p["kernel_h"]), int(p["kernel_w"]))
    has_ph, has_pw = bool(p["pad_h"]), bool(p["pad_w"])
    pad = (int(p["pad_h"]), int(p["pad_w"])) if has_ph or has_pw else (int(p["pad"]),) * 2
    has_sh, has_sw = bool(p["stride_h"]), bool(p["stride_w"])
    if has_sh != has_sw:
        raise _reject(spec, "stride is stride OR stride_h and stride_w are required")
    stride = (int(p["stride_h"]), int(p["stride_w"])) if has_sh else (int(p["stride"]),) * 2
    if p["global_pooling"] and (pad != (0, 0) or stride != (1, 1)):
        raise _reject(spec, "with global_pooling: true only pad = 0 and stride = 1")
    if min(kernel) <= 0 or min(stride) <= 0:
        raise _reject(spec, f"kernel {kernel} and stride {stride} must be nonzero")
    if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
        raise _reject(spec, f"pad {pad} must be smaller than the kernel {kernel}")
    # round_mode came to BVLC master in 2018; a build without it always rounds up.
    rounding = np.ceil if p.get("round_mode", "CEIL") == "CEIL" else np.floor
    out = []
    for i in range(2):
        size, k, s, q = int(shape[2 + i]), kernel[i], stride[i], pad[i]
        # Caffe divides in float: static_cast<int>(ceil(float(H + 2 pad - k) / stride)) + 1
        n = int(rounding(np.float32(size + 2 * q - k) / np.float32(s))) + 1
        if q and (n - 1) * s >= size + q:
            n -= 1  # the last window must start inside the image or its left padding
        if n <= 0:
            raise _reject(spec, f"pooled size {n} on axis {2 + i} (input {size}, kernel {k})")
        if (n - 1) * s - q >= size:
            # Only without padding and with CEIL: Caffe's MAX would scatter through index -1.
            raise _reject(
                spec,
                f"the last window on axis {2 + i} starts at {(n - 1) * s - q}, past the "
                f"input ({size}): kernel {k} < stride {s} with no pad",
            )
        out.append(n)
    return PoolGeometry(method, kernel, stride, pad, (out[0], out[1]))


def _axis_windows(size: int, k: int, s: int, q: int, n: int) -> tuple[Any, Any, Any]:
    """Per output position: clipped start, clipped end, and AVE's divisor factor (the window
    clipped to the padded border, min(start + k, size + pad) - start)."""
    start = np.arange(n) * s - q
    padded_end = np.minimum(start + k, size + q)
    return np.maximum(start, 0), np.minimum(padded_end, size), padded_end - start


def pool_windows(g: PoolGeometry, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """Index of each window's cells in h * w, in Caffe's scan order (rows, then columns),
    (PH, PW, kh * kw), with h * w where the window has no cell; the mask of real cells; and
    AVE's divisor (PH, PW)."""
    hs, he, hd = _axis_windows(h, g.kernel[0], g.stride[0], g.pad[0], g.out[0])
    ws, we, wd = _axis_windows(w, g.kernel[1], g.stride[1], g.pad[1], g.out[1])
    dh, dw = np.meshgrid(np.arange(g.kernel[0]), np.arange(g.kernel[1]), indexing="ij")
    rows = hs[:, None, None] + dh.reshape(1, 1, -1)  # (PH, 1, K)
    cols = ws[None, :, None] + dw.reshape(1, 1, -1)  # (1, PW, K)
    valid = (rows < he[:, None, None]) & (cols < we[None, :, None])
    index = np.where(valid, rows * w + cols, h * w)
    divisor = hd[:, None] * wd[None, :]
    return (
        torch.from_numpy(index.astype(np.int64)),
        torch.from_numpy(valid),
        torch.from_numpy(divisor.astype(np.float64)),
    )


@register("Pooling")
def pooling(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """MAX: y = x[first argmax in scan order]; AVE: y = sum(window) / (window to the padded border).

    Windows start at stride * p - pad; their number rounds up (CEIL) or down (FLOOR), less
    one when the last would start past the input and its left padding.
    """
    (x,) = bottoms
    g = pool_geometry(spec, x.shape)
    n, c, h, w = x.shape
    index, _, divisor = pool_windows(g, h, w)
    ph, pw, kk = index.shape
    flat = x.reshape(n, c, h * w)
    fill = -math.inf if g.method == "MAX" else 0.0
    ext = torch.cat([flat, flat.new_full((n, c, 1), fill)], dim=2)
    cells = ext[:, :, index.reshape(-1)].reshape(n, c, ph, pw, kk)
    if g.method == "AVE":
        return [cells.sum(dim=-1) / divisor.to(x.dtype)]
    # torch.argmax picks the first maximum, as Caffe's strict `>` scan does; the gradient
    # then flows to that one cell only.
    first = cells.detach().argmax(dim=-1, keepdim=True)
    top = cells.gather(-1, first).squeeze(-1)
    tops = [top]
    if len(spec.tops) == 2:
        tops.append(index.expand(n, c, ph, pw, kk).gather(-1, first).squeeze(-1).to(x.dtype))
    return tops


# -- LRN -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LRNParams:
    """An LRN's window and constants: s = k + a * (sum of squares over the window),
    y = x s^-beta. ACROSS_CHANNELS: a = alpha / size over `size` channels; WITHIN_CHANNEL:
    a = alpha / size^2 over a size x size square and k = 1 (Caffe's shift, not `k`)."""

    across: bool
    size: int
    alpha: float
    a: float
    k: float
    beta: float


def lrn_params(spec: LayerSpec, shape: Sequence[int]) -> LRNParams:
    p = _image_params(spec, "lrn_param", shape)
    size = int(p["local_size"])
    if size % 2 != 1:
        raise _reject(spec, f"LRN only supports odd values for local_size, not {size}")
    alpha, beta = float(p["alpha"]), float(p["beta"])
    if p["norm_region"] == "ACROSS_CHANNELS":
        return LRNParams(True, size, alpha, alpha / size, float(p["k"]), beta)
    return LRNParams(False, size, alpha, alpha / size**2, 1.0, beta)


def lrn_window_sum(q: LRNParams, v: Tensor) -> Tensor:
    """The sum of `v` over each element's LRN window (zero beyond the borders)."""
    pre = (q.size - 1) // 2
    if q.across:
        c = v.shape[1]
        padded = F.pad(v, (0, 0, 0, 0, pre, pre))
        return sum((padded[:, d : d + c] for d in range(q.size)), torch.zeros_like(v))
    return F.avg_pool2d(v, q.size, 1, pre, count_include_pad=True) * q.size**2


@register("LRN")
def lrn(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """y = x (k + alpha / n sum_window x^2)^-beta; n = local_size, or local_size^2 and k = 1.

    ACROSS_CHANNELS sums over local_size channels; WITHIN_CHANNEL over a local_size square
    (zero padded), with Caffe's Power shift 1 in place of k.
    """
    (x,) = bottoms
    q = lrn_params(spec, x.shape)
    if q.across:
        scale = q.k + q.a * lrn_window_sum(q, x * x)
    else:
        # Caffe: AVE pooling of the squares (padding counted), then Power (1 + alpha avg)^-beta
        avg = F.avg_pool2d(x * x, q.size, 1, (q.size - 1) // 2, count_include_pad=True)
        scale = 1.0 + q.alpha * avg
    return [x * scale.pow(-q.beta)]
