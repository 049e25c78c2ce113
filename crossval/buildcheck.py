"""`crossval check-build`: regression-check one or more Caffe builds.

Each build is checked in four steps, and stops at the first that makes it unusable:

1. it imports (in a child process) and registers every layer type the heads' nets use;
2. the golden vectors (``golden``): stored cases with the float64 reference's blobs, loss and
   the gradient of every blob and param, each compared within the tolerance table's bound;
3. the matrix of ``crossval report`` (heads x losses on generated cases, Caffe's gradient
   checker, training for every solver, ONNX);
4. for a head x loss whose matrix rows fail, its generated cases again, blob by blob.

A failing case is pinned to a layer: the first layer in forward order whose top is wrong
(its forward), else the first layer in backward order whose bottom diffs or param diffs are
wrong while its top diffs are right (its backward).

Several builds are also compared with each other on the golden cases: each is within the
bound of the same float64 values, so two agree within twice the bound.

Exit status: 0 every build clean, 1 a regression, 2 a build unusable (the largest wins).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

from crossval.reference.layers import LayerSpec

from . import golden, provision
from . import outputs as out_policy
from . import tolerances as tol
from .checks import Harness
from .compare import Comparison, exact
from .errors import CaffeNotAvailable, CrossvalError
from .heads import COMBINATIONS, HEADS, Case, Head
from .layercheck import golden as layer_golden
from .layercheck.run import LAYER
from .portcheck.net import NetLayer, NetParam, read_net
from .profiles import PROFILES, fixed_settings
from .report import Progress, Row
from .transfer import state_dict_key
from .worker import CaffeCrash, CaffeError, CaffeWorker, searching, stops_search

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


class Failing(Protocol):
    """A failing value as `localize` reads it (a check-build Value, a validate-port check)."""

    @property
    def kind(self) -> str: ...  # "fixed", "forward" or "backward"
    @property
    def key(self) -> str: ...  # blob name or a param's state_dict key
    @property
    def name(self) -> str: ...


def localize(
    layers: Sequence[NetLayer],
    failing: Sequence[Failing],
    *,
    param_key: Callable[[NetLayer, int], str] = lambda lay, i: f"{lay.name}/{i}",
    diff_key: Callable[[str], str] = lambda blob: blob,
) -> tuple[str, set[str]]:
    """The first layer whose output goes wrong and in which pass, with the keys (blobs or
    params) of that layer's wrong outputs. Shared with validate-port (crossval.portcheck),
    whose failing values name a param `layer/index` and a blob's diff `d/d blob`:
    `param_key` and `diff_key` give a caller's names."""
    if not failing:
        return "", set()
    bad_fixed = {v.key for v in failing if v.kind == "fixed"}
    bad_fwd = {v.key for v in failing if v.kind == "forward"}
    bad_bwd = {v.key for v in failing if v.kind == "backward"}

    def params(layer: NetLayer) -> set[str]:
        return {param_key(layer, p.index) for p in layer.params}

    for layer in layers:
        if bad_fixed & params(layer):
            return f"fixed param of layer {layer.label}", bad_fixed & params(layer)
    for layer in layers:
        if bad_fwd & set(layer.tops):
            return f"forward of layer {layer.label}", bad_fwd & set(layer.tops)
    for layer in reversed(layers):
        outputs = bad_bwd & ({diff_key(b) for b in layer.bottoms} | params(layer))
        if outputs and not bad_bwd & {diff_key(t) for t in layer.tops}:
            return f"backward of layer {layer.label}", outputs
    return "no single layer (" + ", ".join(sorted(v.name for v in failing)) + ")", set()


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
        caffe = self.harness.submit_caffe(head, case, all_diffs=True)()
        values = outputs(head, case, ref, caffe)
        comparisons = [v.compare("caffe~ref64", v.desired, case.describe()) for v in values]
        return _judge(ref.name, self.layers(head, case), values, comparisons)


