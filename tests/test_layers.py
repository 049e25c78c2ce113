"""Every layer type of the reference layer library against real Caffe, on its own.

For each type, hypothesis draws one-layer nets from its parameter grid and inputs from the
hard regions (zeros at kinks, ties, tiny and large values); Caffe and the float32 reference
must each be within the layer's bound of the float64 reference, forward and backward
(bottom and param diffs), and within twice of each other.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossval import layercheck, provision
from crossval.layercheck import LayerCase, run_case
from crossval.tolerances.layers import LAYER_BOUNDS
from crossval.worker import CaffeWorker
from reference import layers as ref


@pytest.fixture(scope="module")
def worker(caffe_install: provision.CaffeInstall) -> Iterator[CaffeWorker]:
    with CaffeWorker(caffe_install) as w:
        yield w


def test_every_layer_type_has_a_reference_a_bound_and_cases() -> None:
    assert set(ref.LAYERS) == set(LAYER_BOUNDS) == set(layercheck.CASES)


@pytest.mark.parametrize("layer_type", sorted(layercheck.CASES))
def test_layer_matches_caffe(worker: CaffeWorker, layer_type: str) -> None:
    @settings(database=None)
    @given(case=layercheck.CASES[layer_type]())
    def prop(case: LayerCase) -> None:
        result = run_case(worker, case)
        assert result.passed, result.summary()

    prop()


def test_unsupported_layer_type_is_named() -> None:
    spec = ref.LayerSpec("mystery", "SPP")
    with pytest.raises(ref.UnsupportedLayer, match=r"'mystery' has type 'SPP'.*supported: "):
        ref.forward(spec, [torch.zeros(1)], [])


def test_a_wrong_reference_fails(worker: CaffeWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: InnerProduct that ignores transpose is caught."""
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    case = LayerCase(
        "InnerProduct", (x,), "inner_product_param { num_output: 4 transpose: true }", seed=2
    )
    assert run_case(worker, case).passed
    original = ref.LAYERS["InnerProduct"]

    def no_transpose(spec: ref.LayerSpec, bottoms, blobs):  # type: ignore[no-untyped-def]
        params = dict(spec.params)
        params["inner_product_param"] = {**params["inner_product_param"], "transpose": False}
        return original.forward(
            ref.LayerSpec(spec.name, spec.type, spec.bottoms, spec.tops, params), bottoms, blobs
        )

    monkeypatch.setitem(ref.LAYERS, "InnerProduct", ref.LayerType("InnerProduct", no_transpose, ""))
    result = run_case(worker, case)
    assert not result.passed
    assert "forward caffe~ref64: t0" in result.summary()
