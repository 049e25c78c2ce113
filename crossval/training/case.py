"""A training case (a head case, a solver, its steps and batches) and the trajectory it follows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from crossval.reference.solvers import SolverConfig

from ..heads import Case

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
