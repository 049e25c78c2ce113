"""Hypothesis strategies for cases, hard regions included.

A case is drawn as a handful of numbers (head, loss, shape, a magnitude, label mode, loss
parameters, a seed) and its arrays are built from them with numpy: drawing arrays element by
element costs milliseconds per example, this costs microseconds. Every draw is labelled.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

from crossval.reference.losses import NORMALIZATIONS

from .heads import COMBINATIONS, F32, HEADS, LOSSES, Case

# The hard values each dimension must reach, mixed with the whole range.
BATCHES = st.one_of(st.sampled_from([1, 2, 8, 64]), st.integers(1, 64))
FEATURES = st.one_of(st.sampled_from([1, 64, 512]), st.integers(1, 512))
BINS = st.one_of(st.sampled_from([2, 100, 101, 128]), st.integers(2, 128))
# Largest |pre-activation| (sigmoid head) or logit spread (expectation head): beyond 20 the
# sigmoid saturates in float32; beyond 88 exp underflows; 100+ is the "large spread" region.
SPREADS = st.one_of(st.sampled_from([1e-3, 1.0, 25.0, 60.0, 120.0, 300.0]), st.floats(1e-3, 300.0))
SIGMAS = st.one_of(st.just(1.0), st.sampled_from([0.25, 0.5, 2.0, 3.0]), st.floats(0.1, 10.0))


# For finite differences in float32 with Caffe's step (1e-2): features and weights small
# enough that the age (scaled by 99, or by up to K-1) is smooth on the step's scale; the
# central difference's truncation error then stays far below Caffe's threshold.
SMALL_SCALES = st.floats(0.02, 0.2)
MODERATE_SIGMAS = st.sampled_from([0.5, 1.0, 2.0])


def build_case(
    head: str,
    loss: str,
    batch: int,
    features: int,
    bins: int = 100,
    spread: float = 1.0,
    seed: int = 0,
    sigma: float = 1.0,
    small: float | None = None,
    targets: str = "uniform",
    normalization: str | None = None,
    ignoring: str = "none",
    near_prediction: bool = False,
) -> Case:
    """The case these numbers describe (deterministic: `@example`s call this directly).

    `spread` is the largest |pre-activation| (sigmoid head) or logit spread (expectation
    head) the weights are scaled to; `small`, if given, instead scales features and weights
    down to that size. `targets`: "uniform", "ends", "integers" (ages) or "uniform", "ends",
    "fractional" (labels). `ignoring`: "none", "some", "all", "out-of-range" (ignore_label
    255). With `near_prediction`, regression targets lie within about a year of the head's
    own prediction (the loss stays small, as a finite-difference check in float32 needs).
    """
    n, d = batch, features
    row = HEADS[head]
    k = row.ip_outputs(bins)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((k, d)) / np.sqrt(d)
    b = rng.standard_normal(k)
    if small is not None:
        x = (x * small).astype(np.float32)
        w, b = w * small, b * small
    else:
        z = x.astype(np.float64) @ w.T + b
        reach = row.reach(z)
        if reach > 0:
            w, b = w * (spread / reach), b * (spread / reach)
    ip = row.default_ip_name(k)
    weights = {f"{ip}.weight": w.astype(np.float32), f"{ip}.bias": b.astype(np.float32)}

    ignore: int | None = None
    top = row.top_of(k, Case.scale)
    if LOSSES[loss].labels:
        if targets == "ends":
            lab = rng.choice([0, k - 1], size=n).astype(np.float64)
        elif targets == "fractional":  # Caffe truncates (static_cast<int>)
            lab = rng.integers(0, k, size=n) + rng.uniform(0, 0.999, size=n)
        else:
            lab = rng.integers(0, k, size=n).astype(np.float64)
        if ignoring != "none":
            ignore = 255 if ignoring == "out-of-range" else int(rng.integers(0, k))
            mask = rng.random(n) < 0.4 if ignoring != "all" else np.ones(n, dtype=bool)
            lab = np.where(mask, ignore, lab)
        target = lab.astype(np.float32)
    else:
        normalization = None
        if targets == "ends":
            t = rng.choice([0.0, top], size=(n, 1))
        elif targets == "integers":
            t = rng.integers(0, int(top) + 1, size=(n, 1)).astype(np.float64)
        else:
            t = rng.uniform(0.0, top, size=(n, 1))
        target = t.astype(np.float32)
    region = "small" if small is not None else row.region(spread)
    case = Case(
        head=head,
        loss=loss,
        x=x,
        target=target,
        weights=weights,
        bins=row.case_bins(bins),
        sigma=sigma,
        normalization=normalization,
        ignore_label=ignore,
        region=region,
    )
    if near_prediction and not LOSSES[loss].labels:
        with torch.no_grad():
            pred = HEADS[head].reference(case, torch.float64)(torch.from_numpy(x).double())
        age = pred["pred_age"].numpy()
        near = age + rng.normal(0.0, 0.3, size=age.shape)
        case = replace(case, target=near.astype(np.float32), region=region + " near")
    return case


def build_batches(
    head: str, loss: str, seeds: Iterable[int], **kwargs: Any
) -> tuple[tuple[F32, F32], ...]:
    """The inputs and targets of `build_case(head, loss, seed=s, **kwargs)` for each seed:
    one training batch per step."""
    made = (build_case(head, loss, seed=s, **kwargs) for s in seeds)
    return tuple((c.x, c.target) for c in made)


def label_choices(draw: st.DrawFn, labels: bool) -> dict[str, Any]:
    """The targets, and for a loss with class labels the normalization and the ignored
    labels, drawn as labelled choices (`build_case` and `batched.expand` read them)."""
    return dict(
        targets=draw(
            st.sampled_from(["uniform", "ends", "fractional" if labels else "integers"]),
            label="targets",
        ),
        normalization=(
            draw(st.sampled_from([None, *NORMALIZATIONS]), label="normalization")
            if labels
            else None
        ),
        ignoring=(
            draw(st.sampled_from(["none", "some", "all", "out-of-range"]), label="ignore")
            if labels
            else "none"
        ),
    )


@st.composite
def cases(
    draw: st.DrawFn,
    combos: tuple[tuple[str, str], ...] = COMBINATIONS,
    spreads: st.SearchStrategy[float] = SPREADS,
    sigmas: st.SearchStrategy[float] = SIGMAS,
    near_prediction: bool = False,
    small: st.SearchStrategy[float] | None = None,
    batches: st.SearchStrategy[int] = BATCHES,
    features: st.SearchStrategy[int] = FEATURES,
    bins: st.SearchStrategy[int] = BINS,
) -> Case:
    """A case of one of `combos`, drawn as a few labelled numbers (see `build_case`)."""
    head, loss = draw(st.sampled_from(combos), label="head+loss")
    labels = LOSSES[loss].labels
    return build_case(
        head,
        loss,
        batch=draw(batches, label="batch"),
        features=draw(features, label="features"),
        bins=draw(bins, label="bins") if HEADS[head].has_bins else Case.bins,
        spread=draw(spreads, label="spread"),
        seed=draw(st.integers(0, 2**32 - 1), label="seed"),
        sigma=draw(sigmas, label="sigma") if LOSSES[loss].has_sigma else Case.sigma,
        small=draw(small, label="small scale") if small is not None else None,
        **label_choices(draw, labels),
        near_prediction=near_prediction,
    )


__all__ = ["BATCHES", "BINS", "FEATURES", "SPREADS", "build_case", "cases"]
