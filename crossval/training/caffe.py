"""The seed's workflow in Caffe: the train_val net and solver written, the kernel set by net
surgery, init_weights.caffemodel saved, Caffe's solver run from it, and its snapshots checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crossval.reference.solvers import SolverConfig

from .. import outputs
from ..compare import Comparison, exact
from ..heads import HEADS, label_blob
from ..worker import CaffeWorker
from .case import TrainCase, Trajectory

# ---- Caffe ------------------------------------------------------------------------------


def solver_prototxt(
    cfg: SolverConfig, net: Path, snapshot: int = 0, prefix: Path | None = None
) -> str:
    """Caffe SolverParameter text for `cfg`, training `net`."""
    lines = [
        f'net: "{net}"',
        f'type: "{cfg.type}"',
        f"base_lr: {cfg.base_lr!r}",
        f'lr_policy: "{cfg.lr_policy}"',
        f"gamma: {cfg.gamma!r}",
        f"power: {cfg.power!r}",
        f"stepsize: {cfg.stepsize}",
        *(f"stepvalue: {v}" for v in cfg.stepvalue),
        f"max_iter: {cfg.max_iter}",
        f"momentum: {cfg.momentum!r}",
        f"momentum2: {cfg.momentum2!r}",
        f"rms_decay: {cfg.rms_decay!r}",
        f"delta: {cfg.delta!r}",
        f"weight_decay: {cfg.weight_decay!r}",
        f'regularization_type: "{cfg.regularization_type}"',
        f"clip_gradients: {cfg.clip_gradients!r}",
        "display: 0",
        "solver_mode: CPU",
    ]
    if snapshot and prefix is not None:
        lines += [f"snapshot: {snapshot}", f'snapshot_prefix: "{prefix}"']
    return "\n".join(lines) + "\n"


@dataclass
class Workflow:
    """The files of the seed's workflow in `workdir`."""

    workdir: Path
    train_val: Path
    solver: Path
    init_weights: Path
    snapshot_prefix: Path

    def snapshots(self) -> list[Path]:
        return sorted(
            self.workdir.glob(self.snapshot_prefix.name + "_iter_*.caffemodel"),
            key=lambda p: int(p.stem.rsplit("_", 1)[1]),
        )


def write_workflow(
    worker: CaffeWorker, tc: TrainCase, workdir: Path, snapshot: int = 0, fixed_lr_mult: float = 0.0
) -> Workflow:
    """train_val.prototxt, solver.prototxt and init_weights.caffemodel (surgery applied)."""
    case, head = tc.case, HEADS[tc.case.head]
    workdir.mkdir(parents=True, exist_ok=True)
    args = head.prototxt_args(case, train=True)
    args.update(
        batch=case.batch, force_backward=False, ip_mults=tc.ip_mults, fixed_lr_mult=fixed_lr_mult
    )
    proto = worker.prototxt(**args)
    wf = Workflow(
        workdir,
        workdir / "train_val.prototxt",
        workdir / "solver.prototxt",
        workdir / "init_weights.caffemodel",
        workdir / "snapshot",
    )
    # The directory was checked (empty, or --force) by the caller: these replace their own.
    outputs.write_text(outputs.Target(wf.train_val, "--out", force=True), proto)
    solver = solver_prototxt(tc.solver, wf.train_val, snapshot, wf.snapshot_prefix)
    outputs.write_text(outputs.Target(wf.solver, "--out", force=True), solver)
    ip = head.ip_layer(case)
    params = {ip: [case.weights[k] for k in head.learnable(case)]}
    with outputs.staged(outputs.Target(wf.init_weights, "--out", force=True)) as tmp:
        worker.surgery(
            prototxt=proto,
            phase="TRAIN",
            layer=head.surgery,
            out=str(tmp),
            params=params,
        )
    return wf


def caffe_trajectory(worker: CaffeWorker, tc: TrainCase, wf: Workflow) -> Trajectory:
    head, case = HEADS[tc.case.head], tc.case
    label = label_blob(case)
    batches = [{"pool5": x, label: t} for x, t in tc.batches]
    got = worker.train(
        solver_prototxt=str(wf.solver),
        steps=tc.steps,
        batches=batches,
        weights=str(wf.init_weights),
    )
    ip, keys = head.ip_layer(case), head.learnable(case)
    traj = Trajectory(losses=list(got.losses))
    for params in got.params:
        traj.params.append({keys[i]: params[ip][i] for i in range(2)})
        traj.fixed.append(params[head.fixed_layer][0])
    return traj


def snapshot_checks(worker: CaffeWorker, tc: TrainCase, wf: Workflow) -> list[Comparison]:
    """Each snapshot reloaded from disk: its fixed blob is bit-identical to the prescribed."""
    head = HEADS[tc.case.head]
    want = head.fixed_value(tc.case)
    proto = wf.train_val.read_text()
    out = []
    for snap in wf.snapshots():
        got = worker.params(proto, phase="TRAIN", weights=str(snap))
        out.append(
            exact(
                "snapshot",
                f"{head.fixed_layer}/0 in {snap.name}",
                got.params[head.fixed_layer][0],
                want,
                tc.describe(),
            )
        )
    return out
