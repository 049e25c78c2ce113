"""One build checked: it imports and registers the layer types the nets use, the golden vectors,
the report's matrix, and a failing head x loss again blob by blob."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import golden, provision
from .. import outputs as out_policy
from ..errors import CaffeNotAvailable
from ..heads import COMBINATIONS, HEADS, Case
from ..layercheck import golden as layer_golden
from ..net import NetLayer
from ..profiles import fixed_settings
from ..report import Progress, Row
from ..worker import CaffeCrash, CaffeError, CaffeWorker, searching, stops_search
from .check import CLEAN, REGRESSION, UNUSABLE, BuildChecker, CaseCheck, check_layer_golden

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
    from ..strategies import build_case

    types: set[str] = set()
    for head_name, loss in COMBINATIONS:
        head = HEADS[head_name]
        case = build_case(head_name, loss, batch=1, features=2, bins=3)
        proto = worker.prototxt(batch=1, **head.prototxt_args(case))
        types.update(worker.layer_types(proto))
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
            from .. import report

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

    from ..strategies import cases

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
