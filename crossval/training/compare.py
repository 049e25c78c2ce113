"""Trajectories compared step by step within their carried bounds, and fixed blobs that moved."""

from __future__ import annotations

import numpy as np

from ..compare import Comparison, three_way
from .case import TrainCase, Trajectory

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
