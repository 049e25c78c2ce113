"""The Caffe worker's requests, one frozen dataclass per operation.

Each class says its operation once: its name (``op``), its arguments with their types and
defaults, what it does (the docstring), and its reply (the type given to ``Request``, a
dataclass of ``crossval.caffe_side.replies`` or a plain type). The client's typed methods
(``crossval.worker.CaffeOps``) are made from these classes, and the worker
(``crossval.caffe_side.server.Ops``) serves each with its ``op_<op>`` method, which takes
the request. A request crosses the pipe as ``(op, kwargs)`` (``Request.kwargs``): the
worker builds the request again from them.

This module needs numpy only (no torch, no pycaffe), so both processes import it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from crossval.examplegen import Recipe

from . import replies

R = TypeVar("R")

Arrays = Mapping[str, np.ndarray]  # an array by blob name
ParamArrays = Mapping[str, list[np.ndarray]]  # param blobs by layer

BY_OP: dict[str, type[Request[Any]]] = {}


class Request(Generic[R]):
    """A request to the worker whose reply is an `R`. A subclass names its operation:
    ``class RunRequest(Request[replies.RunReply], op="run")``."""

    op: ClassVar[str]
    reply: ClassVar[object]  # R at run time: a class, list[...] of one, or a union

    def __init_subclass__(cls, op: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not op:
            raise TypeError(f"{cls.__name__} names no op")
        if op in BY_OP:
            raise TypeError(f"op {op!r} has two requests: {BY_OP[op].__name__}, {cls.__name__}")
        (base,) = [b for b in cls.__orig_bases__ if typing.get_origin(b) is Request]  # type: ignore[attr-defined]
        (cls.reply,) = typing.get_args(base)
        cls.op = op
        BY_OP[op] = cls

    def kwargs(self) -> dict[str, Any]:
        """The fields as they cross the pipe: by name, each mapping as a dict."""
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }


def defaults(kind: type[Request[Any]]) -> dict[str, Any]:
    """The default of each field of the request class `kind` that has one."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(kind):  # type: ignore[arg-type]
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _plain(value: object) -> object:
    return dict(value) if isinstance(value, Mapping) and not isinstance(value, dict) else value


def conforms(value: object, form: object) -> bool:
    """Whether `value` is of the type `form` (a class, None, ``list[X]``, a union; a
    generic class's parameters are not checked)."""
    if form is None or form is type(None):
        return value is None
    origin = typing.get_origin(form)
    if origin is list:
        (item,) = typing.get_args(form)
        return isinstance(value, list) and all(conforms(v, item) for v in value)
    if origin is typing.Union or origin is types.UnionType:
        return any(conforms(value, f) for f in typing.get_args(form))
    if isinstance(origin, type):
        return isinstance(value, origin)
    if isinstance(form, type):
        return isinstance(value, form)
    raise TypeError(f"cannot check a reply against {form!r}")


def described(form: object) -> str:
    """`form` in words: 'a RunReply', 'a list of str', 'a SurgeryReply or None'."""
    if form is None or form is type(None):
        return "None"
    origin = typing.get_origin(form)
    if origin is list:
        (item,) = typing.get_args(form)
        return "a list of " + described(item).removeprefix("a ")
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(described(f) for f in typing.get_args(form))
    cls = origin if isinstance(origin, type) else form
    return f"a {getattr(cls, '__name__', repr(cls))}"


# ---- the operations ------------------------------------------------------------------------


@dataclass(frozen=True)
class PingRequest(Request[replies.Ping], op="ping"):
    """Where the worker's pycaffe comes from, and its process id."""


@dataclass(frozen=True)
class PrototxtRequest(Request[str], op="prototxt"):
    """The prototxt text of a net the worker builds (``crossval.caffe_side.nets.BUILDERS``:
    a head or a zoo net) with the builder's `options`."""

    head: str
    options: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class DescribeRequest(Request[replies.NetDescription], op="describe"):
    """The net's structure: layers in order with bottoms, tops, param shapes and
    multipliers (from the prototxt), blob shapes in Caffe's (topological) order, and the
    tops of Input layers."""

    prototxt: str
    phase: str = "TEST"
    surgery: str = ""