def outputs(head: Head, case: Case, ref: golden.Reference, caffe: dict[str, Any]) -> list[Value]:
    """Caffe's fixed param, blobs, loss and every diff the bounds cover, against `ref`."""
    values = [
        Value(
            "fixed",
            state_dict_key(head.fixed_layer, 0),
            caffe["params"][head.fixed_layer][0],
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
                caffe["blobs"][blob],
                ref.blobs[blob],
                b.forward[blob],
                b.forward_rules[blob],
            )
        )
    loss = np.array(caffe["blobs"]["loss"]).reshape(())
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
            actual = caffe["param_diffs"][ip][learnable.index(key)]
        else:
            actual = caffe["diffs"][key]
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


# ---- one build ------------------------------------------------------------------------------


@dataclass
class BuildResult:
    label: str
    path: str
    status: str = CLEAN
    reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    golden: list[CaseCheck] = field(default_factory=list)
    generated: list[CaseCheck] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    layers: dict[str, list[NetLayer]] = field(default_factory=dict)  # by golden case
    skipped_layer_golden: list[str] = field(default_factory=list)  # types the build lacks

    def regressed_layers(self) -> Counter[str]:
        return Counter(c.culprit for c in self.golden + self.generated if c.culprit)

    def evidence(self, culprit: str) -> str:
        return next(c.evidence for c in self.golden + self.generated if c.culprit == culprit)

    def failing_checks(self) -> list[str]:
        names = [r.check for r in self.rows if r.verdict != "pass"]
        for c in self.golden:
            for comp in c.failures:
                names.append(f"golden {c.name}: {comp.check} {comp.blob}")
        return names

    def as_dict(self) -> dict[str, Any]:
        golden_max = max(
            (c.ratio for g in self.golden for c in g.comparisons if np.isfinite(c.ratio)),
            default=0.0,
        )
        return {
            "label": self.label,
            "path": self.path,
            "status": self.status,
            "reason": self.reason,
            "caffe": self.info,
            "layer_golden_not_run": self.skipped_layer_golden,
            "regressed_layers": {
                k: {"cases": n, "first": self.evidence(k)}
                for k, n in self.regressed_layers().items()
            },
            "failing_checks": self.failing_checks(),
            "golden": {
                "cases": len(self.golden),
                "comparisons": sum(len(g.comparisons) for g in self.golden),
                "failing_cases": [g.name for g in self.golden if g.failures],
                "largest_err_over_bound": golden_max,
                "first_failures": [str(g.failures[0]) for g in self.golden if g.failures][:5],
            },
            "matrix": [r.as_dict() for r in self.rows],
            "generated_localized": [
                {"case": g.name, "culprit": g.culprit} for g in self.generated if g.culprit
            ],
        }


def needed_layer_types(worker: CaffeWorker) -> set[str]:
    """Every layer type in the heads' train nets (from the prototxts the builders write)."""
    from .strategies import build_case

    types: set[str] = set()
    for head_name, loss in COMBINATIONS:
        head = HEADS[head_name]
        case = build_case(head_name, loss, batch=1, features=2, bins=3)
        proto = str(worker.call("prototxt", batch=1, **head.prototxt_args(case)))
        types.update(worker.call("layer_types", prototxt=proto))
    return types


