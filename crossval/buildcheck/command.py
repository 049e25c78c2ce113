"""crossval check-build: each build checked, several builds compared on the golden cases, the
report and the exit status (0 clean, 1 regression, 2 unusable; the largest wins)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .. import golden
from .. import outputs as out_policy
from ..errors import CrossvalError
from ..layercheck import golden as layer_golden
from ..profiles import PROFILES
from ..report import Progress
from .build import BuildResult, check_build
from .check import EXIT, UNUSABLE, CaseCheck, compare_pair

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
    from ..report import FILES

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
