"""crossval train: the workflow written, every training check run, and the report text."""

from __future__ import annotations

from pathlib import Path

from ..heads import HEADS
from ..worker import CaffeWorker
from .case import TrainCase
from .parity import run_parity


def train_report(worker: CaffeWorker, tc: TrainCase, out: Path, snapshot: int) -> tuple[bool, str]:
    """`crossval train`: the workflow in `out`, then every training check; (ok, report)."""
    got = run_parity(worker, tc, out, snapshot)
    wf = got.workflow
    head = HEADS[tc.case.head]
    snaps = got.snapshots
    lines = [
        f"training {tc.describe()}",
        f"workflow in {out}: {wf.train_val.name}, {wf.solver.name}, "
        f"{wf.init_weights.name}, {len(wf.snapshots())} snapshots",
    ]
    ok = True
    for moved in (got.caffe_fixed, got.torch_fixed):
        if moved is not None:
            ok = False
            lines.append(moved)
    bad_snaps = [s for s in snaps if not s.passed]
    ok &= not bad_snaps
    lines.extend(str(s) for s in bad_snaps)
    if got.caffe_fixed is None and not bad_snaps:
        lines.append(
            f"fixed: {head.fixed_layer}/0 bit-identical after each of {tc.steps} steps "
            f"and in {len(snaps)} snapshots reloaded from disk"
        )
    comps = got.comparisons
    bad = [c for c in comps if not c.passed]
    n = got.comparable_steps
    if bad:
        ok = False
        lines.append(f"parity: {len(bad)} of {len(comps)} comparisons failed; first:")
        lines.append("  " + str(bad[0]))
    elif comps:
        worst = max(comps, key=lambda c: c.ratio)
        lines.append(
            f"parity: params and loss within bounds after each of {n} steps "
            f"(largest err/bound {worst.ratio:.3g}: {worst.check} {worst.blob})"
        )
    if n < tc.steps:
        lines.append(
            f"steps {n + 1}..{tc.steps}: bounds diverge (training amplifies float32 "
            "differences here); not compared"
        )
    return ok, "\n".join(lines)
