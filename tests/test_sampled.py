"""The sampled check of a big linear layer (crossval.tolerances.sampled): every sampled
element has the reference value and the bound the exhaustive check gives it, the sample
meets every part of the layer it promises (a slab of channels over every position, patches
of every channel on an edge), and a wrong layer is caught on its sample."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossval import tolerances as tol
from crossval.compare import Comparison
from crossval.reference.layers import LayerSpec
from crossval.tolerances import layers as tol_layers
from crossval.tolerances import sampled as smp
from crossval.tolerances.segments import segment

CONV = """
name: "s"
input: "x" input_shape {{ dim: {n} dim: {c} dim: {h} dim: {w} }}
layer {{ name: "conv" type: "Convolution" bottom: "x" top: "y"
  convolution_param {{ num_output: {o} kernel_size: {k} stride: {s} pad: {p} dilation: {d}
    group: {g} bias_term: {bias} }} }}
{relu}
"""
RELU = 'layer { name: "relu" type: "ReLU" bottom: "y" top: "y" relu_param { negative_slope: %s } }'
IP = """
name: "s"
input: "x" input_shape {{ dim: {n} dim: {c} dim: 3 dim: 2 }}
layer {{ name: "fc" type: "InnerProduct" bottom: "x" top: "y"
  inner_product_param {{ num_output: {o} transpose: {t} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "y" top: "y" }}
layer {{ name: "drop" type: "Dropout" bottom: "y" top: "y" }}
"""


def _specs(worker: Any, text: str) -> list[LayerSpec]:
    specs = [LayerSpec.from_caffe(d) for d in worker.layer_specs(text)]
    return [sp for sp in specs if sp.type != "Input"]


def _arrays(
    rng: np.random.Generator,
    specs: list[LayerSpec],
    x_shape: tuple[int, ...],
    worker: Any,
    text: str,
) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    params = worker.params(text, phase="TEST").params
    ws = {
        name: [rng.standard_normal(np.shape(a)).astype(np.float32) for a in blobs]
        for name, blobs in params.items()
    }
    x = rng.standard_normal(x_shape).astype(np.float32)
    run = worker.run(text, {"x": x}, params=ws, return_params=False)
    y_shape = np.shape(run.blobs["y"])
    return {"x": x}, ws, {"y": rng.standard_normal(y_shape).astype(np.float32)}


def _same(res_s: Any, res_e: Any) -> int:
    """Every sampled element against the exhaustive result: the same value (to float64
    rounding of another summation order) and the same bound. Returns how many."""
    checked = 0
    for kind, vals, bounds, e_vals, e_bounds in (
        ("v", res_s.values, res_s.value_bounds, res_e.values, res_e.value_bounds),
        (
            "x",
            res_s.input_diffs,
            res_s.input_diff_bounds,
            res_e.input_diffs,
            res_e.input_diff_bounds,
        ),
        (
            "p",
            res_s.param_diffs,
            res_s.param_diff_bounds,
            res_e.param_diffs,
            res_e.param_diff_bounds,
        ),
    ):
        for key, v in vals.items():
            pos = res_s.positions[(kind, key)]
            assert res_s.shapes[(kind, key)] == e_vals[key].shape
            want = e_vals[key].reshape(-1)[pos]
            slack = tol.regenerated_f64(np.abs(e_bounds[key]).reshape(-1)[pos] + np.abs(want))
            assert np.all(np.abs(v - want) <= slack * 64), (kind, key)
            b_want = e_bounds[key].reshape(-1)[pos]
            assert np.all(np.abs(bounds[key] - b_want) <= tol.regenerated_f64(b_want) * 64), (
                kind,
                key,
            )
            checked += v.size
    return checked


@st.composite
def conv_cases(draw: st.DrawFn) -> dict[str, Any]:
    g = draw(st.sampled_from([1, 2]))
    k = draw(st.integers(1, 3))
    d = draw(st.integers(1, 2))
    s = draw(st.integers(1, 3))
    p = draw(st.integers(0, 2))
    h = draw(st.integers((k - 1) * d + 1, 9))
    w = draw(st.integers((k - 1) * d + 1, 9))
    return dict(
        n=draw(st.integers(1, 2)),
        c=2 * g,
        h=h,
        w=w,
        o=3 * g,
        k=k,
        s=s,
        p=p,
        d=d,
        g=g,
        bias=draw(st.sampled_from(["true", "false"])),
        relu=draw(st.sampled_from(["", RELU % 0.0, RELU % 0.25])),
        seed=draw(st.integers(0, 2**31)),
        # the slab on strips of one row, of a few, or whole; convolutions image by image
        strip=draw(st.sampled_from([1, 40, smp.STRIP])),
        split=draw(st.sampled_from([0, tol_layers.SPLIT_ABOVE])),
    )


@settings(deadline=None, max_examples=25)
@given(case=conv_cases())
def test_sampled_convolution_matches_the_exhaustive_check(
    worker: Any, case: dict[str, Any]
) -> None:
    text = CONV.format(**case)
    specs = _specs(worker, text)
    rng = np.random.default_rng(case["seed"])
    shape = (case["n"], case["c"], case["h"], case["w"])
    inputs, ws, g = _arrays(rng, specs, shape, worker, text)
    full = segment(specs, ws, inputs, ["y"], g)  # whole, one convolution of the batch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(smp, "STRIP", case["strip"])
        mp.setattr(tol_layers, "SPLIT_ABOVE", case["split"])
        part = smp.sampled(specs, ws, inputs, ["y"], g, case["seed"])
    assert _same(part, full) > 0
    # the slab: SLAB channels over every image and position
    pos = part.positions[("v", "y")]
    _n, o, oh, ow = np.unravel_index(pos, full.values["y"].shape)
    y_shape = full.values["y"].shape
    per_channel = np.bincount(o, minlength=y_shape[1])
    whole = y_shape[0] * y_shape[2] * y_shape[3]
    assert (per_channel == whole).sum() >= min(smp.SLAB, case["o"] // case["g"])
    # a top patch sits on an edge of the top
    assert (oh == 0).any() or (ow == 0).any() or (oh == full.values["y"].shape[2] - 1).any()
    assert ("p", ("conv", 0)) in part.positions
    # bottom patches: unless no top position reads the bottom at all (its diff is all 0)
    assert ("x", "x") in part.positions or not full.input_diffs["x"].any()


@settings(deadline=None, max_examples=10)
@given(
    n=st.integers(1, 3),
    o=st.integers(1, 20),
    t=st.sampled_from(["true", "false"]),
    seed=st.integers(0, 2**31),
)
def test_sampled_inner_product_matches_the_exhaustive_check(
    worker: Any, n: int, o: int, t: str, seed: int
) -> None:
    text = IP.format(n=n, c=4, o=o, t=t)
    specs = _specs(worker, text)
    rng = np.random.default_rng(seed)
    inputs, ws, g = _arrays(rng, specs, (n, 4, 3, 2), worker, text)
    full = segment(specs, ws, inputs, ["y"], g)
    part = smp.sampled(specs, ws, inputs, ["y"], g, seed)
    assert _same(part, full) > 0
    # one image's bottom diff, whole
    img = np.unravel_index(part.positions[("x", "x")], inputs["x"].shape)[0]
    assert len(np.unique(img)) == 1 and part.positions[("x", "x")].size == 24


def test_a_wrong_convolution_is_caught_on_its_sample(worker: Any) -> None:
    """The float32 top of a convolution with one padded border row wrong (the commonest
    sampled-away mistake: padding or rounding at the edge) fails the sampled check, and the
    finding names the element in the whole top's coordinates."""
    case = dict(n=2, c=3, h=12, w=12, o=8, k=3, s=1, p=1, d=1, g=1, bias="true", relu="")
    text = CONV.format(**case)
    specs = _specs(worker, text)
    rng = np.random.default_rng(5)
    inputs, ws, _g = _arrays(rng, specs, (2, 3, 12, 12), worker, text)
    good = worker.run(text, inputs, params=ws, return_params=False)
    y = good.blobs["y"]
    bad = y.copy()
    bad[:, :, -1, :] += 0.5  # the last row computed as if unpadded
    caught = 0
    for seed in range(8):
        part = smp.sampled(specs, ws, inputs, ["y"], None, seed)
        pos = part.positions[("v", "y")]
        ok, wrong = (
            Comparison(
                "fwd",
                "y",
                top.reshape(-1)[pos],
                part.values["y"],
                part.value_bounds["y"],
                "r",
                positions=pos,
                shape=y.shape,
            )
            for top in (y, bad)
        )
        assert ok.passed, str(ok)
        if not wrong.passed:
            caught += 1
            assert wrong.worst[2] == 11 and "sampled elements (of 2304)" in str(wrong)
    assert caught == 8  # the slab covers every row of its channels


def test_only_big_linear_layers_are_sampled() -> None:
    conv = LayerSpec(
        "c",
        "Convolution",
        ("x",),
        ("y",),
        {
            "convolution_param": {
                "num_output": 64,
                "kernel_size": [3],
                "stride": [],
                "pad": [1],
                "dilation": [],
                "group": 1,
                "bias_term": True,
                "axis": 1,
                "kernel_h": 0,
                "kernel_w": 0,
                "stride_h": 0,
                "stride_w": 0,
                "pad_h": 0,
                "pad_w": 0,
            }
        },
    )
    assert smp.macs([conv], {"x": (1, 64, 224, 224)}) == 64 * 224 * 224 * 64 * 9
    assert smp.worth_it([conv], {"x": (1, 64, 224, 224)})
    assert not smp.worth_it([conv], {"x": (1, 64, 8, 8)})
    # an InnerProduct with a weight of 2^24 elements (VGG's fc7) at batch 1: 2^24
    # multiply-adds a pass, but a weight diff the size of the weight
    fc = LayerSpec(
        "fc",
        "InnerProduct",
        ("x",),
        ("y",),
        {"inner_product_param": {"num_output": 4096, "axis": 1, "transpose": False}},
    )
    assert smp.worth_it([fc], {"x": (1, 4096)})
    assert not smp.worth_it([fc], {"x": (2, 2048)})


def test_slab_strips() -> None:
    """Strips of top rows that divide the top, their unfolded bottom within STRIP; stacked
    as images and back."""
    assert smp._strip_rows(224, 64 * 9 * 224) * 64 * 9 * 224 <= smp.STRIP
    assert 224 % smp._strip_rows(224, 64 * 9 * 224) == 0
    assert smp._strip_rows(227, 9) == 227 and smp._strip_rows(227, smp.STRIP) == 1
    assert smp._strip_rows(7, 10 * smp.STRIP) == 1  # at least one row
    a = np.arange(2 * 3 * 6 * 5).reshape(2, 3, 6, 5)
    s = smp._stacked(a, 3)
    assert s.shape == (6, 3, 2, 5) and np.array_equal(s[4], a[1, :, 2:4])
    assert np.array_equal(smp._unstacked(s, 2), a)


# -- the engine with every Convolution and InnerProduct sampled ---------------------------
# The zoo's nets are small enough to be checked whole; with the threshold at 0 every linear
# layer is checked on its sample instead, and the campaign's verdicts must not change: the
# correct ports pass, every buggy port is caught at its layer.

from test_port_campaign import _checker, _clean, caught_at_its_layer, zoo  # noqa: E402, F401
from test_zoo_nets import BUGS, NETS  # noqa: E402

from crossval.portcheck.engine import PortExample  # noqa: E402


@pytest.fixture
def all_sampled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smp, "SAMPLE_ABOVE", 0)


@pytest.mark.parametrize("which", ["reference", "make"])
@pytest.mark.parametrize("key", list(NETS))
def test_sampled_engine_passes_the_correct_ports(
    worker: Any,
    zoo: Any,  # noqa: F811 (the campaign's fixture)
    all_sampled: None,
    key: str,
    which: str,
) -> None:
    checker = _checker(worker, zoo[key], which)
    for seed in range(3):
        ratio = _clean(checker, PortExample(seed, batch=NETS[key].batch))
        assert ratio <= 1.0
    v = checker.run(PortExample(3, batch=NETS[key].batch))
    sampled = [c for c in v.comparisons if c.positions is not None]
    assert sampled, "no layer was sampled"


@pytest.mark.parametrize(
    ("key", "variant"),
    [b for b in BUGS if b[1] not in ("make_scale_without_bias", "make_dropout_active")],
)
def test_sampled_engine_catches_each_buggy_port_at_its_layer(
    worker: Any,
    zoo: Any,  # noqa: F811 (the campaign's fixture)
    all_sampled: None,
    key: str,
    variant: str,
) -> None:
    from test_zoo_nets import named_layer

    checker = _checker(worker, zoo[key], variant)
    make = getattr(__import__(f"ports.{zoo[key].port_module}", fromlist=[variant]), variant)
    caught_at_its_layer(checker, key, variant, named_layer(make.__doc__))
