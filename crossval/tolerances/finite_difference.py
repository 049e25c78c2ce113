"""What a finite-difference check of a head's gradients allows: Caffe's GradientChecker
settings (include/caffe/test/test_gradient_check_util.hpp) and the float32 slack crossval adds
on scaled heads.

Caffe's threshold assumes the step's truncation error and the objective's rounding are
negligible, as they are in its unit-scale layer tests. Ages scaled by 99 (or K - 1) break
both assumptions, so each element is also allowed

- ``e_L / step``: the float32 bound of the loss value (the tolerance table), for the two
  rounded losses in (L+ - L-) / (2 step), and
- ``|FD64(step) - g64|``: the central difference's own truncation error, measured on the
  float64 reference at the same point with the same step.
"""

from __future__ import annotations

from collections.abc import Sequence

CAFFE_FD_STEP = 1e-2
CAFFE_FD_THRESHOLD = 1e-3


def _power(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


RULE = (
    f"Caffe GradientChecker (step {_power(CAFFE_FD_STEP)}, threshold "
    f"{_power(CAFFE_FD_THRESHOLD)}) + float32 slack"
)
"""The rule a finite-difference check reports."""


def slacks(
    loss_bound: float, truncation: Sequence[float], step: float = CAFFE_FD_STEP
) -> list[float]:
    """The slack of each checked element: the loss's rounding over the step, plus that
    element's measured truncation error."""
    return [loss_bound / step + t for t in truncation]


def allowed(computed: float, estimated: float, slack: float) -> float:
    """The largest |computed - estimated| an element may show: Caffe's threshold relative to
    max(|computed|, |estimated|, 1), plus the element's slack (the rule the worker applies)."""
    scale = max(abs(computed), abs(estimated), 1.0)
    return CAFFE_FD_THRESHOLD * scale + slack
