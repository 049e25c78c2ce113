"""The port under test: loading it (``module:callable`` or a factory), running its own code
under a guard, and binding its tensors to Caffe's params.

A port is ``module:callable``; the callable returns a ``torch.nn.Module`` whose ``forward``
takes the net's input blobs as keyword arguments (float32 tensors, named by blob) and
returns a dict from Caffe blob names to tensors. Caffe layer ``L``'s param blob 0 maps to
state_dict key ``<L>.weight`` and blob 1 to ``<L>.bias`` (``transfer.state_dict_key``); a
JSON map ``{"layer/index": "key"}`` overrides. Shapes may differ only by singleton axes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import CrossvalError, UsageError


class PortFailure(CrossvalError):
    """The port raised, crashed, exited or hung in its own code: a finding about the port."""

    exit_code = 1


class PortGuard:
    """Runs the port's own code (import, factory, forward, backward): an exception there
    becomes a PortFailure naming the call and the example. The isolated run
    (crossval.isolation) extends it to tell its supervisor before each call."""

    def __init__(self) -> None:
        self.index = 0  # the example running, from 1 (0: none yet)
        self.desc = ""

    def begin_example(
        self,
        index: int,
        desc: str,
        ex: Any,
        inputs: dict[str, Any],
        params: dict[str, list[Any]],
    ) -> None:
        self.index, self.desc = index, desc

    def where(self, what: str) -> str:
        if self.index == 0:
            return what
        return f"{what} while running example {self.index} ({self.desc})"

    @contextlib.contextmanager
    def call(self, what: str) -> Iterator[None]:
        try:
            yield
        except CrossvalError:
            raise
        except Exception as exc:
            raise PortFailure(
                f"the port raised {type(exc).__name__}: {exc} in {self.where(what)}"
            ) from None


@contextlib.contextmanager
def importable_from_cwd() -> Iterator[None]:
    """The current directory on the import path, and no __pycache__ written beside the
    user's files, for the time of the import only."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        yield
    finally:
        sys.dont_write_bytecode = writes_bytecode
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def load_port(spec: str | Callable[[], nn.Module], guard: PortGuard | None = None) -> nn.Module:
    """Import `module:callable` (from the current directory or PYTHONPATH) and call it; a
    callable (from the pytest plugin) is called directly."""
    guard = guard or PortGuard()
    if callable(spec):
        with guard.call("its factory"):
            made = spec()
        if not isinstance(made, nn.Module):
            raise PortFailure(
                f"the port factory returned {type(made).__name__}, not a torch.nn.Module"
            )
        return made
    if ":" not in spec:
        raise UsageError(f"--port {spec!r}: expected MODULE:CALLABLE, e.g. myport:make")
    mod_name, _, attr = spec.partition(":")
    with importable_from_cwd():
        with guard.call(f"its module {mod_name!r} (import)"):
            try:
                module = importlib.import_module(mod_name)
            except ImportError as exc:
                raise UsageError(f"--port {spec!r}: cannot import {mod_name!r}: {exc}") from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise UsageError(f"--port {spec!r}: {mod_name} has no callable {attr!r}")
        with guard.call(f"its factory {attr!r}"):
            port = factory()
    if not isinstance(port, nn.Module):
        raise PortFailure(f"--port {spec!r} returned {type(port).__name__}, not a torch.nn.Module")
    return port


@dataclass(frozen=True)
class Binding:
    """Caffe param `layer`/`index` lives in the port at `key`."""

    layer: str
    index: int
    key: str
    caffe_shape: tuple[int, ...]
    port_shape: tuple[int, ...]
    lr_mult: float
    trainable: bool

    @property
    def fits(self) -> bool:
        """The shapes agree but for axes of size 1."""
        return squeeze(self.caffe_shape) == squeeze(self.port_shape)


def squeeze(shape: Sequence[int]) -> tuple[int, ...]:
    """`shape` without its axes of size 1."""
    return tuple(d for d in shape if d != 1)
