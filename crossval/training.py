"""The seed's training workflow in Caffe, and training parity with PyTorch.

Workflow (as the answer describes it): write the train_val net and a solver, set the
`pred_age` kernel by net surgery (the sigmoid head's 99 comes from its Scale filler), save
``init_weights.caffemodel``, and run Caffe's solver from it, snapshotting as it goes.

Parity: the same steps in PyTorch with ``crossval.reference.solvers.CaffeSolver`` in float32, and in
float64 as the reference trajectory. After every step the learnable params and the loss are
compared three ways (Caffe~ref64, torch~ref64, torch~caffe) within bounds carried along the
trajectory (``tolerances.solver_update``: they grow with the step count). The fixed blobs
(99, arange(K)) must stay bit-identical after every step, in the live net and in every
snapshot reloaded from disk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from crossval.reference.solvers import CaffeSolver, Param, SolverConfig

from . import outputs, transfer
from .checks import REFERENCE, Impl
from .compare import Comparison, exact, three_way
from .heads import HEADS, LOSSES, Case, Head, label_blob
from .tolerances import solver as tol_solver
from .worker import CaffeWorker

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]
Mults = tuple[tuple[float, float], tuple[float, float]]


@dataclass(frozen=True)
class TrainCase:
    """Initial weights and loss (from `case`), one input batch per step, and the solver."""

    case: Case
    batches: tuple[tuple[F32, F32], ...]
    solver: SolverConfig
    ip_mults: Mults = ((1.0, 1.0), (1.0, 1.0))  # (lr_mult, decay_mult) of weight, bias

    @property
    def steps(self) -> int:
        return len(self.batches)

    def describe(self) -> str:
        s = self.solver
        extra = [f"{s.type}", f"lr={s.base_lr:g}/{s.lr_policy}", f"steps={self.steps}"]
        if s.momentum:
            extra.append(f"momentum={s.momentum:g}")
        if s.weight_decay:
            extra.append(f"decay={s.weight_decay:g}{s.regularization_type}")
        if s.clip_gradients >= 0:
            extra.append(f"clip={s.clip_gradients:g}")
        if self.ip_mults != ((1.0, 1.0), (1.0, 1.0)):
            extra.append(f"mults={self.ip_mults}")
        return self.case.describe() + " " + " ".join(extra)


@dataclass
class Trajectory:
    """Loss at each step (before its update) and learnable params after each step."""

    losses: list[float] = field(default_factory=list)
    params: list[dict[str, np.ndarray]] = field(default_factory=list)
    fixed: list[np.ndarray] = field(default_factory=list)  # the fixed blob after each step
    bounds: list[dict[str, F64]] = field(default_factory=list)  # ref64 only
    loss_bounds: list[float] = field(default_factory=list)  # ref64 only


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
    proto = str(worker.call("prototxt", **args))
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
        worker.call(
            "surgery",
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
    got = worker.call(
        "train",
        solver_prototxt=str(wf.solver),
        steps=tc.steps,
        batches=batches,
        weights=str(wf.init_weights),
    )
    ip, keys = head.ip_layer(case), head.learnable(case)
    traj = Trajectory(losses=list(got["losses"]))
    for params in got["params"]:
        traj.params.append({keys[i]: params[ip][i] for i in range(2)})
        traj.fixed.append(params[head.fixed_layer][0])
    return traj


# ---- PyTorch ----------------------------------------------------------------------------


def _loss(
    head: Head, impl: Impl, case: Case, module: nn.Module, x: F32, target: F32, dtype: torch.dtype
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    blobs = module(torch.from_numpy(x).to(dtype))
    for b in blobs.values():
        if b.requires_grad:
            b.retain_grad()  # the bounds' backward chain reads the blobs' gradients
    consumed = blobs[head.consumed(case)]
    return impl.loss_fn(case)(consumed, torch.from_numpy(target).to(dtype), case), blobs


def torch_trajectory(
    tc: TrainCase,
    dtype: torch.dtype,
    impl: Impl = REFERENCE,
    bounds: bool = False,
    solver_type: type[CaffeSolver] = CaffeSolver,
) -> Trajectory:
    """Train `impl` with `solver_type` (Caffe's rules, or a port's); with `bounds`, carry the
    float32 error bounds along (meaningful for the float64 reference trajectory)."""
    case, head = tc.case, HEADS[tc.case.head]
    module = impl.build(head, case, dtype)
    keys = head.learnable(case)
    named = dict(module.named_parameters())
    mults = dict(zip(keys, tc.ip_mults, strict=True))
    # Every parameter the port exposes is trained, as a port's optimizer would; a constant
    # that is a buffer is invisible to it.
    params = {name: Param(t, *mults.get(name, (1.0, 1.0))) for name, t in named.items()}
    solver = solver_type(tc.solver, params)
    fixed_key = transfer.state_dict_key(head.fixed_layer, 0)
    traj = Trajectory()
    e_w = {k: np.zeros(case.weights[k].shape) for k in keys}
    e_h = {k: np.zeros(case.weights[k].shape) for k in keys}
    e_h2 = {k: np.zeros(case.weights[k].shape) for k in keys}
    for t, (x, target) in enumerate(tc.batches):
        for p in named.values():
            p.grad = None
        step_case = dataclasses.replace(case, x=x, target=target)
        loss, blobs = _loss(head, impl, step_case, module, x, target, dtype)
        loss.backward()  # type: ignore[no-untyped-call]
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in named.items()}
        if bounds:
            # At the params this step's gradient was taken at, before the update.
            hist = {k: solver.history[k].detach().numpy().copy() for k in keys}
            hist2 = {k: solver.history2[k].detach().numpy().copy() for k in keys}
            w_before = {k: named[k].detach().numpy().copy() for k in keys}
            e_loss, e_g = _step_gradient_bounds(head, step_case, module, blobs, grads, e_w)
        rate = solver.step(grads)
        traj.losses.append(float(loss.detach()))
        traj.params.append({k: named[k].detach().numpy().copy() for k in keys})
        traj.fixed.append(module.state_dict()[fixed_key].detach().numpy().copy())
        if bounds:
            traj.loss_bounds.append(e_loss)
            e_w, e_h, e_h2 = tol_solver.carry(
                tc.solver,
                tc.ip_mults,
                keys,
                w_before,
                {k: grads[k].detach().numpy().astype(np.float64) for k in keys},
                e_g,
                e_w,
                e_h,
                e_h2,
                hist,
                hist2,
                rate,
                t,
                traj.params[-1],
            )
            traj.bounds.append(dict(e_w))
    return traj


def _step_gradient_bounds(
    head: Head,
    case: Case,
    module: nn.Module,
    blobs: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    e_w: dict[str, F64],
) -> tuple[float, dict[str, F64]]:
    """Loss and gradient bounds at this step's reference params, including the feedback of
    the params' own accumulated error (`tolerances.solver.step_feedback`)."""
    keys = head.learnable(case)
    named = dict(module.named_parameters())
    b = head.bounds(
        case,
        {k: v.detach().numpy() for k, v in blobs.items()},
        {k: v.grad.numpy() for k, v in blobs.items() if v.grad is not None},
        {k: named[k].detach().numpy() for k in keys},
    )
    hv = None
    if any(e.any() for e in e_w.values()):
        hv = _hessian_vector(head, case, module, {k: e_w[k] for k in keys})
    g = {k: grads[k].numpy() for k in keys}
    return tol_solver.step_feedback(b.loss, b.backward, g, e_w, hv, keys)