@dataclass(frozen=True)
class LayerSpecsRequest(Request[list[replies.CaffeLayerSpec]], op="layer_specs"):
    """Each layer a net loaded in `phase` keeps (V1 nets and input headers upgraded as
    Caffe does, see crossval.caffe_side.upgrade), as the reference layer library reads
    it: name, type, bottoms, tops, phase rules, and its parameter messages (those set,
    and the one for its own type even when unset) with every field filled in, Caffe's
    proto defaults included."""

    prototxt: str
    phase: str = "TEST"


@dataclass(frozen=True)
class LayerTypesRequest(Request[list[str]], op="layer_types"):
    """The `type` of each layer in `prototxt` (upgraded; only those `phase` keeps, when
    given), parsed only (no net is made, so a type the build lacks cannot abort here)."""

    prototxt: str
    phase: str | None = None


@dataclass(frozen=True)
class ParamsRequest(Request[replies.NetParams], op="params"):
    """Every param blob of the net (from `weights`, or as Caffe fills it in), by layer, in
    Caffe's order (copies), plus those layers' types."""

    prototxt: str
    phase: str = "TEST"
    weights: str = ""
    surgery: str = ""


@dataclass(frozen=True)
class RunRequest(Request[replies.RunReply], op="run"):
    """Set `params` and `inputs`, forward (and backward), and return every blob, the
    inputs' diffs (every blob's with `all_diffs`), the param diffs and (unless
    `return_params` is false) the params. `top_diffs` seeds the backward pass: each named
    blob's diff is set to its value first (a net without a loss needs
    `force_backward: true` for the diffs to reach its inputs). `top_diff_seed`
    (seed, blobs) draws them in the worker instead, standard normal in float32 at each
    blob's shape after the forward pass, in the order given; the reply's `top_diffs`
    holds them."""

    prototxt: str
    inputs: Arrays
    params: ParamArrays | None = None
    phase: str = "TRAIN"
    backward: bool = False
    weights: str = ""
    surgery: str = ""
    return_params: bool = True
    all_diffs: bool = False
    top_diffs: Arrays | None = None
    top_diff_seed: tuple[int, list[str]] | None = None


@dataclass(frozen=True)
class RunGeneratedRequest(Request[replies.GeneratedRun], op="run_generated"):
    """`run` on an example the worker generates (``crossval.examplegen``; `recipe` is its
    recipe) instead of one shipped to it; the reply carries the digest of every param the
    net ran with."""

    prototxt: str
    recipe: Recipe
    seed: int
    input_scale: float
    weight_scale: float
    batch: int
    learnable: bool
    phase: str = "TEST"
    weights: str = ""
    surgery: str = ""
    backward: bool = False
    all_diffs: bool = False
    top_diff_seed: tuple[int, list[str]] | None = None


@dataclass(frozen=True)
class RunManyRequest(
    Request[replies.ManyRunsReply[np.ndarray] | replies.ManyRunsReply[replies.Descriptor]],
    op="run_many",
):
    """`run` (forward and backward) on many independent cases back to back, on one cached
    net: every array of `inputs` and `params` has a leading case axis, and case m runs with
    `inputs[...][m]` and `params[...][i][m]`. The reply stacks, per case, every blob, the
    diffs of the inputs, and every param's data (read back after the case's run) and
    diff; see ``crossval.worker.ManyRuns``. The params that were sent are read back and
    compared bit for bit in the worker: the reply's `params` leave them out, and
    `sent_back` holds (layer, i, case, read-back value) for each case whose read-back
    differs at all (the client puts those back into the values it sent).

    With `shared` (path, offset), the arrays of `inputs` and `params` are descriptors of
    arrays in the parent's shared memory file (``crossval.caffe_side.wire.put_arrays``),
    and the reply's arrays are written to it from the offset, the reply holding their
    descriptors (in ``crossval.caffe_side.replies.run_many_arrays`` order)."""

    prototxt: str
    inputs: Arrays | Mapping[str, replies.Descriptor]
    params: replies.Params | dict[str, list[replies.Descriptor]]
    surgery: str = ""
    phase: str = "TRAIN"
    shared: tuple[str, int] | None = None


