"""Converters that misbehave in their own process, for crossval conformance's isolation
tests: each acts up on one layer type and converts every other net correctly (the
reference converter)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from crossval.conformance import Unsupported
from crossval.conformance.reference import convert as reference


def _types(prototxt_path: str) -> str:
    return Path(prototxt_path).read_text()


class _Exits(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **inputs: Tensor) -> dict[str, Tensor]:
        os._exit(3)  # dies in the middle of a forward, as a segfaulting extension would


def convert(prototxt_path: str, caffemodel_path: str) -> nn.Module:
    """ReLU: crashes the process in convert (a segfault-like abort); Sigmoid: sleeps past
    any short time limit; TanH: prints 50 MB and then converts; AbsVal: the module's
    forward exits the process; ELU: refused (Unsupported); PReLU: its slopes loaded
    doubled; everything else: correct."""
    text = _types(prototxt_path)
    if 'type: "ReLU"' in text:
        os.abort()
    if 'type: "Sigmoid"' in text:
        time.sleep(3600)
    if 'type: "TanH"' in text:
        line = "x" * 1023 + "\n"
        for _ in range(50 * 1024):
            sys.stdout.write(line)
        sys.stdout.flush()
    if 'type: "ELU"' in text:
        raise Unsupported("ELU is not supported by this converter")
    module = reference(prototxt_path, caffemodel_path)
    if 'type: "AbsVal"' in text:
        return _Exits(module)
    if 'type: "PReLU"' in text:
        with torch.no_grad():
            module.layer.weight.mul_(2)  # type: ignore[operator, union-attr]
    return module
