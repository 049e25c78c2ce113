"""SmoothL1Loss as a Caffe Python layer (BVLC Caffe has none; the Fast R-CNN fork's is GPU-only).

This is the Caffe-side implementation under test, ported from the fork's C++ layer:
forward sums ``0.5 sigma^2 x^2`` where ``|x| < 1/sigma^2`` and ``|x| - 0.5/sigma^2`` elsewhere,
over x = bottom[0] - bottom[1], divided by the batch size; backward is ``sigma^2 x`` or
``sign(x)``, divided by the batch size and scaled by the top diff. Computed in float32, as
Caffe's own layers are.
"""

from __future__ import annotations

import json
from typing import Any

import caffe
import numpy as np


class SmoothL1Loss(caffe.Layer):  # type: ignore[misc]
    def setup(self, bottom: Any, top: Any) -> None:
        if len(bottom) != 2:
            raise ValueError("SmoothL1Loss needs two bottoms: prediction and target")
        params = json.loads(self.param_str or "{}")
        sigma = float(params.get("sigma", 1.0))
        if not np.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"SmoothL1Loss: sigma must be finite and > 0, got {sigma}")
        self.sigma2 = np.float32(sigma * sigma)

    def reshape(self, bottom: Any, top: Any) -> None:
        if bottom[0].count != bottom[1].count or bottom[0].num != bottom[1].num:
            raise ValueError(
                f"SmoothL1Loss: bottoms {bottom[0].data.shape} and {bottom[1].data.shape} "
                "must have the same batch size and count"
            )
        self.diff = np.zeros_like(bottom[0].data, dtype=np.float32)
        top[0].reshape(1)

    def forward(self, bottom: Any, top: Any) -> None:
        x = bottom[0].data - bottom[1].data.reshape(bottom[0].data.shape)
        self.diff[...] = x
        ax = np.abs(x)
        inner = ax < 1 / self.sigma2
        per = np.where(
            inner, np.float32(0.5) * self.sigma2 * x * x, ax - np.float32(0.5) / self.sigma2
        )
        top[0].data[...] = np.sum(per, dtype=np.float32) / np.float32(bottom[0].num)

    def backward(self, top: Any, propagate_down: Any, bottom: Any) -> None:
        x = self.diff
        inner = np.abs(x) < 1 / self.sigma2
        grad = np.where(inner, self.sigma2 * x, np.sign(x)).astype(np.float32)
        grad *= top[0].diff[0] / np.float32(bottom[0].num)
        if propagate_down[0]:
            bottom[0].diff[...] = grad
        if propagate_down[1]:
            bottom[1].diff[...] = -grad.reshape(bottom[1].diff.shape)
