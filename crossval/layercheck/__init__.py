"""Each Caffe layer type on its own: a one-layer net in real Caffe against the reference
layer library (float64 and float32), forward and backward, within the layer's bound.

``CASES`` maps every layer type to a hypothesis strategy of ``LayerCase`` (its parameter
grid and input regions), one module per family; ``run_case`` runs one case.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import strategies as st

from .run import LayerCase, LayerResult, run_case

CaseStrategy = Callable[[], st.SearchStrategy[LayerCase]]
CASES: dict[str, CaseStrategy] = {}


def _collect() -> None:
    from . import cases_loss, cases_neuron, cases_normalization, cases_structure, cases_vision

    for module in (cases_vision, cases_neuron, cases_normalization, cases_structure, cases_loss):
        for name, strategy in module.CASES.items():
            if name in CASES:
                raise ValueError(f"layer cases for {name!r} defined twice")
            CASES[name] = strategy


_collect()

__all__ = ["CASES", "CaseStrategy", "LayerCase", "LayerResult", "run_case"]
