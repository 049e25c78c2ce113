"""Training parity for one case: the workflow, the three trajectories, the comparisons and the
fixed-blob checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from crossval.reference.solvers import CaffeSolver

from .. import transfer
from ..checks import REFERENCE, Impl
from ..compare import Comparison
from ..heads import HEADS
from ..worker import CaffeWorker
from .caffe import Workflow, caffe_trajectory, snapshot_checks, write_workflow
from .case import TrainCase, Trajectory
from .compare import comparable_steps, compare_trajectories, fixed_moved
from .pytorch import torch_trajectory


@dataclass(frozen=True)
class Parity:
    """Everything one training case's parity check found (tests and reports read the parts)."""

    workflow: Workflow
    caffe: Trajectory
    torch: Trajectory  # the port, float32
    ref64: Trajectory  # the reference, float64, with its bounds
    comparisons: list[Comparison]  # the three-way step comparisons
    comparable_steps: int  # steps whose bounds stay meaningful
    caffe_fixed: str | None  # how Caffe's fixed blob moved, or None
    torch_fixed: str | None  # how the port's fixed blob moved, or None
    snapshots: list[Comparison]  # each snapshot's fixed blob, bit for bit


def run_parity(
    worker: CaffeWorker,
    tc: TrainCase,
    workdir: Path,
    snapshot: int = 0,
    port: Impl | None = None,
    fixed_lr_mult: float = 0.0,
    solver: type[CaffeSolver] = CaffeSolver,
) -> Parity:
    """The whole check for one training case: workflow, three trajectories, comparisons,
    fixed-blob checks. A `fixed_lr_mult` other than 0 builds a deliberately wrong Caffe net (a
    negative control). `solver` trains the port by another update rule (a solver mutant)."""
    wf = write_workflow(worker, tc, workdir, snapshot, fixed_lr_mult)
    caffe = caffe_trajectory(worker, tc, wf)
    t32 = torch_trajectory(tc, torch.float32, port or REFERENCE, solver_type=solver)
    t64 = torch_trajectory(tc, torch.float64, REFERENCE, bounds=True)
    head = HEADS[tc.case.head]
    want = head.fixed_value(tc.case)
    fixed_key = transfer.state_dict_key(head.fixed_layer, 0)
    return Parity(
        workflow=wf,
        caffe=caffe,
        torch=t32,
        ref64=t64,
        comparisons=compare_trajectories(tc, caffe, t32, t64),
        comparable_steps=comparable_steps(t64),
        caffe_fixed=fixed_moved(caffe, want, f"Caffe {head.fixed_layer}/0"),
        torch_fixed=fixed_moved(t32, want, f"port {fixed_key}"),
        snapshots=snapshot_checks(worker, tc, wf) if snapshot else [],
    )
