"""`crossval conformance`: a Caffe-semantics conformance table for a Caffe-to-PyTorch
converter.

A converter is a callable ``convert(prototxt_path, caffemodel_path) -> torch.nn.Module``
whose module follows validate-port's interface: ``forward(**input_blobs)`` takes the net's
input blobs as float32 tensors by name and returns a dict from Caffe blob names to tensors;
Caffe layer ``L``'s param blob 0 is the state_dict key ``<L>.weight`` and blob 1
``<L>.bias`` (``L`` with characters illegal in a Python name as ``_``). A module whose params
are named otherwise gives the map as an attribute ``caffe_mapping``: ``{"layer/index":
"state_dict key"}`` (BatchNorm's third blob, the scale factor, always needs one). A
converter that does not support a net raises ``Unsupported`` (or ``NotImplementedError``)
from ``convert``: the case's verdict is ``unsupported``.

Modules: ``cases`` (the grid), ``isolate`` (each case in a process of its own), ``command``
(the run, the table, the JSON, the kept failures), ``reference`` (the project's reference
converter, ``reference_converter`` here).
"""

from __future__ import annotations

MAPPING_ATTR = "caffe_mapping"


class Unsupported(Exception):
    """Raised by a converter's ``convert`` for a net it does not support (a layer type or
    a parameter it does not know): the case is reported ``unsupported``, not a crash."""


def __getattr__(name: str) -> object:
    # ``reference_converter`` loads torch and the reference: on first use only, so that the
    # CLI's option parsing (``crossval.conformance.options``) stays light.
    if name == "reference_converter":
        from .reference import convert

        return convert
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MAPPING_ATTR", "Unsupported", "reference_converter"]
