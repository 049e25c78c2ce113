"""Hypothesis strategies for training cases: a solver Caffe accepts, and a head case with one
batch per step, a solver and the InnerProduct's lr/decay multipliers."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from crossval.reference.losses import NORMALIZATIONS
from crossval.reference.solvers import LR_POLICIES, REGULARIZATIONS, SOLVER_TYPES, SolverConfig

from ..heads import COMBINATIONS, LOSSES, Case
from ..strategies import build_batches, build_case
from .case import TrainCase


@st.composite
def solver_configs(draw: st.DrawFn, steps: int, types: tuple[str, ...] = SOLVER_TYPES) -> Any:
    """A Caffe SolverParameter Caffe accepts: momentum only where the solver allows it, every
    lr policy with parameters that change the rate within `steps` iterations."""
    kind = draw(st.sampled_from(types), label="solver")
    policy = draw(st.sampled_from(LR_POLICIES), label="lr_policy")
    base_lr = draw(st.floats(1e-4, 2.0 if kind == "AdaDelta" else 0.05), label="base_lr")
    momentum = 0.0
    if kind in ("SGD", "Nesterov"):
        momentum = draw(st.sampled_from([0.0, 0.5, 0.9, 0.99]), label="momentum")
    elif kind in ("AdaDelta", "Adam"):
        momentum = draw(st.sampled_from([0.9, 0.95]), label="momentum")
    first = draw(st.integers(1, max(1, steps - 1)), label="stepsize")
    stepvalue = tuple(
        sorted(
            draw(st.sets(st.integers(1, max(1, steps)), min_size=1, max_size=3), label="stepvalue")
        )
    )
    return SolverConfig(
        type=kind,
        base_lr=base_lr,
        lr_policy=policy,
        gamma=draw(st.sampled_from([0.1, 0.5, 0.9]), label="gamma"),
        power=draw(st.sampled_from([0.5, 0.75, 1.0, 2.0]), label="power"),
        stepsize=first,
        stepvalue=stepvalue,
        max_iter=steps + draw(st.integers(0, 10), label="max_iter extra"),
        momentum=momentum,
        momentum2=0.999,
        rms_decay=draw(st.sampled_from([0.9, 0.98]), label="rms_decay"),
        delta=draw(st.sampled_from([1e-8, 1e-6]), label="delta"),
        weight_decay=draw(st.sampled_from([0.0, 1e-4, 0.01, 0.1]), label="weight_decay"),
        regularization_type=draw(st.sampled_from(REGULARIZATIONS), label="regularization"),
        clip_gradients=draw(st.sampled_from([-1.0, 0.5, 10.0]), label="clip_gradients"),
    )


@st.composite
def train_cases(
    draw: st.DrawFn,
    combos: tuple[tuple[str, str], ...] = COMBINATIONS,
    max_steps: int = 12,
    types: tuple[str, ...] = SOLVER_TYPES,
) -> Any:
    """Initial weights, one batch per step, a solver, and IP lr/decay multipliers."""
    head, loss = draw(st.sampled_from(combos), label="head+loss")
    steps = draw(st.integers(1, max_steps), label="steps")
    n = draw(st.sampled_from([1, 2, 8]), label="batch")
    d = draw(st.sampled_from([1, 8, 64]), label="features")
    k = draw(st.sampled_from([2, 10, 100, 101]), label="bins")
    spread = draw(st.sampled_from([0.5, 3.0, 25.0]), label="spread")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    row = LOSSES[loss]
    sigma = draw(st.sampled_from([1.0, 0.5, 3.0]), label="sigma") if row.has_sigma else Case.sigma
    normalization = (
        draw(st.sampled_from([None, *NORMALIZATIONS]), label="normalization")
        if row.labels
        else None
    )

    shape: dict[str, Any] = dict(
        batch=n, features=d, bins=k, spread=spread, sigma=sigma, normalization=normalization
    )
    first = build_case(head, loss, seed=seed, **shape)
    seeds = ((seed + 7919 * (s + 1)) % 2**32 for s in range(steps))
    batches = build_batches(head, loss, seeds, **shape)
    mults = draw(
        st.sampled_from(
            [((1.0, 1.0), (1.0, 1.0)), ((1.0, 1.0), (2.0, 0.0)), ((0.5, 2.0), (1.0, 1.0))]
        ),
        label="lr/decay mults",
    )
    cfg = draw(solver_configs(steps, types), label="solver config")
    return TrainCase(first, batches, cfg, mults)
