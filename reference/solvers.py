"""Caffe's solvers as PyTorch update rules (src/caffe/solvers/*.cpp), on named tensors.

One ``CaffeSolver.step(grads)`` is Caffe's ``ApplyUpdate``: learning rate from the policy,
global-norm gradient clipping, weight decay (L2 or L1, scaled by ``decay_mult``), the solver's
update (scaled by ``lr_mult``: an lr_mult-0 param never moves, whatever the decay), then
``w -= update``. The state (momentum, squared-gradient histories) lives in the solver.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
REGULARIZATIONS = ("L2", "L1")
# The momentum each solver type is run with where a check needs a usual setting (AdaGrad and
# RMSProp have no momentum term), and its usual base_lr (AdaDelta's rate multiplies its
# own normalized step: 1.0).
USUAL_MOMENTUM = {"SGD": 0.9, "Nesterov": 0.9, "AdaDelta": 0.95, "Adam": 0.9}
USUAL_BASE_LR = {"AdaDelta": 1.0}


@dataclass(frozen=True)
class SolverConfig:
    """The SolverParameter fields the update rules read (Caffe's defaults)."""

    type: str = "SGD"
    base_lr: float = 0.01
    lr_policy: str = "fixed"
    gamma: float = 0.1
    power: float = 1.0
    stepsize: int = 1
    stepvalue: tuple[int, ...] = ()
    max_iter: int = 100
    momentum: float = 0.0
    momentum2: float = 0.999
    rms_decay: float = 0.99
    delta: float = 1e-8
    weight_decay: float = 0.0
    regularization_type: str = "L2"
    clip_gradients: float = -1.0

    def as_caffe_reads_it(self) -> SolverConfig:
        """The config with every float field rounded to float32, as Caffe's SolverParameter
        (``float`` fields in caffe.proto) holds it: 1 - momentum2 for momentum2 = 0.999
        differs by 1.3e-5 relative between the two, far above float32 rounding."""
        changes: dict[str, Any] = {
            f.name: float(struct.unpack("f", struct.pack("f", getattr(self, f.name)))[0])
            for f in fields(self)
            if isinstance(getattr(self, f.name), float)
        }
        return replace(self, **changes)

    def __post_init__(self) -> None:
        if self.type not in SOLVER_TYPES:
            raise ValueError(f"solver type must be one of {SOLVER_TYPES}, got {self.type!r}")
        if self.lr_policy not in LR_POLICIES:
            raise ValueError(f"lr_policy must be one of {LR_POLICIES}, got {self.lr_policy!r}")
        if self.regularization_type not in REGULARIZATIONS:
            raise ValueError(f"regularization_type must be L1 or L2: {self.regularization_type}")


def learning_rate(cfg: SolverConfig, it: int, current_step: int = 0) -> tuple[float, int]:
    """Caffe's GetLearningRate at iteration `it`; returns (rate, new multistep position)."""
    p = cfg.lr_policy
    if p == "fixed":
        return cfg.base_lr, current_step
    if p == "step":
        return cfg.base_lr * cfg.gamma ** (it // cfg.stepsize), current_step
    if p == "exp":
        return cfg.base_lr * cfg.gamma**it, current_step
    if p == "inv":
        return cfg.base_lr * (1.0 + cfg.gamma * it) ** (-cfg.power), current_step
    if p == "multistep":
        # One position per call, as Caffe does, even if several step values have passed.
        if current_step < len(cfg.stepvalue) and it >= cfg.stepvalue[current_step]:
            current_step += 1
        return cfg.base_lr * cfg.gamma**current_step, current_step
    if p == "poly":
        return cfg.base_lr * (1.0 - it / cfg.max_iter) ** cfg.power, current_step
    return cfg.base_lr / (1.0 + math.exp(-cfg.gamma * (it - cfg.stepsize))), current_step


@dataclass
class Param:
    """A learnable param as Caffe's solver sees it: its multipliers from the prototxt."""

    tensor: Tensor
    lr_mult: float = 1.0
    decay_mult: float = 1.0


@dataclass
class CaffeSolver:
    """Caffe's ApplyUpdate on `params` (updated in place), one call per iteration."""

    cfg: SolverConfig
    params: dict[str, Param]
    iter: int = 0
    current_step: int = 0
    history: dict[str, Tensor] = field(default_factory=dict)
    history2: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cfg = self.cfg.as_caffe_reads_it()
        for name, p in self.params.items():
            self.history[name] = torch.zeros_like(p.tensor)
            self.history2[name] = torch.zeros_like(p.tensor)

    def step(self, grads: Mapping[str, Tensor]) -> float:
        """One iteration from the loss gradients; returns the learning rate used."""
        rate, self.current_step = learning_rate(self.cfg, self.iter, self.current_step)
        diffs = {name: grads[name].detach().clone() for name in self.params}
        self._clip(diffs)
        with torch.no_grad():
            for name, p in self.params.items():
                d = self._regularize(diffs[name], p)
                update = self._update(name, d, rate * p.lr_mult)
                p.tensor.sub_(update)
        self.iter += 1
        return rate

    def _clip(self, diffs: dict[str, Tensor]) -> None:
        """Global L2-norm clipping over every learnable param's diff."""
        clip = self.cfg.clip_gradients
        if clip < 0:
            return
        norm = math.sqrt(sum(float((d * d).sum()) for d in diffs.values()))
        if norm > clip:
            for d in diffs.values():
                d.mul_(clip / norm)

    def _regularize(self, d: Tensor, p: Param) -> Tensor:
        """L2: d + decay * w; L1: d + decay * sign(w); decay = weight_decay * decay_mult."""
        decay = self.cfg.weight_decay * p.decay_mult
        if not decay:
            return d
        w = p.tensor
        return d + decay * (w if self.cfg.regularization_type == "L2" else torch.sign(w))

    def _update(self, name: str, d: Tensor, lr: float) -> Tensor:
        """The solver's ComputeUpdateValue: the amount subtracted from the param."""
        c, h, h2 = self.cfg, self.history, self.history2
        if c.type == "SGD":  # V = momentum V + lr d
            h[name] = c.momentum * h[name] + lr * d
            return h[name]
        if c.type == "Nesterov":  # V' = momentum V + lr d; update (1+m) V' - m V
            old = h[name]
            h[name] = c.momentum * old + lr * d
            return (1 + c.momentum) * h[name] - c.momentum * old
        if c.type == "AdaGrad":  # H += d^2; lr d / (sqrt(H) + delta)
            h[name] = h[name] + d * d
            return lr * d / (torch.sqrt(h[name]) + c.delta)
        if c.type == "RMSProp":  # H = r H + (1-r) d^2; lr d / (sqrt(H) + delta)
            h[name] = c.rms_decay * h[name] + (1 - c.rms_decay) * d * d
            return lr * d / (torch.sqrt(h[name]) + c.delta)
        if c.type == "AdaDelta":  # Zeiler's rule with Caffe's lr on top
            h[name] = c.momentum * h[name] + (1 - c.momentum) * d * d
            step = d * torch.sqrt((h2[name] + c.delta) / (h[name] + c.delta))
            h2[name] = c.momentum * h2[name] + (1 - c.momentum) * step * step
            return lr * step
        # Adam: m, v moving averages; lr sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + delta)
        t = self.iter + 1
        h[name] = c.momentum * h[name] + (1 - c.momentum) * d
        h2[name] = c.momentum2 * h2[name] + (1 - c.momentum2) * d * d
        correction = math.sqrt(1 - c.momentum2**t) / (1 - c.momentum**t)
        return lr * correction * h[name] / (torch.sqrt(h2[name]) + c.delta)
