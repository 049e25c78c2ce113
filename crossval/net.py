"""A Caffe net as the reference reads it (layers in Caffe's order, each with its LayerSpec and
param layout), and its partition into the segments a set of observed blobs allows."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from crossval.reference.layers import LayerSpec

from .caffe_side.replies import CaffeLayerSpec
from .errors import UsageError
from .examplegen import Recipe
from .worker import CaffeError, CaffeWorker


@dataclass(frozen=True)
class NetParam:
    """Param blob `index` of a layer: its shape and lr_mult (0: a constant)."""

    index: int
    shape: tuple[int, ...]
    lr_mult: float


@dataclass(frozen=True)
class NetLayer:
    """One layer of the net as Caffe instantiates it in the phase (Input layers included)."""

    spec: LayerSpec
    params: tuple[NetParam, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type(self) -> str:
        return self.spec.type

    @property
    def label(self) -> str:
        return f"{self.spec.name} ({self.spec.type})"

    @property
    def bottoms(self) -> tuple[str, ...]:
        return self.spec.bottoms

    @property
    def tops(self) -> tuple[str, ...]:
        return self.spec.tops

    def describe(self) -> str:
        """Name, type and the parameters the prototxt sets (for findings)."""
        set_ = []
        for kind, fields in self.spec.set_fields.items():
            values = self.spec.params.get(kind, {})
            shown = ", ".join(f"{f}: {_short(values.get(f))}" for f in sorted(fields))
            if shown:
                set_.append(f"{kind} {{{shown}}}")
        return self.label + (" " + " ".join(set_) if set_ else "")


def _short(v: Any) -> str:
    text = str(v)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class Net:
    """The layers (auto-inserted Split layers removed: their consumers read the split blob
    itself, whose diff Caffe sums over the copies exactly as autograd does), the blob
    shapes in Caffe's order, and the net's inputs and outputs."""

    prototxt: str
    phase: str
    layers: list[NetLayer]
    blobs: dict[str, tuple[int, ...]]
    inputs: dict[str, tuple[int, ...]]

    @property
    def compute_layers(self) -> list[NetLayer]:
        return [lay for lay in self.layers if lay.type != "Input"]

    @property
    def outputs(self) -> list[str]:
        """Blobs no layer reads (Caffe's net outputs), in Caffe's order."""
        read = {b for lay in self.compute_layers for b in lay.spec.bottoms}
        written = [t for lay in self.compute_layers for t in lay.spec.tops]
        return [b for b in self.blobs if b in written and b not in read]

    def writers(self, blob: str) -> list[NetLayer]:
        """The layer that produces `blob`, then the layers that rewrite it in place."""
        return [lay for lay in self.compute_layers if blob in lay.spec.tops]

    def in_place(self, blob: str) -> bool:
        return len(self.writers(blob)) > 1

    def layer(self, name: str) -> NetLayer:
        return next(lay for lay in self.layers if lay.name == name)

    def recipe(self) -> Recipe:
        """What ``examplegen.generate`` needs to know of the net: each input's shape (and
        its number of classes when it holds SoftmaxWithLoss labels), each layer's params,
        and whether the layer feeds a squashing layer (its weights are scaled up to
        saturate it)."""
        label_of: dict[str, int] = {}
        for lay in self.compute_layers:
            if lay.type == "SoftmaxWithLoss" and len(lay.spec.bottoms) > 1:
                label_of[lay.spec.bottoms[1]] = self.blobs[lay.spec.bottoms[0]][1]
        squashed = {
            b for lay in self.compute_layers if lay.type in SQUASHING for b in lay.spec.bottoms
        }
        return Recipe(
            inputs=[(n, tuple(s), label_of.get(n, 0)) for n, s in self.inputs.items()],
            params=[
                (
                    lay.name,
                    [(p.shape, p.lr_mult) for p in lay.params],
                    any(t in squashed for t in lay.spec.tops),
                )
                for lay in self.compute_layers
                if lay.params
            ],
        )


SQUASHING = ("Softmax", "Sigmoid", "TanH")


def append_expectation_head(prototxt: str, net: Net, bins: int) -> str:
    """The seed's expectation head on the net's (last) Softmax output: pred_age, a
    Convolution with lr_mult 0 and no bias whose kernel net surgery sets to arange(K)."""
    softmaxes = [lay for lay in net.compute_layers if lay.type == "Softmax"]
    if not softmaxes:
        raise UsageError(
            "--head expectation needs a Softmax layer in the net; it has none "
            f"(layers: {', '.join(lay.type for lay in net.compute_layers)})"
        )
    prob = softmaxes[-1].spec.tops[0]
    channels = net.blobs[prob][1] if len(net.blobs[prob]) > 1 else 1
    if channels != bins:
        raise UsageError(
            f"--bins {bins}, but the net's Softmax output {prob!r} has "
            f"{channels} bins (shape {net.blobs[prob]})"
        )
    if "pred_age" in net.blobs:
        raise UsageError("the net already has a blob named 'pred_age'")
    head = (
        "layer {\n"
        '  name: "pred_age"\n'
        '  type: "Convolution"\n'
        f'  bottom: "{prob}"\n'
        '  top: "pred_age"\n'
        "  param { lr_mult: 0 }\n"
        "  convolution_param { num_output: 1 bias_term: false }\n"
        "}\n"
    )
    return prototxt + head


# The seed's heads validate-port can append to a net (--head NAME --bins K): the expectation
# head, on a Softmax output. (The sigmoid-scale head needs a feature blob of the user's
# choosing and a trained InnerProduct: no net ends where it could be appended.)
HEAD_APPENDERS: dict[str, Callable[[str, Net, int], str]] = {
    "expectation": append_expectation_head,
}


def read_net(worker: CaffeWorker, prototxt: str, phase: str = "TEST") -> Net:
    """The net as Caffe instantiates it in `phase` (`describe`), each layer's parameter
    messages with Caffe's defaults (`layer_specs`)."""
    try:
        got = worker.describe(prototxt, phase=phase)
        specs = worker.layer_specs(prototxt)
    except CaffeError as exc:
        raise UsageError(str(exc)) from None
    by_name: dict[str, list[CaffeLayerSpec]] = {}
    for s in specs:
        by_name.setdefault(s.name, []).append(s)
    renamed: dict[str, str] = {}  # an auto-inserted split's top -> the blob it copies
    layers = []
    for lay in got.layers:
        candidates = [s for s in by_name.get(lay.name, []) if s.type == lay.type]
        bottoms = tuple(renamed.get(b, b) for b in lay.bottoms)
        if not candidates:
            if lay.type == "Split":
                for t in lay.tops:
                    renamed[t] = bottoms[0]
                continue
            raise UsageError(f"layer {lay.name!r} ({lay.type}) is not in the prototxt")
        # the built net's blob names (splits resolved), the parsed layer's messages
        spec = dataclasses.replace(
            LayerSpec.from_caffe(candidates[-1], phase), bottoms=bottoms, tops=tuple(lay.tops)
        )
        params = tuple(NetParam(i, p.shape, p.lr_mult) for i, p in enumerate(lay.params))
        layers.append(NetLayer(spec, params))
    blobs = {k: v for k, v in got.blobs.items() if k not in renamed}
    return Net(prototxt, phase, layers, blobs, dict(got.inputs))


