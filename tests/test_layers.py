"""Every layer type of the reference layer library against real Caffe, on its own.

For each type, hypothesis draws one-layer nets from its parameter grid and inputs from the
hard regions (zeros at kinks, ties, tiny and large values); Caffe and the float32 reference
must each be within the layer's bound of the float64 reference, forward and backward
(bottom and param diffs), and within twice of each other.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from crossval import golden, layercheck
from crossval import tolerances as tol
from crossval.compare import Comparison
from crossval.layercheck import LayerCase, run_case
from crossval.layercheck import golden as layer_golden
from crossval.reference import layers as ref
from crossval.reference.layers import defaults
from crossval.tolerances.layers import LAYER_BOUNDS
from crossval.worker import CaffeWorker


def test_every_layer_type_has_a_reference_a_bound_and_cases() -> None:
    assert set(ref.LAYERS) == set(LAYER_BOUNDS) == set(layercheck.CASES)


# Examples per layer type: at least 100 in `ci`, 2000 in `thorough` (other profiles: theirs).
LAYER_EXAMPLES = {"ci": 100, "thorough": 2000}


@pytest.mark.parametrize("layer_type", sorted(layercheck.CASES))
def test_layer_matches_caffe(worker: CaffeWorker, layer_type: str) -> None:
    profile = os.environ.get("HYPOTHESIS_PROFILE", "dev")
    default = settings.default.max_examples if settings.default is not None else 100
    examples = LAYER_EXAMPLES.get(profile, default)

    @settings(database=None, max_examples=examples)
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
        return original.forward(
            spec.with_param("inner_product_param", transpose=False), bottoms, blobs
        )

    monkeypatch.setitem(ref.LAYERS, "InnerProduct", ref.LayerType("InnerProduct", no_transpose, ""))
    result = run_case(worker, case)
    assert not result.passed
    assert "forward caffe~ref64: t0" in result.summary()


# -- golden vectors of single layers (crossval/golden/layers) -------------------------------


def _layer_goldens() -> list[layer_golden.LayerGolden]:
    return layer_golden.load(golden.GOLDEN_DIR)


def test_every_layer_type_has_golden_cases() -> None:
    counts = Counter(g.type for g in _layer_goldens())
    assert {t: counts[t] for t in ref.LAYERS} == dict.fromkeys(ref.LAYERS, layer_golden.PER_TYPE)


def test_layer_golden_values_regenerate() -> None:
    """The stored float64 values are what the reference computes on the stored inputs."""
    for g in _layer_goldens():
        no_diff = tuple(i for i in range(len(g.bottoms)) if i not in g.bottom_diffs)
        tops, db, dp = layer_golden.reference_values(
            g.layer_spec, g.bottoms, g.blobs, g.top_diffs, no_diff
        )
        stored = [*g.tops, *g.bottom_diffs.values(), *g.param_diffs.values()]
        fresh = [*tops, *(db[i] for i in g.bottom_diffs), *(dp[i] for i in g.param_diffs)]
        for a, b in zip(fresh, stored, strict=True):
            c = Comparison("regenerated", g.name, a, b, tol.regenerated_f64(b), "regenerated_f64")
            assert c.passed, str(c)


def test_layer_golden_cases_pass_on_the_default_build(worker: CaffeWorker) -> None:
    for g in _layer_goldens():
        for v in layer_golden.caffe_values(worker, g):
            c = Comparison(f"{v.kind} caffe~ref64", v.key, v.actual, v.desired, v.bound, v.rule)
            assert c.passed, f"{g.name}: {c}"


def test_code_built_specs_have_caffes_defaults(worker: CaffeWorker) -> None:
    """crossval.reference.layers.defaults (the heads' layers, built in code) is Caffe's parse."""
    types = sorted(defaults.KIND)
    text = 'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
    text += "".join(f'layer {{ name: "{t}" type: "{t}" bottom: "x" top: "{t}" }}\n' for t in types)
    parsed = {s.type: s.params for s in worker.layer_specs(text)}
    for t in types:
        kind = defaults.KIND[t]
        caffe = parsed[t][kind]
        assert {k: caffe[k] for k in defaults.DEFAULTS[kind]} == defaults.DEFAULTS[kind], t
