"""The same steps in PyTorch: crossval.reference.solvers.CaffeSolver in float32 (the port) and
float64 (the reference, with the bounds carried along), and a stock torch.optim optimizer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from crossval.reference.solvers import CaffeSolver, Param

from .. import transfer
from ..checks import REFERENCE, Impl
from ..heads import HEADS, LOSSES, Case, Head
from ..tolerances import solver as tol_solver
from .case import TrainCase, Trajectory

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]


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