# ---- segments -----------------------------------------------------------------------------


@dataclass
class Segment:
    """Layers the reference composes from observed blobs to observed blobs: one layer (a
    local check) or several, when blobs between them are not observed (not returned by the
    port, or overwritten in place)."""

    layers: list[NetLayer]
    inputs: list[str]  # observed blobs it reads (each at its final value)
    outputs: list[str]  # observed blobs it writes (their final value)
    hidden: list[str] = field(default_factory=list)  # unobserved values inside

    @property
    def local(self) -> bool:
        return len(self.layers) == 1

    @property
    def label(self) -> str:
        return " + ".join(lay.label for lay in self.layers)

    @property
    def name(self) -> str:
        return self.layers[0].name if self.local else "+".join(x.name for x in self.layers)


def segments(net: Net, observed: Collection[str]) -> list[Segment]:
    """Partition the net's layers into segments: two layers are in one segment when a value
    one writes and the other reads is not observed. A blob is observed at its final value
    (what Caffe and the port hold after the forward pass), so an in-place chain is one
    segment; the net's inputs are always observed."""
    layers = net.compute_layers
    parent = list(range(len(layers)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    seen = set(observed) | set(net.inputs)
    final: dict[str, int] = {}  # blob -> index of its last writer
    for i, lay in enumerate(layers):
        for t in lay.spec.tops:
            final[t] = i
    current: dict[str, tuple[int, bool]] = {}  # blob -> (writer index, observed)
    hidden: dict[int, set[str]] = {}
    for i, lay in enumerate(layers):
        for b in lay.spec.bottoms:
            if b in current:
                w, ok = current[b]
                if not ok:
                    parent[find(i)] = find(w)
        for t in lay.spec.tops:
            if t in lay.spec.bottoms and t in current:  # in place: joins the previous writer
                w, ok = current[t]
                if not ok:
                    parent[find(i)] = find(w)
            ok = final[t] == i and t in seen
            current[t] = (i, ok)
            if not ok:
                hidden.setdefault(i, set()).add(t)
    groups: dict[int, list[int]] = {}
    for i in range(len(layers)):
        groups.setdefault(find(i), []).append(i)
    out = []
    for idx in sorted(groups.values(), key=lambda g: g[0]):
        members = [layers[i] for i in idx]
        written = [t for lay in members for t in lay.spec.tops]
        inputs: list[str] = []
        for lay in members:
            for b in lay.spec.bottoms:
                produced_before = any(
                    b in layers[j].spec.tops for j in idx if j < layers.index(lay)
                )
                if not produced_before and b not in inputs:
                    inputs.append(b)
        outputs = []
        for t in written:
            if t in seen and final[t] in idx and t not in outputs:
                outputs.append(t)
        hid = sorted({t for i in idx for t in hidden.get(i, set())})
        out.append(Segment(members, inputs, outputs, hid))
    return out
