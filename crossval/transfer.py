"""Weight transfer between Caffe params and a PyTorch state_dict, by layer name.

Caffe layer ``L``'s blob 0 is ``<L'>.weight`` and blob 1 is ``<L'>.bias``, where ``L'`` is ``L``
with every character that is not legal in a Python identifier replaced by ``_`` (so
``fc8-101`` is ``fc8_101``). A mapping (``{"layer/index": "state_dict key"}``) overrides.
Values are copied, never recomputed: a float32 round trip is bit-exact.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import torch
from numpy.typing import NDArray

from crossval.reference import param_name

from .errors import CrossvalError

CaffeParams = dict[str, list[NDArray[np.float32]]]
SUFFIXES = ("weight", "bias")


class TransferError(CrossvalError):
    """A param has no counterpart, or its counterpart has another shape."""


def state_dict_key(layer: str, index: int, mapping: Mapping[str, str] | None = None) -> str:
    """The state_dict key for Caffe param `layer`/`index`."""
    explicit = (mapping or {}).get(f"{layer}/{index}")
    if explicit is not None:
        return explicit
    if index >= len(SUFFIXES):
        raise TransferError(
            f"Caffe layer {layer!r} has param blob {index}, which has no default name; "
            f'map it explicitly ("{layer}/{index}": "<state_dict key>")'
        )
    return f"{param_name(layer)}.{SUFFIXES[index]}"


def caffe_to_state_dict(
    params: Mapping[str, list[NDArray[np.float32]]],
    state: Mapping[str, torch.Tensor],
    mapping: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Caffe params as a state_dict for a module whose current state_dict is `state`.

    Every Caffe param must land on a key of `state` with the same shape, and every key of
    `state` must be covered; otherwise TransferError names the layer, key and shapes.
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for layer, blobs in params.items():
        for i, value in enumerate(blobs):
            key = state_dict_key(layer, i, mapping)
            where = f"Caffe param {layer}/{i} {tuple(value.shape)}"
            if key not in state:
                raise TransferError(
                    f"{where} has no state_dict entry {key!r} (state_dict has: {', '.join(state)})"
                )
            if key in out:
                raise TransferError(f"{where} and {origin[key]} both map to {key!r}")
            target = state[key]
            if tuple(target.shape) != tuple(value.shape):
                raise TransferError(
                    f"{where} does not fit {key!r}, which has shape {tuple(target.shape)}"
                )
            copied = torch.from_numpy(np.array(value, copy=True))
            converted = copied.to(target.dtype)
            if not torch.equal(converted.to(copied.dtype).isnan(), copied.isnan()) or not (
                torch.equal(converted.to(copied.dtype)[~copied.isnan()], copied[~copied.isnan()])
            ):
                raise TransferError(
                    f"{where} ({copied.dtype}) does not fit {key!r} ({target.dtype}) exactly"
                )
            out[key] = converted
            origin[key] = f"Caffe param {layer}/{i}"
    _refuse_unmapped(state, out)
    return out


def state_dict_to_caffe(
    state: Mapping[str, torch.Tensor],
    layout: Mapping[str, list[tuple[int, ...]]],
    mapping: Mapping[str, str] | None = None,
) -> CaffeParams:
    """A state_dict as Caffe params for a net whose param shapes are `layout`.

    Values must be float32-representable: a float64 tensor whose values would round is an
    error, so nothing is silently changed on the way into Caffe.
    """
    out: CaffeParams = {}
    used: set[str] = set()
    for layer, shapes in layout.items():
        blobs = []
        for i, shape in enumerate(shapes):
            key = state_dict_key(layer, i, mapping)
            if key not in state:
                raise TransferError(
                    f"Caffe param {layer}/{i} {shape} has no state_dict entry "
                    f"{key!r} (state_dict has: {', '.join(state)})"
                )
            t = state[key].detach().cpu()
            if tuple(t.shape) != tuple(shape):
                raise TransferError(
                    f"state_dict {key!r} has shape {tuple(t.shape)}, but Caffe "
                    f"param {layer}/{i} has shape {tuple(shape)}"
                )
            value = t.to(torch.float32).numpy().copy()
            back = torch.from_numpy(value).to(t.dtype)
            if (
                t.dtype != torch.float32
                and not torch.equal(back, t)
                and not bool(
                    (back.isnan() == t.isnan()).all()
                    and torch.equal(back[~t.isnan()], t[~t.isnan()])
                )
            ):
                raise TransferError(
                    f"state_dict {key!r} ({t.dtype}) is not exactly representable in float32"
                )
            if key in used:
                raise TransferError(
                    f"Caffe param {layer}/{i} maps to {key!r}, which another "
                    "Caffe param already took"
                )
            blobs.append(value)
            used.add(key)
        out[layer] = blobs
    _refuse_unmapped(state, used)
    return out


def _refuse_unmapped(state: Mapping[str, torch.Tensor], mapped: Collection[str]) -> None:
    extra = [k for k in state if k not in mapped]
    if extra:
        raise TransferError(
            "state_dict entries with no Caffe param: "
            + ", ".join(f"{k} {tuple(state[k].shape)}" for k in extra)
        )
