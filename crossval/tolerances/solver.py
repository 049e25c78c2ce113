"""Bounds carried along a training trajectory: one solver step at a time.

`training.torch_trajectory` runs the float64 reference and, after every step, hands this
module the reference's values (params before and after, gradients, solver histories, the
rate); the bounds on the params, the histories and the loss come back, each the float32
error a Caffe or port step may add on top of the error the params already carried. The
update rules' own bounds are ``solver_update`` (TABLE['solver_step']); this module adds the
parts around them: the feedback of the params' error into the next gradient, gradient
clipping, weight decay (L1 and L2), learning-rate multipliers and the rounding of the
update into the params.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from crossval.reference.solvers import SolverConfig

from . import ETA32, U32, gamma, solver_update

F64 = NDArray[np.float64]
Mults = Sequence[tuple[float, float]]


def step_feedback(
    e_loss: float,
    e_g: Mapping[str, F64],
    g: Mapping[str, F64],
    e_w: Mapping[str, F64],
    hv: Mapping[str, F64] | None,
    keys: Sequence[str],
) -> tuple[float, dict[str, F64]]:
    """Loss and gradient bounds at this step's reference params (`e_loss`, `e_g`, from the
    head's table) plus the feedback of the params' own accumulated error `e_w`, to first
    order: |g| e_w for the loss, 2 |H e_w| for the gradient (`hv` = H e_w, the reference's
    Hessian-vector product; None when e_w is zero)."""
    e_loss += sum(float((np.abs(g[k]) * e_w[k]).sum()) for k in keys)
    if hv is None:
        return e_loss, {k: e_g[k] for k in keys}
    return e_loss, {k: e_g[k] + 2 * np.abs(hv[k]) for k in keys}


def carry(
    cfg: SolverConfig,
    mults: Mults,
    keys: Sequence[str],
    w: Mapping[str, NDArray[Any]],
    g: Mapping[str, F64],
    e_g: Mapping[str, F64],
    e_w: Mapping[str, F64],
    e_h: Mapping[str, F64],
    e_h2: Mapping[str, F64],
    hist: Mapping[str, NDArray[Any]],
    hist2: Mapping[str, NDArray[Any]],
    rate: float,
    t: int,
    w_after: Mapping[str, NDArray[Any]],
) -> tuple[dict[str, F64], dict[str, F64], dict[str, F64]]:
    """One step of the bound recursion for every param `keys` (with their (lr_mult,
    decay_mult) `mults`): from the reference's params `w` before the step, its gradient `g`
    and that gradient's bound `e_g`, the histories before the step and the bounds carried so
    far (`e_w`, `e_h`, `e_h2`), the step's rate and index `t`, and the params `w_after` the
    step; returns the bounds on the params and the two histories after it."""
    g = {k: np.asarray(g[k], dtype=np.float64) for k in keys}
    e_d = {k: e_g[k] + U32 * np.abs(g[k]) for k in keys}
    if cfg.clip_gradients >= 0:
        norm = float(np.sqrt(sum((g[k] ** 2).sum() for k in keys)))
        e_norm = sum(float((np.abs(g[k]) * e_g[k]).sum()) for k in keys) / max(norm, 1e-300)
        e_norm += gamma(sum(g[k].size for k in keys) + 2) * norm
        if norm > cfg.clip_gradients or norm + e_norm > cfg.clip_gradients:
            s = cfg.clip_gradients / norm if norm > cfg.clip_gradients else 1.0
            low = norm - e_norm
            e_s = cfg.clip_gradients * e_norm / (low * low) if low > 0 else float("inf")
            # Near the threshold either branch may be taken: allow both.
            flip = abs(norm - cfg.clip_gradients) <= e_norm
            for k in keys:
                alt = np.abs(g[k]) * abs(1 - s) if flip else 0.0
                e_d[k] = s * e_d[k] + np.abs(g[k]) * e_s + alt + U32 * s * np.abs(g[k])
                g[k] = g[k] * s
    new_w, new_h, new_h2 = {}, {}, {}
    for k, (lr_mult, decay_mult) in zip(keys, mults, strict=True):
        decay = cfg.weight_decay * decay_mult
        d, ed = g[k], e_d[k]
        wk = np.asarray(w[k], dtype=np.float64)
        if decay:
            if cfg.regularization_type == "L2":
                d = d + decay * wk
                ed = ed + decay * e_w[k] + U32 * np.abs(d)
            else:
                d = d + decay * np.sign(wk)
                ed = ed + np.where(np.abs(wk) <= e_w[k], 2 * decay, 0.0) + U32 * np.abs(d)
        lr = rate * lr_mult
        e_upd, new_h[k], new_h2[k] = solver_update(
            cfg.type,
            lr,
            d,
            ed,
            np.asarray(hist[k], dtype=np.float64),
            np.asarray(hist2[k], dtype=np.float64),
            e_h[k],
            e_h2[k],
            cfg.momentum,
            cfg.momentum2,
            cfg.rms_decay,
            cfg.delta,
            t + 1,
        )
        # Caffe rounds the rate itself to float32 (its policies compute in Dtype).
        e_upd = e_upd + 4 * U32 * np.abs(wk - w_after[k])
        new_w[k] = e_w[k] + e_upd + U32 * np.abs(w_after[k]) + ETA32
    return new_w, new_h, new_h2
