"""Training mutants that are an alternative update rule: a port trained by a wrong solver
(a CaffeSolver subclass), caught by the training trajectory comparisons."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from crossval.reference.solvers import SOLVER_TYPES, CaffeSolver, Param

# -- training: alternative update rules ----------------------------------------------------


class _TorchSGDMomentum(CaffeSolver):
    """torch.optim.SGD: V = m V + d, w -= lr V (Caffe: V = m V + lr d, w -= V)."""

    def _update(self, name: str, d: Tensor, lr: float) -> Tensor:
        if self.cfg.type != "SGD":
            return super()._update(name, d, lr)
        self.history[name] = self.cfg.momentum * self.history[name] + d
        return lr * self.history[name]


class _DecayMultIgnored(CaffeSolver):
    """Weight decay applied at full strength to every param (decay_mult ignored)."""

    def _regularize(self, d: Tensor, p: Param) -> Tensor:
        return super()._regularize(d, Param(p.tensor, p.lr_mult, 1.0))


class _L1AsL2(CaffeSolver):
    """regularization_type ignored: L2 decay (d + decay w) even when L1 is asked for."""

    def _regularize(self, d: Tensor, p: Param) -> Tensor:
        decay = self.cfg.weight_decay * p.decay_mult
        return d + decay * p.tensor if decay else d


class _LrMultIgnored(CaffeSolver):
    """Every param at the base rate (lr_mult ignored; Caffe's convention is bias lr 2x)."""

    def _update(self, name: str, d: Tensor, lr: float) -> Tensor:
        mult = self.params[name].lr_mult
        return super()._update(name, d, lr / mult if mult else 0.0)


class _AdamNoBiasCorrection(CaffeSolver):
    """Adam without the sqrt(1 - b2^t) / (1 - b1^t) bias correction."""

    def _update(self, name: str, d: Tensor, lr: float) -> Tensor:
        if self.cfg.type != "Adam":
            return super()._update(name, d, lr)
        c, h, h2 = self.cfg, self.history, self.history2
        h[name] = c.momentum * h[name] + (1 - c.momentum) * d
        h2[name] = c.momentum2 * h2[name] + (1 - c.momentum2) * d * d
        return lr * h[name] / (torch.sqrt(h2[name]) + c.delta)


class _ClipPerTensor(CaffeSolver):
    """clip_gradients applied to each param's own norm, not the global norm."""

    def _clip(self, diffs: dict[str, Tensor]) -> None:
        clip = self.cfg.clip_gradients
        if clip < 0:
            return
        for d in diffs.values():
            norm = math.sqrt(float((d * d).sum()))
            if norm > clip:
                d.mul_(clip / norm)


@dataclass(frozen=True)
class SolverMutant:
    """A port whose update rule is wrong: trained with `solver` instead of `CaffeSolver`."""

    name: str
    solver: type[CaffeSolver]
    types: tuple[str, ...]  # the solver types whose code path holds the mistake
    head: str
    loss: str
    mistake: str
    when: str
    shows_in: tuple[str, ...] = ("train",)


SOLVER_MUTANTS: dict[str, SolverMutant] = {
    m.name: m
    for m in (
        SolverMutant(
            "torch-sgd-momentum",
            _TorchSGDMomentum,
            ("SGD",),
            "sigmoid_scale",
            "euclidean",
            "torch.optim.SGD momentum (lr outside the history) for Caffe SGD",
            "only with momentum and an lr change: nothing at constant lr",
        ),
        SolverMutant(
            "decay-mult-ignored",
            _DecayMultIgnored,
            SOLVER_TYPES,
            "sigmoid_scale",
            "euclidean",
            "weight decay on the bias though its decay_mult is 0",
            "only with weight decay and decay_mult != 1",
        ),
        SolverMutant(
            "l1-as-l2",
            _L1AsL2,
            SOLVER_TYPES,
            "expectation",
            "euclidean",
            "regularization_type L1 trained as L2 (torch weight_decay)",
            "only with L1 weight decay",
        ),
        SolverMutant(
            "lr-mult-ignored",
            _LrMultIgnored,
            SOLVER_TYPES,
            "sigmoid_scale",
            "euclidean",
            "lr_mult dropped: every param at the base rate (Caffe nets: bias 2x)",
            "only at lr_mult != 1",
        ),
        SolverMutant(
            "adam-no-bias-correction",
            _AdamNoBiasCorrection,
            ("Adam",),
            "expectation",
            "euclidean",
            "Adam without bias correction",
            "Adam only",
        ),
        SolverMutant(
            "clip-per-tensor",
            _ClipPerTensor,
            SOLVER_TYPES,
            "sigmoid_scale",
            "euclidean",
            "clip_gradients per tensor (clip_grad_norm_ on each) instead of global",
            "only when the gradient norm exceeds clip_gradients",
        ),
    )
}
