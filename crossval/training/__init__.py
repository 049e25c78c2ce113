"""The seed's training workflow in Caffe, and training parity with PyTorch (crossval train).

Workflow (as the answer describes it): write the train_val net and a solver, set the
`pred_age` kernel by net surgery (the sigmoid head's 99 comes from its Scale filler), save
``init_weights.caffemodel``, and run Caffe's solver from it, snapshotting as it goes.

Parity: the same steps in PyTorch with ``crossval.reference.solvers.CaffeSolver`` in float32, and in
float64 as the reference trajectory. After every step the learnable params and the loss are
compared three ways (Caffe~ref64, torch~ref64, torch~caffe) within bounds carried along the
trajectory (``tolerances.solver_update``: they grow with the step count). The fixed blobs
(99, arange(K)) must stay bit-identical after every step, in the live net and in every
snapshot reloaded from disk.

Modules: ``case`` (TrainCase, Trajectory), ``caffe`` (the workflow and Caffe's trajectory),
``pytorch`` (the float32 port and float64 reference trajectories), ``compare`` (step-by-step
comparisons), ``parity`` (one case's whole check, a ``Parity``), ``command`` (crossval train).
"""

from __future__ import annotations

from .caffe import Workflow, caffe_trajectory, snapshot_checks, solver_prototxt, write_workflow
from .case import TrainCase, Trajectory
from .command import train_report
from .compare import comparable_steps, compare_trajectories, fixed_moved
from .parity import Parity, run_parity
from .pytorch import torch_optim_trajectory, torch_trajectory

__all__ = [
    "Parity",
    "TrainCase",
    "Trajectory",
    "Workflow",
    "caffe_trajectory",
    "comparable_steps",
    "compare_trajectories",
    "fixed_moved",
    "run_parity",
    "snapshot_checks",
    "solver_prototxt",
    "torch_optim_trajectory",
    "torch_trajectory",
    "train_report",
    "write_workflow",
]
