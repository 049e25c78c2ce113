"""The reference layer library composed over a whole net, as a port (the validate-port
interface): ``forward(**input_blobs)`` returns every blob by name, each at the value Caffe's
blob holds after the forward pass (an in-place layer's output replaces its bottom's)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from crossval.reference import layers as ref
from crossval.reference import param_name

from ..net import Net, NetLayer, read_net
from ..transfer import SUFFIXES
from ..worker import CaffeWorker

__all__ = ["ReferencePort", "blob_key", "reference_port"]


def blob_key(index: int) -> str:
    """The attribute of param blob `index` in its layer's submodule: ``weight``, ``bias``,
    then ``blob2``, ``blob3``... (BatchNorm's third blob needs a mapping entry, see
    ``ReferencePort.mapping``)."""
    return SUFFIXES[index] if index < len(SUFFIXES) else f"blob{index}"


class _Params(nn.Module):
    """One layer's param blobs: learnable ones (lr_mult > 0) as Parameters, constants as
    buffers."""


class ReferencePort(nn.Module):
    """The net's layers in Caffe's order, each the reference layer of its type, in `dtype`."""

    def __init__(
        self, net: Net, values: Mapping[str, list[np.ndarray]], dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.net = net
        self.dtype = dtype
        for lay in net.compute_layers:
            ref.lookup(lay.spec)  # UnsupportedLayer names the layer and its type
        self.holders: dict[str, str] = {}
        for lay in net.compute_layers:
            if not lay.params:
                continue
            holder = _Params()
            for p in lay.params:
                v = torch.from_numpy(np.asarray(values[lay.name][p.index])).to(dtype)
                if p.lr_mult > 0:
                    holder.register_parameter(blob_key(p.index), nn.Parameter(v.clone()))
                else:
                    holder.register_buffer(blob_key(p.index), v.clone())
            attr = param_name(lay.name)
            self.add_module(attr, holder)
            self.holders[lay.name] = attr

    def mapping(self) -> dict[str, str]:
        """``{"layer/index": key}`` for the param blobs past ``weight`` and ``bias``."""
        return {
            f"{lay.name}/{p.index}": f"{self.holders[lay.name]}.{blob_key(p.index)}"
            for lay in self.net.compute_layers
            for p in lay.params
            if p.index >= len(SUFFIXES)
        }

    def blobs_of(self, lay: NetLayer) -> list[Tensor]:
        if lay.name not in self.holders:
            return []
        holder = getattr(self, self.holders[lay.name])
        return [getattr(holder, blob_key(p.index)) for p in lay.params]

    def forward(self, **inputs: Tensor) -> dict[str, Tensor]:
        missing = [n for n in self.net.inputs if n not in inputs]
        if missing:
            raise TypeError(f"the net's input blobs {missing} were not given")
        blobs = {k: v.to(self.dtype) for k, v in inputs.items()}
        for lay in self.net.compute_layers:
            tops = ref.forward(lay.spec, [blobs[b] for b in lay.spec.bottoms], self.blobs_of(lay))
            for name, value in zip(lay.spec.tops, tops, strict=True):
                blobs[name] = value
        return blobs


def reference_port(
    worker: CaffeWorker,
    prototxt_text: str,
    phase: str = "TEST",
    dtype: torch.dtype = torch.float32,
    weights: str = "",
) -> ReferencePort:
    """The reference of `prototxt_text` as a port, its params Caffe's (from `weights`, a
    caffemodel path, or Caffe's fillers). A layer type outside the library raises
    ``crossval.reference.layers.UnsupportedLayer`` naming the layer."""
    net = read_net(worker, prototxt_text, phase)
    values = worker.params(prototxt_text, phase=phase, weights=weights).params
    port = ReferencePort(net, values, dtype)
    return port.eval()
