"""Input values for layer cases: cheap to draw (a few numbers, then numpy), covering the
regions where layers differ: exact zeros (kinks), ties (max and argmax), tiny and large
magnitudes, and both signs."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from numpy.typing import NDArray

SCALES = (1e-3, 1.0, 30.0, 1e3)


@st.composite
def arrays(
    draw: st.DrawFn,
    shape: tuple[int, ...],
    label: str = "x",
    positive: bool = False,
    scales: tuple[float, ...] = SCALES,
) -> NDArray[np.float32]:
    """A float32 array of `shape`: normal values at a drawn scale, with a drawn share of
    exact zeros and of values rounded to a coarse grid (so ties occur)."""
    seed = draw(st.integers(0, 2**32 - 1), label=f"{label} seed")
    scale = draw(st.sampled_from(scales), label=f"{label} scale")
    zeros = draw(st.sampled_from((0.0, 0.0, 0.2)), label=f"{label} zeros")
    ties = draw(st.booleans(), label=f"{label} ties")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale
    if ties:
        x = np.round(x / scale * 2) * scale / 2
    if positive:
        x = np.abs(x) + scale * 1e-2
    elif zeros:
        x[rng.random(shape) < zeros] = 0.0
    return x.astype(np.float32)


seeds = st.integers(0, 2**32 - 1)
