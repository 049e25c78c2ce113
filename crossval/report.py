"""`crossval report`: the whole matrix against one Caffe, as a table, JSON, Markdown and plots.

Rows: each head x loss (forward blobs, loss, gradients, transfer, fixed blob; generated
examples), Caffe's gradient checker on each head x loss, training parity and fixed values for
every solver, and ONNX (onnxruntime) against Caffe for each head. A row passes when every
comparison in it does; the command exits 0 if and only if every row passes.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from . import outputs
from .batched import BatchComparison, batched_examples, case_batches, run_batch
from .checks import Harness, caffe_gradient_check
from .compare import Comparison
from .heads import COMBINATIONS, HEADS
from .profiles import PROFILES, fixed_settings
from .strategies import MODERATE_SIGMAS, SMALL_SCALES, build_batches, build_case, cases
from .tolerances import finite_difference as fd_tol
from .worker import CaffeWorker, searching, stops_search


def relative_error(err: np.ndarray, desired: np.ndarray, bound: np.ndarray) -> float:
    """The largest |error| / max(|value|, bound) (0 for an empty or exact comparison).

    The report's error scale: the plain relative error where a value stands clear of its
    bound, and the error against the bound where the value is smaller than its own bound
    (a saturated sigmoid's gradient, a sum that cancels), where an error as large as the
    value is float32 doing its best and a plain relative error would read as an alarm."""
    if err.size == 0:
        return 0.0
    scale = np.maximum(np.abs(np.asarray(desired, dtype=np.float64)), bound)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(scale > 0, err / scale, np.where(err > 0, np.inf, 0.0))
    return float(np.nanmax(rel))


@dataclass
class Row:
    """One line of the table: a check over some examples, its worst comparison."""

    check: str
    examples: int = 0
    comparisons: int = 0
    failures: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0  # relative_error over the row's comparisons
    max_ratio: float = 0.0
    rule: str = ""
    first_failure: str = ""
    ratios: list[float] = field(default_factory=list, repr=False)

    @property
    def verdict(self) -> str:
        return "pass" if self.failures == 0 and self.examples > 0 else "FAIL"

    def add(self, c: Comparison, keep_ratio: bool = False) -> None:
        self.comparisons += 1
        ratio = c.ratio
        if math.isfinite(c.max_abs):
            self.max_abs = max(self.max_abs, c.max_abs)
        self.max_rel = max(self.max_rel, relative_error(c.err, c.desired, c.bound))
        if ratio > self.max_ratio:
            self.max_ratio = ratio
            self.rule = c.rule
        if keep_ratio and math.isfinite(ratio):
            self.ratios.append(ratio)
        if not c.passed:
            self.failures += 1
            if not self.first_failure:
                self.first_failure = str(c)

    def add_each(self, c: BatchComparison, keep_ratio: bool = False) -> None:
        """`add` for every case of a batch comparison at once."""
        self.comparisons += c.cases
        ratios, max_abs, failed = c.ratio_each, c.max_abs_each, c.failed_each
        finite = np.isfinite(max_abs)
        if finite.any():
            self.max_abs = max(self.max_abs, float(max_abs[finite].max()))
        self.max_rel = max(self.max_rel, relative_error(c.err, c.desired, c.bound))
        worst = int(np.argmax(ratios))
        if ratios[worst] > self.max_ratio:
            self.max_ratio = float(ratios[worst])
            self.rule = c.rule
        if keep_ratio:
            self.ratios += [float(r) for r in ratios[np.isfinite(ratios)]]
        if failed.any():
            self.failures += int(failed.sum())
            if not self.first_failure:
                self.first_failure = str(c.one(int(np.argmax(failed))))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("ratios")
        d["verdict"] = self.verdict
        return d


class Progress:
    def __init__(self, stream: TextIO, name: str = "crossval report") -> None:
        self.stream = stream
        self.name = name
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        self.stream.write(f"[{self.name}] {time.monotonic() - self.t0:6.1f}s {text}\n")
        self.stream.flush()


def _combo_rows(harness: Harness, combo: tuple[str, str], examples: int) -> dict[str, Row]:
    """The head x loss rows over `examples` profile examples, batched as the tests batch
    them (``batched.batched_examples``); a row's examples are the cases it verified."""
    name = "+".join(combo)
    by_kind: dict[str, Row] = {}

    @fixed_settings(batched_examples(examples))  # type: ignore[untyped-decorator]
    @given(batch=case_batches(combos=(combo,)))
    @stops_search()  # a Caffe crash ends the search at once, unshrunk
    def prop(batch: Any) -> None:
        result = run_batch(harness, batch)
        seen: set[str] = set()
        for c in result.comparisons:
            kind = c.check.split()[0]
            row = by_kind.setdefault(kind, Row(f"{name} {kind}"))
            if kind not in seen:
                row.examples += batch.size
                seen.add(kind)
            row.add_each(c, keep_ratio=c.check.endswith("torch~caffe"))

    with searching():
        prop()
    return by_kind


def head_rows(harness: Harness, examples: int, say: Progress) -> list[Row]:
    rows: list[Row] = []
    for combo in COMBINATIONS:
        by_kind = _combo_rows(harness, combo, examples)
        for kind in ("forward", "loss", "gradient", "transfer", "fixed"):
            if kind in by_kind:
                rows.append(by_kind[kind])
        cases = max(r.examples for r in by_kind.values())
        say(
            f"{'+'.join(combo)}: {cases} cases ({batched_examples(examples)} examples), "
            + ", ".join(f"{r.check.split()[-1]} {r.verdict}" for r in by_kind.values())
        )
    return rows


def _checker_row(harness: Harness, combo: tuple[str, str], examples: int) -> Row:
    row = Row("+".join(combo) + " caffe gradient checker")
    row.rule = fd_tol.RULE
    strategy = cases(
        combos=(combo,), small=SMALL_SCALES, sigmas=MODERATE_SIGMAS, near_prediction=True
    )

    @fixed_settings(examples)  # type: ignore[untyped-decorator]
    @given(case=strategy, seed=st.integers(0, 2**16))
    @stops_search()
    def prop(case: Any, seed: int) -> None:
        row.examples += 1
        for fd in caffe_gradient_check(harness, case, seed=seed):
            row.comparisons += 1
            if fd.verdict == "FAIL":
                row.failures += 1
                row.first_failure = row.first_failure or str(fd)
            elif fd.verdict == "ok":
                err = abs(fd.computed - fd.estimated)
                allowed = fd_tol.allowed(fd.computed, fd.estimated, fd.slack)
                row.max_abs = max(row.max_abs, err)
                row.max_ratio = max(row.max_ratio, err / allowed)
                scale = relative_error(
                    np.array([err]), np.array([fd.estimated]), np.array([allowed])
                )
                row.max_rel = max(row.max_rel, scale)

    with searching():
        prop()
    return row


def gradient_checker_rows(harness: Harness, examples: int, say: Progress) -> list[Row]:
    rows = [_checker_row(harness, combo, examples) for combo in COMBINATIONS]
    say(
        f"gradient checker: {examples} examples per head+loss, "
        + ", ".join(r.verdict for r in rows)
    )
    return rows


def training_rows(worker: CaffeWorker, steps: int, say: Progress) -> list[Row]:
    from crossval.reference.solvers import SOLVER_TYPES, USUAL_BASE_LR, USUAL_MOMENTUM, SolverConfig

    from .training import TrainCase, run_parity

    rows = []
    for kind in SOLVER_TYPES:
        row = Row(f"training {kind}")
        for head in HEADS:
            shape: dict[str, Any] = dict(batch=8, features=16, bins=101, spread=3.0)
            case = build_case(head, "euclidean", seed=1, **shape)
            batches = build_batches(head, "euclidean", range(100, 100 + steps), **shape)
            cfg = SolverConfig(
                type=kind,
                base_lr=USUAL_BASE_LR.get(kind, 0.01),
                lr_policy="step",
                stepsize=max(steps // 2, 1),
                gamma=0.5,
                momentum=USUAL_MOMENTUM.get(kind, 0.0),
                weight_decay=0.001,
                clip_gradients=10.0,
            )
            tc = TrainCase(case, batches, cfg, ((1.0, 1.0), (2.0, 0.0)))
            with tempfile.TemporaryDirectory() as tmp:
                got = run_parity(worker, tc, Path(tmp), snapshot=max(steps // 2, 1))
            row.examples += 1
            for c in got.comparisons + got.snapshots:
                row.add(c)
            for moved in (got.caffe_fixed, got.torch_fixed):
                if moved:
                    row.failures += 1
                    row.first_failure = row.first_failure or moved
        rows.append(row)
    say(
        f"training: {len(rows)} solvers x {len(HEADS)} heads x {steps} steps, "
        + ", ".join(f"{r.check.split()[-1]} {r.verdict}" for r in rows)
    )
    return rows


def onnx_rows(harness: Harness, examples: int, say: Progress) -> list[Row]:
    from .onnx import HeadSpec, Runtime, export, forward_comparisons

    rows = []
    for head, loss in ((head, "euclidean") for head in HEADS):
        row = Row(f"{head} onnx (onnxruntime)")
        first = build_case(head, loss, batch=8, features=64, bins=101, seed=0)
        spec = HeadSpec.from_case(first)
        model = export(spec)
        from .onnx import with_weights

        for s in range(examples):
            spread = (1.0, 25.0, 60.0, 120.0, 300.0)[s % 5]
            case = build_case(
                head, loss, batch=1 + 7 * (s % 2), features=64, bins=101, spread=spread, seed=s
            )
            runtime = Runtime(with_weights(model, spec, case.weights))
            caffe = harness.run_caffe(HEADS[head], case).reply.blobs
            runs = {"onnxruntime": runtime(case.x), "caffe": caffe}
            for c in forward_comparisons(spec, case.x, case.weights, runs, case.describe()):
                row.add(c)
            row.examples += 1
        rows.append(row)
    say(f"onnx: {examples} examples per head, " + ", ".join(r.verdict for r in rows))
    return rows


FILES = ("report.json", "report.md", *(f"{head}.png" for head in HEADS))


def plot(rows: list[Row], out: outputs.Directory) -> list[Path]:
    """One PNG per head: the distribution of Caffe-vs-PyTorch err/bound (1 = the tolerance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for head in HEADS:
        ratios = [r for row in rows if row.check.startswith(head) for r in row.ratios]
        fig, ax = plt.subplots(figsize=(7, 4))
        positive = np.array([r for r in ratios if r > 0])
        zeros = len(ratios) - len(positive)
        if len(positive):
            edges = [float(v) for v in np.logspace(-8, 1, 46)]
            ax.hist(np.clip(positive, 1e-8, 10), bins=edges, color="#4477aa")
        ax.set_xscale("log")
        ax.axvline(1.0, color="#cc3311", linestyle="--", label="tolerance (err = bound)")
        ax.set_xlabel("largest |PyTorch - Caffe| / bound, per comparison")
        ax.set_ylabel("comparisons")
        ax.set_title(f"{head}: {len(ratios)} comparisons ({zeros} exactly equal, not shown)")
        ax.legend()
        fig.tight_layout()
        with outputs.staged(out.file(f"{head}.png")) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        path = out.path / f"{head}.png"
        plt.close(fig)
        made.append(path)
    return made


def table(rows: list[Row]) -> str:
    lines = [
        "| check | examples | largest abs err | largest relative err | largest err/bound "
        "| verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.check} | {r.examples} | {r.max_abs:.3g} | {r.max_rel:.3g} | "
            f"{r.max_ratio:.3g} | {r.verdict} |"
        )
    return "\n".join(lines)


def run(
    worker: CaffeWorker,
    profile: str,
    out: Path | outputs.Directory,
    stream: TextIO | None = None,
    examples: int | None = None,
    caffe_info: dict[str, Any] | None = None,
    files: bool = True,
) -> tuple[bool, list[Row]]:
    """The whole matrix; writes report.json, report.md and one PNG per head into `out`
    (unless `files` is False)."""
    n = examples or PROFILES[profile]
    if files and not isinstance(out, outputs.Directory):
        out = outputs.directory(out, "--out", names=FILES)  # before the matrix runs
    say = Progress(stream or sys.stderr)  # the stream of now, not of import time
    harness = Harness(worker)
    say(f"profile {profile}: {n} examples per property")
    rows = head_rows(harness, n, say)
    rows += gradient_checker_rows(harness, max(n // 10, 5), say)
    rows += training_rows(worker, 6 if profile != "thorough" else 20, say)
    rows += onnx_rows(harness, max(n // 10, 5), say)
    ok = all(r.verdict == "pass" for r in rows)
    if not isinstance(out, outputs.Directory):
        return ok, rows
    pngs = plot(rows, out)
    data = {
        "profile": profile,
        "examples_per_property": n,
        "passed": ok,
        "caffe": caffe_info or {},
        "rows": [r.as_dict() for r in rows],
        "plots": [p.name for p in pngs],
    }
    outputs.write_text(out.file("report.json"), json.dumps(data, indent=2, default=str))
    failures = [f"- {r.check}: {r.first_failure}" for r in rows if r.first_failure]
    md = [
        f"# crossval report ({profile}, {n} examples per property)",
        "",
        f"Verdict: {'every check passes' if ok else 'FAILURES'}",
        "",
        table(rows),
        "",
    ]
    if failures:
        md += ["## First failure of each failing check", "", *failures, ""]
    md += [f"![{p.stem}]({p.name})" for p in pngs]
    outputs.write_text(out.file("report.md"), "\n".join(md) + "\n")
    d = out.path
    say(f"wrote {d / 'report.json'}, {d / 'report.md'}, " + ", ".join(str(p) for p in pngs))
    return ok, rows


__all__ = ["FILES", "PROFILES", "Row", "run", "table"]