def _hessian_vector(head: Head, case: Case, module: nn.Module, v: dict[str, F64]) -> dict[str, F64]:
    keys = head.learnable(case)
    named = dict(module.named_parameters())
    row = LOSSES[case.loss]
    consumed = head.consumed(case)
    x = torch.from_numpy(case.x).double()
    target = torch.from_numpy(case.target).double()

    def f(*ws: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(module, dict(zip(keys, ws, strict=True)), (x,))
        return row.reference(out[consumed], target, case)

    primals = tuple(named[k].detach() for k in keys)
    tangents = tuple(torch.from_numpy(v[k]) for k in keys)
    _, hv = torch.autograd.functional.hvp(f, primals, tangents)  # type: ignore[no-untyped-call]
    return {k: hv[i].numpy() for i, k in enumerate(keys)}


# ---- comparing --------------------------------------------------------------------------


def comparable_steps(t64: Trajectory) -> int:
    """How many steps have finite bounds everywhere. The first-order bound carries the
    Hessian times the params' error into the next gradient; where training amplifies
    differences (large curvature with a normalizing solver, for example RMSProp on the x99
    head), it can grow without limit, and beyond that step Caffe and a port may legitimately
    part: those steps are reported as not comparable, never as passing."""
    for t, bounds in enumerate(t64.bounds):
        if not all(np.isfinite(b).all() for b in bounds.values()):
            return t
        if not np.isfinite(t64.loss_bounds[t]):
            return t
    return len(t64.bounds)


def compare_trajectories(
    tc: TrainCase, caffe: Trajectory, t32: Trajectory, t64: Trajectory
) -> list[Comparison]:
    """Params and loss after each comparable step (see `comparable_steps`), three ways."""
    out: list[Comparison] = []
    desc = tc.describe()
    for t in range(comparable_steps(t64)):
        rule = f"tolerances.solver_step after {t + 1} steps"
        for key, bound in t64.bounds[t].items():
            out += three_way(
                "train",
                f"{key} after step {t + 1}",
                caffe.params[t][key],
                t32.params[t][key],
                t64.params[t][key],
                bound,
                rule,
                desc,
            )
        out += three_way(
            "train",
            f"loss at step {t + 1}",
            caffe.losses[t],
            t32.losses[t],
            t64.losses[t],
            t64.loss_bounds[t],
            rule,
            desc,
        )
    return out


def fixed_moved(traj: Trajectory, initial: np.ndarray, name: str) -> str | None:
    """ "fixed parameter moved: ..." naming the param, the first step and the largest change,
    or None when it stayed bit-identical."""
    for t, value in enumerate(traj.fixed):
        if value.tobytes() != np.asarray(initial, dtype=value.dtype).tobytes():
            change = np.abs(value.astype(np.float64) - initial.astype(np.float64))
            i = np.unravel_index(int(np.argmax(change)), change.shape)
            return (
                f"fixed parameter moved: {name} at step {t + 1}, largest change "
                f"{float(change[i]):.6g} at index {tuple(int(j) for j in i)}"
            )
    return None


def snapshot_checks(worker: CaffeWorker, tc: TrainCase, wf: Workflow) -> list[Comparison]:
    """Each snapshot reloaded from disk: its fixed blob is bit-identical to the prescribed."""
    head = HEADS[tc.case.head]
    want = head.fixed_value(tc.case)
    proto = wf.train_val.read_text()
    out = []
    for snap in wf.snapshots():
        got = worker.call("params", prototxt=proto, phase="TRAIN", weights=str(snap))
        out.append(
            exact(
                "snapshot",
                f"{head.fixed_layer}/0 in {snap.name}",
                got["params"][head.fixed_layer][0],
                want,
                tc.describe(),
            )
        )
    return out


def run_parity(
    worker: CaffeWorker,
    tc: TrainCase,
    workdir: Path,
    snapshot: int = 0,
    port: Impl | None = None,
    fixed_lr_mult: float = 0.0,
) -> dict[str, Any]:
    """The whole check for one training case: workflow, three trajectories, comparisons,
    fixed-blob checks. Returns the pieces for tests and reports. A `fixed_lr_mult` other than
    0 builds a deliberately wrong Caffe net (a negative control)."""
    wf = write_workflow(worker, tc, workdir, snapshot, fixed_lr_mult)
    caffe = caffe_trajectory(worker, tc, wf)
    t32 = torch_trajectory(tc, torch.float32, port or REFERENCE)
    t64 = torch_trajectory(tc, torch.float64, REFERENCE, bounds=True)
    head = HEADS[tc.case.head]
    want = head.fixed_value(tc.case)
    fixed_key = transfer.state_dict_key(head.fixed_layer, 0)
    return {
        "workflow": wf,
        "caffe": caffe,
        "torch": t32,
        "ref64": t64,
        "comparisons": compare_trajectories(tc, caffe, t32, t64),
        "comparable_steps": comparable_steps(t64),
        "caffe_fixed": fixed_moved(caffe, want, f"Caffe {head.fixed_layer}/0"),
        "torch_fixed": fixed_moved(t32, want, f"port {fixed_key}"),
        "snapshots": snapshot_checks(worker, tc, wf) if snapshot else [],
    }


def torch_optim_trajectory(
    tc: TrainCase,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> Trajectory:
    """The reference head trained in float32 by a stock torch.optim optimizer (how a port
    usually trains), one scheduler step per iteration."""
    case, head = tc.case, HEADS[tc.case.head]
    module = REFERENCE.build(head, case, torch.float32)
    keys = head.learnable(case)
    named = dict(module.named_parameters())
    opt = optimizer(list(named.values()))
    sched = scheduler(opt) if scheduler is not None else None
    fixed_key = transfer.state_dict_key(head.fixed_layer, 0)
    traj = Trajectory()
    for x, target in tc.batches:
        opt.zero_grad()
        step_case = dataclasses.replace(case, x=x, target=target)
        loss, _ = _loss(head, REFERENCE, step_case, module, x, target, torch.float32)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if sched is not None:
            sched.step()
        traj.losses.append(float(loss.detach()))
        traj.params.append({k: named[k].detach().numpy().copy() for k in keys})
        traj.fixed.append(module.state_dict()[fixed_key].numpy().copy())
    return traj


__all__ = ["TrainCase", "Trajectory", "Workflow", "run_parity", "torch_optim_trajectory"]


def train_report(worker: CaffeWorker, tc: TrainCase, out: Path, snapshot: int) -> tuple[bool, str]:
    """`crossval train`: the workflow in `out`, then every training check; (ok, report)."""
    got = run_parity(worker, tc, out, snapshot)
    wf: Workflow = got["workflow"]
    head = HEADS[tc.case.head]
    snaps = got["snapshots"]
    lines = [
        f"training {tc.describe()}",
        f"workflow in {out}: {wf.train_val.name}, {wf.solver.name}, "
        f"{wf.init_weights.name}, {len(wf.snapshots())} snapshots",
    ]
    ok = True
    for who in ("caffe_fixed", "torch_fixed"):
        if got[who] is not None:
            ok = False
            lines.append(got[who])
    bad_snaps = [s for s in snaps if not s.passed]
    ok &= not bad_snaps
    lines.extend(str(s) for s in bad_snaps)
    if got["caffe_fixed"] is None and not bad_snaps:
        lines.append(
            f"fixed: {head.fixed_layer}/0 bit-identical after each of {tc.steps} steps "
            f"and in {len(snaps)} snapshots reloaded from disk"
        )
    comps = got["comparisons"]
    bad = [c for c in comps if not c.passed]
    n = got["comparable_steps"]
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