def check_build(
    label: str,
    path: str,
    refs: list[golden.Reference],
    examples: int,
    profile: str,
    out: out_policy.Directory | None,
    say: Progress,
    layer_refs: tuple[layer_golden.LayerGolden, ...] = (),
) -> BuildResult:
    result = BuildResult(label, path)
    try:
        install = provision.locate(path)
        result.info = dict(install.describe())
    except CaffeNotAvailable as exc:
        result.status, result.reason = UNUSABLE, f"import fails: {exc}"
        return result
    types = set(result.info.pop("layer_types"))
    result.info["layer_types"] = len(types)
    say(f"{label}: imports; {len(types)} layer types registered")
    stage = "reading the heads' prototxts"
    try:
        with CaffeWorker(install) as worker:
            missing = needed_layer_types(worker) - types
            if missing:
                result.status = UNUSABLE
                result.reason = "layer types missing: " + ", ".join(sorted(missing))
                return result
            checker = BuildChecker(worker)
            for ref in refs:
                stage = f"golden case {ref.name}"
                got = checker.check(ref)
                result.golden.append(got)
                result.layers[ref.name] = checker.layers(HEADS[ref.case.head], ref.case)
            for lg in layer_refs:
                if lg.type not in types:
                    result.skipped_layer_golden.append(f"{lg.name} ({lg.type} not registered)")
                    continue
                stage = f"layer golden case {lg.name}"
                got, layer = check_layer_golden(worker, lg)
                result.golden.append(got)
                result.layers[lg.name] = [layer]
            bad = [g for g in result.golden if g.culprit]
            say(
                f"{label}: golden vectors, {len(refs)} cases: "
                + ("pass" if not bad else f"{len(bad)} FAIL ({bad[0].culprit})")
            )
            stage = "the report matrix"
            from . import report

            _, result.rows = report.run(
                worker,
                profile,
                out or Path("."),
                stream=say.stream,
                examples=examples,
                caffe_info=result.info,
                files=out is not None,
            )
            stage = "localizing the matrix's failures"
            for combo in COMBINATIONS:
                prefix = "+".join(combo) + " "
                if any(r.check.startswith(prefix) and r.verdict != "pass" for r in result.rows):
                    result.generated += _localize_generated(checker, combo, examples)
    except CaffeCrash as exc:
        result.status, result.reason = UNUSABLE, f"Caffe aborted during {stage}: {exc}"
        return result
    except CaffeError as exc:
        result.status, result.reason = UNUSABLE, f"Caffe failed during {stage}: {exc}"
        return result
    if result.failing_checks() or result.regressed_layers():
        result.status = REGRESSION
    return result


def _localize_generated(
    checker: BuildChecker, combo: tuple[str, str], examples: int
) -> list[CaseCheck]:
    from hypothesis import given

    from .strategies import cases

    found: list[CaseCheck] = []

    @fixed_settings(examples)  # type: ignore[untyped-decorator]
    @given(case=cases(combos=(combo,)))
    @stops_search()  # a Caffe crash ends the search at once, unshrunk
    def prop(case: Case) -> None:
        got = checker.check(golden.live(case))
        if got.culprit:
            found.append(got)

    with searching():
        prop()
    return found


# ---- several builds -------------------------------------------------------------------------


@dataclass
class PairResult:
    a: str
    b: str
    cases: list[CaseCheck]

    @property
    def values(self) -> int:
        return sum(len(c.values) for c in self.cases)

    @property
    def identical(self) -> int:
        pairs = [(cmp.actual, cmp.desired) for c in self.cases for cmp in c.comparisons]
        return sum(int(np.array_equal(a, b)) for a, b in pairs)

    @property
    def largest_ratio(self) -> float:
        ratios = [cmp.ratio for c in self.cases for cmp in c.comparisons if np.isfinite(cmp.ratio)]
        return max(ratios, default=0.0)

    def culprits(self) -> Counter[str]:
        return Counter(c.culprit for c in self.cases if c.culprit)

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "values": self.values,
            "bit_identical": self.identical,
            "largest_diff_over_twice_bound": self.largest_ratio,
            "differing_layers": dict(self.culprits()),
        }


def compare_builds(results: list[BuildResult]) -> list[PairResult]:
    usable = [r for r in results if r.status != UNUSABLE and r.golden]
    pairs = []
    for i, a in enumerate(usable):
        for b in usable[i + 1 :]:
            cases = [
                compare_pair(ga, gb, a.layers[ga.name], f"{ga.name}: {a.label} against {b.label}")
                for ga, gb in zip(a.golden, b.golden, strict=True)
            ]
            pairs.append(PairResult(a.label, b.label, cases))
    return pairs


