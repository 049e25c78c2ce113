"""A deliberately faulty prototxt-to-module loader, for crossval conformance's tests.

It reads the net and the caffemodel as any one-file loader does (here through crossval's
reference library, which also gives it every layer it gets right) and makes six classic
converter mistakes, each silent on some nets:

- ``pool_floor``: Pooling rounds its output size down (PyTorch's default), Caffe up;
- ``ave_exclude_pad``: AVE pooling divides by the cells inside the image, Caffe counts the
  padding;
- ``eltwise_coeff``: Eltwise SUM ignores its coefficients;
- ``softmax_last_axis``: Softmax over the last axis instead of ``softmax_param.axis``;
- ``dropout_active``: Dropout drops (and rescales) at test time;
- ``bias_added``: Convolution, Deconvolution and InnerProduct get a bias parameter (zero)
  even with ``bias_term: false``.

``FAULTS`` maps each to the function that applies it to one layer's forward; ``convert`` is
the converter. The tests derive the verdict each case must get from these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from crossval.conformance.reference import caffe_worker
from crossval.inputs import read_prototxt
from crossval.net import read_net
from crossval.portcheck.refport import ReferencePort
from crossval.reference import layers as ref
from crossval.reference.layers import LayerSpec

Forward = Callable[[LayerSpec, Sequence[Tensor], Sequence[Tensor]], list[Tensor]]


def pooling(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """pool_floor and ave_exclude_pad."""
    p = spec.param("pooling_param")
    floored = spec if p["global_pooling"] else spec.with_param("pooling_param", round_mode="FLOOR")
    tops = ref.forward(floored, bottoms, blobs)  # MAX may have a second top, the mask
    if str(p["pool"]) == "AVE":
        share = ref.forward(floored, [torch.ones_like(bottoms[0])], blobs)[0]
        tops[0] = tops[0] / share  # Caffe's sum over the window / the cells inside the image
    return tops


def eltwise(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """eltwise_coeff."""
    return ref.forward(spec.with_param("eltwise_param", coeff=[]), bottoms, blobs)


def softmax(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """softmax_last_axis."""
    return ref.forward(spec.with_param("softmax_param", axis=-1), bottoms, blobs)


def dropout(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
    """dropout_active."""
    ratio = float(spec.param("dropout_param")["dropout_ratio"])
    return [F.dropout(bottoms[0], p=ratio, training=True)]


FAULTS: dict[str, Forward] = {
    "Pooling": pooling,
    "Eltwise": eltwise,
    "Softmax": softmax,
    "Dropout": dropout,
}
BIASED = ("Convolution", "Deconvolution", "InnerProduct")  # bias_added


def _kind(spec: LayerSpec) -> str:
    return "inner_product_param" if spec.type == "InnerProduct" else "convolution_param"


def bias_added(spec: LayerSpec) -> bool:
    return spec.type in BIASED and not spec.param(_kind(spec))["bias_term"]


class FaultyPort(ReferencePort):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.extra: dict[str, str] = {}
        for lay in self.net.compute_layers:
            if bias_added(lay.spec) and lay.name in self.holders:
                holder = getattr(self, self.holders[lay.name])
                n = int(lay.spec.param(_kind(lay.spec))["num_output"])
                holder.register_parameter("bias", nn.Parameter(torch.zeros(n)))
                self.extra[lay.name] = self.holders[lay.name]

    def forward(self, **inputs: Tensor) -> dict[str, Tensor]:
        blobs = {k: v.to(self.dtype) for k, v in inputs.items()}
        for lay in self.net.compute_layers:
            bottoms = [blobs[b] for b in lay.spec.bottoms]
            fn = FAULTS.get(lay.type, ref.forward)
            tops = fn(lay.spec, bottoms, self.blobs_of(lay))
            if lay.name in self.extra:
                bias = getattr(self, self.extra[lay.name]).bias
                axis = _axis(lay.spec, tops[0].dim())
                shape = [1] * tops[0].dim()
                shape[axis] = -1
                tops = [t + bias.reshape(shape) for t in tops]
            for name, value in zip(lay.spec.tops, tops, strict=True):
                blobs[name] = value
        return blobs


def _axis(spec: LayerSpec, ndim: int) -> int:
    return int(spec.param(_kind(spec))["axis"]) % ndim


def convert(prototxt_path: str, caffemodel_path: str) -> nn.Module:
    worker = caffe_worker()
    text = read_prototxt(prototxt_path)  # type: ignore[arg-type]
    net = read_net(worker, text)
    values = worker.params(text, phase="TEST", weights=caffemodel_path).params
    port = FaultyPort(net, values, torch.float32)
    setattr(port, "caffe_mapping", port.mapping())  # noqa: B010
    return port.eval()
