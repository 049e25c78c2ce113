"""The Caffe worker's replies, one frozen dataclass per operation.

The worker (``crossval.caffe_side.server``) builds these and pickles them over its pipe; the
client's typed operations (``crossval.worker.CaffeOps``) return them as they are. This
module needs numpy only (no torch, no pycaffe), so both processes import it.

Arrays are float32 as Caffe holds them; ``Shape`` is a blob's shape in Caffe's axis order.
A caller that needs more beside a reply keeps it beside it: a reply is never extended.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Generic, TypeAlias, TypeVar

import numpy as np

Shape = tuple[int, ...]
Params = dict[str, list[np.ndarray]]  # every param blob of the layers that have some
# One field's value in a protobuf message as `layer_specs` reads it: numbers, strings, enum
# names, nested messages, and lists of those.
FieldValue: TypeAlias = bool | int | float | str | list["FieldValue"] | dict[str, "FieldValue"]
Message = dict[str, FieldValue]


@dataclass(frozen=True)
class Ping:
    """The worker is alive: where its pycaffe comes from and its process id."""

    caffe: str
    pid: int


@dataclass(frozen=True)
class ParamDescription:
    """One param blob of a layer: its shape and the multipliers Caffe applies to it (lr_mult
    as Caffe uses it: 1 when unset, 0 for BatchNorm's statistics)."""

    shape: Shape
    lr_mult: float
    decay_mult: float


@dataclass(frozen=True)
class LayerDescription:
    """One layer of a built net."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    params: list[ParamDescription]


@dataclass(frozen=True)
class NetDescription:
    """`describe`: a built net's layers in order, every blob's shape in Caffe's (topological)
    order, the tops of its Input layers, and the prototxt's force_backward."""

    layers: list[LayerDescription]
    blobs: dict[str, Shape]
    inputs: dict[str, Shape]
    force_backward: bool


@dataclass(frozen=True)
class ParamMults:
    """A layer's ``param { lr_mult decay_mult }`` as the prototxt gives it."""

    lr_mult: float
    decay_mult: float


@dataclass(frozen=True)
class CaffeLayerSpec:
    """`layer_specs`: one layer as Caffe parses it (upgraded, phase-filtered), with its
    parameter messages filled in at Caffe's defaults. `set_fields` lists, per message, the
    fields the prototxt sets (proto2 presence, which the defaults hide)."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    loss_weight: list[float]
    param: list[ParamMults]
    propagate_down: list[bool]
    include: list[Message]
    exclude: list[Message]
    params: dict[str, Message]
    set_fields: dict[str, list[str]]

    def to_dict(self) -> dict[str, object]:
        """As plain data (the layer goldens store it so, in JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Message) -> CaffeLayerSpec:
        """Back from `to_dict`'s form."""

        def strings(v: FieldValue) -> list[str]:
            return [str(s) for s in _items(v)]

        def messages(v: FieldValue) -> list[Message]:
            return [m for m in _items(v) if isinstance(m, dict)]

        mults = [m for m in messages(d["param"])]
        params, fields = d["params"], d["set_fields"]
        if not isinstance(params, dict) or not isinstance(fields, dict):
            raise ValueError(f"layer spec {d.get('name')!r}: params and set_fields must be maps")
        return cls(
            name=str(d["name"]),
            type=str(d["type"]),
            bottoms=strings(d["bottoms"]),
            tops=strings(d["tops"]),
            loss_weight=[float(_number(w)) for w in _items(d["loss_weight"])],
            param=[
                ParamMults(float(_number(m["lr_mult"])), float(_number(m["decay_mult"])))
                for m in mults
            ],
            propagate_down=[bool(p) for p in _items(d["propagate_down"])],
            include=messages(d["include"]),
            exclude=messages(d["exclude"]),
            params={k: v for k, v in params.items() if isinstance(v, dict)},
            set_fields={k: strings(v) for k, v in fields.items()},
        )


def _items(v: FieldValue) -> list[FieldValue]:
    if not isinstance(v, list):
        raise ValueError(f"expected a list in a layer spec, got {type(v).__name__}")
    return v


def _number(v: FieldValue) -> float:
    if isinstance(v, (bool, int, float)):
        return float(v)
    raise ValueError(f"expected a number in a layer spec, got {type(v).__name__}")


@dataclass(frozen=True)
class NetParams:
    """`params`: every param blob by layer, in Caffe's order (copies), and those layers'
    types."""

    params: Params
    types: dict[str, str]


@dataclass(frozen=True)
class RunReply:
    """`run`: every blob after the forward pass; with backward, the inputs' diffs (every
    blob's when asked) and every param's diff; the params after the run unless the request
    left them out; the top diffs the worker drew, when it drew them. What the request did
    not ask for is empty."""

    blobs: dict[str, np.ndarray]
    diffs: dict[str, np.ndarray] = field(default_factory=dict)
    params: Params = field(default_factory=dict)
    param_diffs: Params = field(default_factory=dict)
    top_diffs: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class GeneratedRun(RunReply):
    """`run_generated`: a `RunReply` (without params) on an example the worker generated,
    with the digest of every param the net ran with (``crossval.examplegen.digest``)."""

    digest: str = ""


Descriptor = tuple[int, str, tuple[int, ...]]  # (offset, dtype, shape) in a shared file
A = TypeVar("A", np.ndarray, Descriptor)
B = TypeVar("B", np.ndarray, Descriptor)


@dataclass(frozen=True)
class ManyRunsReply(Generic[A]):
    """`run_many`'s reply as it crosses the pipe: every array with a leading case axis, or
    its descriptor in the shared memory file (``crossval.caffe_side.wire.put_arrays``). `params`
    leaves out the params that were sent; `sent_back` holds (layer, i, case, value read back)
    for each sent one whose read-back differs (see ``crossval.worker.ManyRuns``)."""

    blobs: dict[str, A]
    diffs: dict[str, A]
    params: dict[str, list[A]]
    param_diffs: dict[str, list[A]]
    sent_back: list[tuple[str, int, int, np.ndarray]]


def run_many_arrays(reply: ManyRunsReply[A]) -> list[A]:
    """The reply's arrays (or descriptors) in the order the worker writes them to the shared
    file: blobs, diffs, then each layer's params and each layer's param diffs."""
    out: list[A] = list(reply.blobs.values())
    out.extend(reply.diffs.values())
    for group in (reply.params, reply.param_diffs):
        for values in group.values():
            out.extend(values)
    return out


def with_arrays(reply: ManyRunsReply[A], values: list[B]) -> ManyRunsReply[B]:
    """`reply` with its arrays (or descriptors) replaced by `values`, in `run_many_arrays`
    order: descriptors for arrays in the worker, arrays for descriptors in the client."""
    got = iter(values)
    return ManyRunsReply(
        blobs={k: next(got) for k in reply.blobs},
        diffs={k: next(got) for k in reply.diffs},
        params={k: [next(got) for _ in v] for k, v in reply.params.items()},
        param_diffs={k: [next(got) for _ in v] for k, v in reply.param_diffs.items()},
        sent_back=reply.sent_back,
    )


@dataclass(frozen=True)
class GradientCheckResult:
    """One element of a gradient check: the backward pass's value, the central difference
    (NaN when skipped) and the verdict ("ok", "FAIL", or "kink" when skipped)."""

    kind: str  # "blob" or "param"
    name: str  # the blob, or "layer/i"
    index: int  # flat index into it
    computed: float
    estimated: float
    verdict: str


@dataclass(frozen=True)
class GradientCheckReply:
    """`gradient_check`: one result per target, in the order asked."""

    results: list[GradientCheckResult]


@dataclass(frozen=True)
class RawTime:
    """`time_raw`: seconds per forward and backward inside the worker (best of 5)."""

    forward_backward: float


@dataclass(frozen=True)
class TrainReply:
    """`train`: the params before the first step, each iteration's loss (before its update,
    as Caffe reports it) and every param after each iteration, and the solver's iteration
    count at the end."""

    initial: Params
    losses: list[float]
    params: list[Params]
    iter: int


@dataclass(frozen=True)
class SurgeryReply:
    """`surgery`: the layer's kernel as set (arange over the `bins` of `bottom`)."""

    bins: int
    kernel: np.ndarray
    bottom: str


@dataclass(frozen=True)
class CheckNetReply:
    """`check_net`: (name, type) of each layer kept, the input shapes, each (layer, bottom)
    that no earlier layer writes; with weights (and a net that can be built), the
    caffemodel's blob shapes by layer (`model`) and the net's (shape, lr_mult) by layer."""

    layers: list[tuple[str, str]]
    inputs: dict[str, list[int]]
    unwritten_bottoms: list[tuple[str, str]]
    params: dict[str, list[tuple[list[int], float]]] = field(default_factory=dict)
    model: dict[str, list[list[int]]] = field(default_factory=dict)


__all__ = [
    "CaffeLayerSpec",
    "CheckNetReply",
    "Descriptor",
    "FieldValue",
    "GeneratedRun",
    "GradientCheckReply",
    "GradientCheckResult",
    "LayerDescription",
    "ManyRunsReply",
    "Message",
    "NetDescription",
    "NetParams",
    "ParamDescription",
    "ParamMults",
    "Params",
    "Ping",
    "RawTime",
    "RunReply",
    "Shape",
    "SurgeryReply",
    "TrainReply",
    "run_many_arrays",
    "with_arrays",
]