def describe_build(r: BuildResult) -> list[str]:
    info = r.info
    lines = [f"{r.label}: {r.path}"]
    if info:
        blas = info.get("blas_library", "") or "?"
        lines.append(f"    caffe {info.get('caffe_version', '?')}, BLAS {blas}")
    if r.status == UNUSABLE:
        lines.append(f"    UNUSABLE: {r.reason}")
        return lines
    comps = [c for g in r.golden for c in g.comparisons]
    worst = max((c.ratio for c in comps if np.isfinite(c.ratio)), default=0.0)
    failing = [g for g in r.golden if g.failures]
    if r.skipped_layer_golden:
        lines.append(
            "    layer golden cases not run (type not in this build): "
            + ", ".join(r.skipped_layer_golden)
        )
    lines.append(
        f"    golden vectors: {len(r.golden)} cases, {len(comps)} comparisons, largest "
        f"err/bound {worst:.3g}: " + ("pass" if not failing else f"{len(failing)} cases FAIL")
    )
    bad_rows = [row for row in r.rows if row.verdict != "pass"]
    lines.append(
        f"    matrix: {len(r.rows)} rows, "
        + (
            "all pass"
            if not bad_rows
            else f"{len(bad_rows)} FAIL: " + ", ".join(row.check for row in bad_rows)
        )
    )
    for culprit, n in r.regressed_layers().most_common():
        n_golden = sum(g.culprit == culprit for g in r.golden)
        lines.append(
            f"    REGRESSED: {culprit}, in {n_golden} golden and {n - n_golden} generated cases"
        )
        lines.append(f"      first: {r.evidence(culprit)}")
    lines.append(f"    verdict: {r.status.upper()}")
    return lines


def run(
    paths: list[str],
    profile: str = "ci",
    examples: int | None = None,
    json_out: Path | None = None,
    out: Path | None = None,
    force: bool = False,
    golden_dir: Path = golden.GOLDEN_DIR,
    stream: TextIO | None = None,
    print_to: TextIO | None = None,
) -> int:
    """Check each build; print the summary; return the exit status."""
    if not paths:
        raise CrossvalError("check-build needs at least one --caffe PATH")
    from .report import FILES

    json_target = out_policy.target(json_out, "--json", force=force) if json_out else None
    out_dir = out_policy.directory(out, "--out", force=force) if out is not None else None
    for i in range(1, len(paths) + 1):  # checked now, not after the builds have run
        for name in FILES:
            if out_dir is not None:
                out_dir.sub(f"build-{i}").file(name).check()
    refs = golden.load(golden_dir)
    layer_refs = tuple(layer_golden.load(golden_dir))
    n = examples or PROFILES[profile]
    say = Progress(stream or sys.stderr, "crossval check-build")  # the streams of now
    results = []
    for i, path in enumerate(paths, 1):
        label = f"[{i}]"
        say(f"{label} {path}")
        where = out_dir.sub(f"build-{i}") if out_dir is not None else None
        results.append(check_build(label, path, refs, n, profile, where, say, layer_refs))
    pairs = compare_builds(results)
    lines = [
        f"crossval check-build: {len(paths)} build(s), {len(refs)} golden cases of the heads "
        f"and {len(layer_refs)} of single layers, {n} "
        f"generated examples per property ({profile})",
        "",
    ]
    for r in results:
        lines += describe_build(r)
    if pairs:
        lines += [
            "",
            "side by side (two builds agree within twice the bound: each is within "
            "the bound of the same float64 values):",
        ]
        for p in pairs:
            differ = p.culprits()
            what = (
                "agree"
                if not differ
                else "DIFFER at " + "; ".join(f"{k} ({n} cases)" for k, n in differ.most_common())
            )
            lines.append(
                f"    {p.a} vs {p.b}: {p.values} values, {p.identical} bit-identical, "
                f"largest diff/(2 bound) {p.largest_ratio:.3g}: {what}"
            )
    status = max((r.status for r in results), key=lambda s: EXIT[s])
    lines += ["", f"verdict: {status.upper()} (exit {EXIT[status]})"]
    print("\n".join(lines), file=print_to or sys.stdout)
    if json_target is not None:
        data = {
            "profile": profile,
            "examples_per_property": n,
            "golden_dir": str(golden_dir),
            "status": status,
            "exit": EXIT[status],
            "builds": [r.as_dict() for r in results],
            "pairs": [p.as_dict() for p in pairs],
        }
        out_policy.write_text(json_target, json.dumps(data, indent=2, default=str))
    return EXIT[status]


__all__ = ["EXIT", "BuildChecker", "BuildResult", "localize", "run"]
