"""The project's own reference converter: the float32 reference layer library composed over
the prototxt (``portcheck.refport``), its params read from the caffemodel. It scores 100 %
on the conformance grid; use it as ``--converter crossval.conformance.reference:convert``.

It needs Caffe to read the net and the caffemodel: inside a conformance run it uses the
run's Caffe (``caffe_worker``); called on its own it starts a worker of its own.
"""

from __future__ import annotations

import atexit

from torch import nn

from crossval.reference.layers import UnsupportedLayer

from ..inputs import read_prototxt
from ..portcheck.refport import reference_port
from ..worker import CaffeWorker
from . import MAPPING_ATTR, Unsupported

_current: CaffeWorker | None = None


def use_worker(worker: CaffeWorker | None) -> None:
    """The worker `caffe_worker` returns (the conformance child sets its relay)."""
    global _current
    _current = worker


def caffe_worker() -> CaffeWorker:
    """The Caffe of the conformance run, or a worker started now (closed at exit)."""
    global _current
    if _current is None:
        _current = CaffeWorker()
        atexit.register(_current.close)
    return _current


def convert(prototxt_path: str, caffemodel_path: str) -> nn.Module:
    """The reference of the net in `prototxt_path` with the params of `caffemodel_path`:
    ``forward(**input_blobs)`` returns every blob by name; its ``caffe_mapping`` names the
    param blobs past weight and bias (BatchNorm's scale factor)."""
    from pathlib import Path

    text = read_prototxt(Path(prototxt_path))
    try:
        port = reference_port(caffe_worker(), text, weights=str(caffemodel_path))
    except UnsupportedLayer as exc:
        raise Unsupported(str(exc)) from None
    setattr(port, MAPPING_ATTR, port.mapping())
    return port