@dataclass(frozen=True)
class GradientCheckRequest(Request[replies.GradientCheckReply], op="gradient_check"):
    """Caffe's GradientChecker, in float32, on chosen elements.

    `targets` are (kind, layer-or-blob, flat index) with kind "blob" (an input blob) or
    "param" (param blob 0 or 1 is given as `layer/i` in the name). For each element:
    estimated = (L(v + step) - L(v - step)) / (2 step); it must be within
    threshold * max(|computed|, |estimated|, 1) + slack of the backward pass, with
    `slacks` one per target (zero by default, as in Caffe). With `kink`
    (blob, target blob, k), an element whose perturbation moves any |blob - target|
    across k is skipped, as Caffe's checker skips its kink range."""

    prototxt: str
    inputs: Arrays
    params: ParamArrays
    targets: list[tuple[str, str, int]]
    step: float = 1e-2
    threshold: float = 1e-3
    surgery: str = ""
    kink: tuple[str, str, float] | None = None
    slacks: list[float] | None = None


@dataclass(frozen=True)
class TimeRawRequest(Request[replies.RawTime], op="time_raw"):
    """Seconds per forward and backward of the net inside the worker (no IPC), best of 5
    runs of `repeat` each."""

    prototxt: str
    inputs: Arrays
    params: ParamArrays
    repeat: int = 1000
    surgery: str = ""


@dataclass(frozen=True)
class TrainRequest(Request[replies.TrainReply], op="train"):
    """Caffe's solver (from its prototxt file) for `steps` iterations from `weights`.
    Iteration t gets input batch t (cycled). The reply holds the loss of each iteration
    (computed before its update, as Caffe reports it) and every param after each
    iteration."""

    solver_prototxt: str
    steps: int
    batches: list[dict[str, np.ndarray]]
    weights: str = ""


@dataclass(frozen=True)
class SaveRequest(Request[str], op="save"):
    """Write a caffemodel holding `params` (blob order as in the net) to `out` (the
    reply)."""

    prototxt: str
    params: ParamArrays
    out: str
    phase: str = "TEST"


@dataclass(frozen=True)
class SurgeryRequest(Request[replies.SurgeryReply | None], op="surgery"):
    """The net surgery on a fresh net (after setting `params`, if given): `layer`'s kernel
    set to arange(K); with `out`, the net saved as a caffemodel. None when `layer` is
    ''."""

    prototxt: str
    phase: str = "TRAIN"
    layer: str = "pred_age"
    weights: str = ""
    out: str = ""
    params: ParamArrays | None = None


@dataclass(frozen=True)
class CheckNetRequest(Request[replies.CheckNetReply], op="check_net"):
    """What ``crossval.inputs.check_net`` needs to know of the net: layer names and types
    and the input shapes, read from the text; with `weights`, the caffemodel's blob shapes
    per layer and the net's param shapes and lr_mults (the net is built only when its
    inputs have no zero dimension and its layer names are unique)."""

    prototxt: str
    phase: str = "TEST"
    weights: str = ""


@dataclass(frozen=True)
class CrashRequest(Request[None], op="crash"):
    """For tests of crash isolation and time limits: die (`how`: "abort", "segfault") or
    "hang" the way Caffe can."""

    how: str


__all__ = [
    "BY_OP",
    "CheckNetRequest",
    "CrashRequest",
    "DescribeRequest",
    "GradientCheckRequest",
    "LayerSpecsRequest",
    "LayerTypesRequest",
    "ParamsRequest",
    "PingRequest",
    "PrototxtRequest",
    "Request",
    "RunGeneratedRequest",
    "RunManyRequest",
    "RunRequest",
    "SaveRequest",
    "SurgeryRequest",
    "TimeRawRequest",
    "TrainRequest",
    "conforms",
    "defaults",
    "described",
]
