"""Export a reference head through torch.onnx.export (dynamo) with a dynamic batch axis, and
write real weights into an exported graph's learnable initializers (with_weights)."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import warnings
from collections.abc import Iterator, Mapping
from types import FrameType
from typing import Any

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from onnx import numpy_helper

from .. import __version__
from .spec import BATCH_AXIS, EXPORTER, HeadSpec, OnnxInputError, OnnxModelInvalid
from .validate import learnable_initializers, validate

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]


# ---- export ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs optional-op registrations, deprecations and opset-conversion
    fallbacks: keep them off the CLI (a failed conversion is reported by `export` itself)."""
    logs = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def plain(text: str) -> str:
    """Captured exporter text without its terminal colour codes."""
    return ANSI_ESCAPE.sub("", text)


class _Interrupts:
    """Notes a Ctrl-C (SIGINT) while active: the exporter may wrap the KeyboardInterrupt in
    an error of its own, which must still end crossval as interrupted."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)

            def noted(signum: int, frame: FrameType | None) -> None:
                self.seen = True
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, noted)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def caused(self, exc: BaseException) -> bool:
        seen: set[int] = set()
        cause: BaseException | None = exc
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, KeyboardInterrupt):
                return True
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        return self.seen


def exporter_versions() -> dict[str, str]:
    import onnxscript

    return {
        "exporter": EXPORTER,
        "exporter.torch": torch.__version__,
        "exporter.onnxscript": str(onnxscript.__version__),
        "exporter.onnx": onnx.__version__,
        "crossval.version": __version__,
    }


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise OnnxModelInvalid("the model imports no default-domain (ai.onnx) opset")


def export(
    spec: HeadSpec,
    weights: Mapping[str, F32] | None = None,
    opset: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> onnx.ModelProto:
    """The reference head as a validated ONNX model with a dynamic batch axis.

    The graph is exported once from the reference holding placeholder weights (a fixed
    pseudo-random draw), and `weights` (by state_dict key) are then written into its two
    learnable initializers (`with_weights`): the exporter's optimizer sees generic values, so
    the graph's structure cannot depend on the weights (it drops an all-zero bias, for one).
    The fixed constant always comes from the reference and is checked bit for bit.
    """
    module = spec.module(torch.float32)
    state = module.state_dict()
    rng = np.random.default_rng(0)
    placeholders = {}
    for key in spec.learnable:
        shape = tuple(state[key].shape)
        placeholders[key] = (rng.standard_normal(shape) * 0.1 + 0.01).astype(np.float32)
        state[key] = torch.from_numpy(placeholders[key])
    module.load_state_dict(state)
    example = torch.zeros((2, *spec.input_dims), dtype=torch.float32)
    interrupts = _Interrupts()
    try:
        with _quiet_exporter(), interrupts:
            program = torch.onnx.export(
                module,
                (example,),
                input_names=[spec.input_blob],
                output_names=list(spec.blobs),
                opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim(BATCH_AXIS)},),
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:
        if interrupts.caused(exc):
            raise KeyboardInterrupt from None
        first = (plain(str(exc)).strip().splitlines() or [""])[0]
        at = f" at opset {opset}" if opset is not None else ""
        raise OnnxInputError(
            f"torch.onnx.export failed for {spec.describe()}{at}: {type(exc).__name__}: {first}"
        ) from None
    if program is None:
        raise OnnxInputError("torch.onnx.export returned no program")
    model: onnx.ModelProto = program.model_proto
    if opset is not None and opset_of(model) != opset:
        raise OnnxInputError(
            f"torch.onnx.export could not give {spec.describe()} opset {opset} (its version "
            f"converter left opset {opset_of(model)}); choose an opset it supports"
        )
    model = with_weights(model, spec, placeholders if weights is None else weights)
    props = {**spec.metadata(), **exporter_versions(), "opset": str(opset_of(model))}
    props.update(metadata or {})
    onnx.helper.set_model_props(model, props)
    model.doc_string = f"crossval: {spec.describe()}, {spec.fixed_text()}"
    validate(model, spec)
    return model


def with_weights(
    model: onnx.ModelProto, spec: HeadSpec, weights: Mapping[str, F32]
) -> onnx.ModelProto:
    """A copy of `model` whose learnable initializers (by state_dict key, exactly the two the
    InnerProduct node reads) hold `weights`; nothing else changes."""
    if set(weights) != set(spec.learnable):
        raise OnnxInputError(
            f"weights {sorted(weights)} are not the learnable params {list(spec.learnable)} "
            f"of {spec.describe()}"
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    where = learnable_initializers(out.graph, spec)
    for key in spec.learnable:
        value = np.asarray(weights[key])
        if value.dtype != np.float32:
            raise OnnxInputError(f"weight {key!r} is {value.dtype}, not float32")
        init = out.graph.initializer[where[key]]
        if tuple(init.dims) != value.shape:
            raise OnnxInputError(
                f"weight {key!r} has shape {value.shape}, the model's initializer "
                f"{tuple(init.dims)}"
            )
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), key))
    return out
