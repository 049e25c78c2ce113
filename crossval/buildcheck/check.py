"""One case checked on one build: the values compared (Value, CaseCheck), and a failing case pinned
to its layer (localize): the first layer in forward order whose top is wrong, else the first in
backward order whose bottom or param diffs are wrong while its top diffs are right."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from crossval.reference.layers import LayerSpec

from .. import golden
from .. import tolerances as tol
from ..caffe_side.replies import RunReply
from ..checks import Harness
from ..compare import Comparison, exact
from ..heads import HEADS, Case, Head
from ..layercheck import golden as layer_golden
from ..layercheck.run import LAYER
from ..localize import localize
from ..net import NetLayer, NetParam, read_net
from ..transfer import state_dict_key
from ..worker import CaffeWorker

CLEAN, REGRESSION, UNUSABLE = "clean", "regression", "unusable"
EXIT = {CLEAN: 0, REGRESSION: 1, UNUSABLE: 2}


@dataclass
class Value:
    """One output of a case, Caffe's value against the one it should have."""

    kind: str  # "fixed", "forward" or "backward"
    key: str  # blob name, "loss", or a param's state_dict key
    actual: np.ndarray
    desired: np.ndarray
    bound: np.ndarray | None  # None: must be bit-exact
    rule: str

    @property
    def name(self) -> str:
        return f"d loss/d {self.key}" if self.kind == "backward" else self.key

    def compare(
        self, check: str, desired: np.ndarray, case: str, cross: bool = False
    ) -> Comparison:
        """Against `desired` (a float64 value; with `cross`, another float32 build's)."""
        if self.bound is None:
            return exact(f"{self.kind} {check}", self.name, self.actual, desired, case)
        bound = tol.cross(np.asarray(self.bound)) if cross else np.asarray(self.bound)
        return Comparison(
            f"{self.kind} {check}", self.name, self.actual, desired, bound, self.rule, case
        )


@dataclass
class CaseCheck:
    """One case on one build (or one pair of builds): its comparisons and the layer to blame."""

    name: str
    values: list[Value]
    comparisons: list[Comparison]
    culprit: str = ""  # "" when every comparison passes
    evidence: str = ""  # the culprit layer's first failing comparison

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]


def _judge(
    name: str,
    layers: list[NetLayer],
    values: list[Value],
    comparisons: list[Comparison],
    param_key: Callable[[NetLayer, int], str] = lambda lay, i: state_dict_key(lay.name, i),
) -> CaseCheck:
    failing = [(v, c) for v, c in zip(values, comparisons, strict=True) if not c.passed]
    culprit, keys = localize(layers, [v for v, _ in failing], param_key=param_key)
    evidence = next((str(c) for v, c in failing if v.key in keys), "")
    return CaseCheck(name, values, comparisons, culprit, evidence)


class BuildChecker:
    """Runs cases through one build with every blob's diff, and pins failures to layers."""

    def __init__(self, worker: CaffeWorker) -> None:
        self.worker = worker
        self.harness = Harness(worker)
        self._layers: dict[str, list[NetLayer]] = {}

    def layers(self, head: Head, case: Case) -> list[NetLayer]:
        proto = self.harness.prototxt(head, case)
        if proto not in self._layers:
            self._layers[proto] = read_net(self.worker, proto, "TRAIN").layers
        return self._layers[proto]

    def check(self, ref: golden.Reference) -> CaseCheck:
        case = ref.case
        head = HEADS[case.head]
        caffe = self.harness.submit_caffe(head, case, all_diffs=True)().reply
        values = outputs(head, case, ref, caffe)
        comparisons = [v.compare("caffe~ref64", v.desired, case.describe()) for v in values]
        return _judge(ref.name, self.layers(head, case), values, comparisons)


def outputs(head: Head, case: Case, ref: golden.Reference, caffe: RunReply) -> list[Value]:
    """Caffe's fixed param, blobs, loss and every diff the bounds cover, against `ref`."""
    values = [
        Value(
            "fixed",
            state_dict_key(head.fixed_layer, 0),
            caffe.params[head.fixed_layer][0],
            head.fixed_value(case),
            None,
            "bit-exact (net surgery / filler)",
        )
    ]
    b = head.bounds(case, ref.blobs, ref.grads)
    for blob in head.blobs(case):
        values.append(
            Value(
                "forward",
                blob,
                caffe.blobs[blob],
                ref.blobs[blob],
                b.forward[blob],
                b.forward_rules[blob],
            )
        )
    loss = np.array(caffe.blobs["loss"]).reshape(())
    values.append(
        Value(
            "forward",
            "loss",
            loss,
            np.array(ref.loss),
            np.array(b.loss),
            "tolerances." + b.loss_rule,
        )
    )
    learnable = head.learnable(case)
    ip = head.ip_layer(case)
    for key, bound in b.backward.items():
        if key in learnable:
            actual = caffe.param_diffs[ip][learnable.index(key)]
        else:
            actual = caffe.diffs[key]
        rule = f"tolerances.{b.loss_rule}_grad -> backward chain"
        values.append(Value("backward", key, actual, ref.grads[key], bound, rule))
    return values


def check_layer_golden(
    worker: CaffeWorker, g: layer_golden.LayerGolden
) -> tuple[CaseCheck, NetLayer]:
    """A layer golden case on the build behind `worker`; a failure is pinned to the layer
    type's forward or backward."""
    values = [
        Value(v.kind, v.key, v.actual, v.desired, v.bound, v.rule)
        for v in layer_golden.caffe_values(worker, g)
    ]
    comparisons = [v.compare("caffe~ref64", v.desired, g.name) for v in values]
    layer = NetLayer(
        LayerSpec(
            g.name,
            g.type,
            tuple(f"b{i}" for i in range(len(g.bottoms))),
            tuple(f"t{i}" for i in range(len(g.tops))),
        ),
        tuple(NetParam(i, tuple(np.shape(b)), 1.0) for i, b in enumerate(g.blobs)),
    )
    # the case's values name its params as the layer under test's (LAYER/i)
    judged = _judge(g.name, [layer], values, comparisons, lambda _, i: f"{LAYER}/{i}")
    return judged, layer


def compare_pair(a: CaseCheck, b: CaseCheck, layers: list[NetLayer], case: str) -> CaseCheck:
    """Build A's outputs against build B's on the same case, within twice the bound."""
    pairs = zip(a.values, b.values, strict=True)
    comparisons = [va.compare("A~B", vb.actual, case, cross=True) for va, vb in pairs]
    return _judge(a.name, layers, a.values, comparisons)
