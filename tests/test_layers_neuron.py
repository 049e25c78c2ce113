"""Neuron and normalization layers against real Caffe: a realistic port mistake per layer
type is caught on a case where it matters, and the kinks where Caffe's backward is not the
textbook derivative (AbsVal, ELU and PReLU at 0, BNLL at 0, Power at x = 0) are checked
on Caffe's own diffs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import Tensor

from crossval import layercheck
from crossval.layercheck import LayerCase, run_case
from crossval.layercheck.run import LAYER, spec_of
from crossval.mutants.catalogue import SigmoidGradFromInput
from crossval.reference import layers as ref
from crossval.reference.layers import neuron, normalization
from crossval.worker import CaffeWorker

Fn = Callable[[ref.LayerSpec, Sequence[Tensor], Sequence[Tensor]], list[Tensor]]


def _x(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> np.ndarray[Any, Any]:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _with_zeros(shape: tuple[int, ...], seed: int = 0) -> np.ndarray[Any, Any]:
    x = _x(shape, seed)
    x.reshape(-1)[::3] = 0.0
    return x


def _with(spec: ref.LayerSpec, kind: str, **changes: Any) -> ref.LayerSpec:
    """`spec` with fields of `kind` set (as if the prototxt set them)."""
    params = {**spec.params, kind: {**spec.params[kind], **changes}}
    set_fields = {**spec.set_fields, kind: spec.set_fields.get(kind, frozenset()) | set(changes)}
    return ref.LayerSpec(
        spec.name, spec.type, spec.bottoms, spec.tops, params, spec.phase, set_fields
    )


def _caught(worker: CaffeWorker, case: LayerCase, wrong: Fn, where: str) -> None:
    """`case` passes with the reference; with `wrong` as the reference (float64 and float32,
    as tests/test_layers.py patches it) and with `wrong` as a port, it fails, at `where`."""
    assert run_case(worker, case).passed, run_case(worker, case).summary()
    as_port = run_case(worker, case, port=wrong)
    assert not as_port.passed
    assert where.replace("caffe~ref64", "torch~ref64") in as_port.summary(), as_port.summary()
    mp = pytest.MonkeyPatch()
    try:
        mp.setitem(ref.LAYERS, case.type, ref.LayerType(case.type, wrong, ""))
        patched = run_case(worker, case)
    finally:
        mp.undo()
    assert not patched.passed
    assert where in patched.summary(), patched.summary()


def _caffe(worker: CaffeWorker, case: LayerCase, g: np.ndarray[Any, Any]) -> dict[str, Any]:
    """Caffe's top, bottom diff and param diffs for top diff `g`."""
    out = worker.run(
        prototxt=case.prototxt(),
        inputs={f"b{i}": b for i, b in enumerate(case.bottoms)},
        params={LAYER: list(case.blobs)} if case.blobs else None,
        phase="TEST",
        backward=True,
        top_diffs={"t0": g},
        all_diffs=True,
        return_params=False,
    )
    return {
        "top": out.blobs["t0"],
        "diff": out.diffs["b0"],
        "param_diffs": out.param_diffs.get(LAYER, []),
    }


def _ref_diff(case: LayerCase, spec: ref.LayerSpec, g: np.ndarray[Any, Any]) -> Tensor:
    bs = [torch.from_numpy(b.astype(np.float64)) for b in case.bottoms]
    ps = [torch.from_numpy(np.asarray(p, dtype=np.float64)) for p in case.blobs or ()]
    _, gb, _ = ref.vjp(spec, bs, ps, [torch.from_numpy(g.astype(np.float64))])
    assert gb[0] is not None
    return gb[0]


# -- mutants: one realistic port mistake per layer type -------------------------------------


def test_prelu_slopes_on_the_last_axis_are_caught(worker: CaffeWorker) -> None:
    """Per-channel slopes laid along the last axis (a channels-last port); C = W = 3."""
    slopes = np.array([0.1, -0.5, 2.0], dtype=np.float32)
    case = LayerCase("PReLU", (_x((2, 3, 2, 3)),), "", blobs=(slopes,))

    def last_axis(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return [torch.where(b[0] > 0, b[0], b[0] * p[0])]

    _caught(worker, case, last_axis, "forward caffe~ref64: t0")


def test_elu_from_the_library_with_its_own_alpha_is_caught(worker: CaffeWorker) -> None:
    """F.elu with alpha 1 (nn.ELU()'s default) for Caffe's alpha 0.5."""
    case = LayerCase("ELU", (_x((2, 5)),), "elu_param { alpha: 0.5 }")

    def default_alpha(
        spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]
    ) -> list[Tensor]:
        return [F.elu(b[0])]

    _caught(worker, case, default_alpha, "forward caffe~ref64: t0")


def test_sigmoid_gradient_from_the_input_is_caught(worker: CaffeWorker) -> None:
    """A hand-written backward g x (1 - x) (the input where the output belongs)."""
    case = LayerCase("Sigmoid", (_x((3, 4)),))

    def wrong(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        y: Tensor = SigmoidGradFromInput.apply(b[0])  # type: ignore[no-untyped-call]
        return [y]

    _caught(worker, case, wrong, "backward caffe~ref64: d/d b0")


def test_tanh_as_a_rescaled_sigmoid_is_caught(worker: CaffeWorker) -> None:
    """2 sigmoid(x) - 1, which is tanh(x / 2), for tanh."""
    case = LayerCase("TanH", (_x((3, 4)),))

    def half(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return [2 * torch.sigmoid(b[0]) - 1]

    _caught(worker, case, half, "forward caffe~ref64: t0")


def test_absval_diff_at_zero_taken_as_one_is_caught(worker: CaffeWorker) -> None:
    """where(x >= 0, x, -x): the same |x|, but diff +g at x = 0 where Caffe has sign(0) = 0."""
    case = LayerCase("AbsVal", (_with_zeros((2, 6)),))

    def ge(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return [torch.where(b[0] >= 0, b[0], -b[0])]

    _caught(worker, case, ge, "backward caffe~ref64: d/d b0")


def test_bnll_as_relu_plus_log1p_is_caught_at_zero(worker: CaffeWorker) -> None:
    """max(x, 0) + log1p(exp(-|x|)): the stable softplus, right in value, but its autograd
    diff at x = 0 is 0 (relu' = 0, |x|' = 0) where BNLL's is 1/2."""
    case = LayerCase("BNLL", (_with_zeros((2, 6)),))

    def stable(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return [torch.relu(b[0]) + torch.log1p(torch.exp(-b[0].abs()))]

    _caught(worker, case, stable, "backward caffe~ref64: d/d b0")


def test_power_scale_after_shift_is_caught(worker: CaffeWorker) -> None:
    """(scale (x + shift))^power for (shift + scale x)^power."""
    case = LayerCase("Power", (_x((2, 5)),), "power_param { power: 2 scale: 0.5 shift: 1 }")

    def swapped(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return [((b[0] + 1.0) * 0.5) ** 2]

    _caught(worker, case, swapped, "forward caffe~ref64: t0")


def test_exp_base_ignored_is_caught(worker: CaffeWorker) -> None:
    """exp(shift + scale x) whatever the base (base 2 here)."""
    case = LayerCase("Exp", (_x((2, 5)),), "exp_param { base: 2 scale: 0.5 shift: 1 }")

    def natural(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return [torch.exp(1.0 + 0.5 * b[0])]

    _caught(worker, case, natural, "forward caffe~ref64: t0")


def test_log_base_ignored_is_caught(worker: CaffeWorker) -> None:
    """ln(shift + scale x) whatever the base (base 10 here)."""
    x = np.abs(_x((2, 5))) + np.float32(0.1)
    case = LayerCase("Log", (x,), "log_param { base: 10 shift: 1 }")

    def natural(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return [torch.log(b[0] + 1.0)]

    _caught(worker, case, natural, "forward caffe~ref64: t0")


def test_dropout_active_in_test_is_caught(worker: CaffeWorker) -> None:
    """Inverted dropout's 1 / (1 - ratio) kept at inference (no mask: the scale alone)."""
    case = LayerCase("Dropout", (_x((2, 5)),), "dropout_param { dropout_ratio: 0.3 }")

    def scaled(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return [b[0] / (1 - 0.3)]

    _caught(worker, case, scaled, "forward caffe~ref64: t0")


def test_dropout_ratio_has_no_effect_in_test(worker: CaffeWorker) -> None:
    """Caffe's TEST-phase Dropout is a bit-exact copy, forward and backward, for any ratio."""
    x, g = _x((3, 4), 1), _x((3, 4), 2)
    for ratio in (0.1, 0.5, 0.9):
        case = LayerCase("Dropout", (x,), f"dropout_param {{ dropout_ratio: {ratio} }}")
        out = _caffe(worker, case, g)
        assert out["top"].tobytes() == x.tobytes(), ratio
        assert out["diff"].tobytes() == g.tobytes(), ratio


def _bn_case(params: str, factor: float = 999.98) -> LayerCase:
    x = _x((3, 2, 2, 2), 4, 3.0)
    mean = np.array([0.5, -1.0], dtype=np.float32) * np.float32(factor)
    var = np.array([2.0, 0.25], dtype=np.float32) * np.float32(factor)
    return LayerCase(
        "BatchNorm",
        (x,),
        f"batch_norm_param {{ {params} }}",
        blobs=(mean, var, np.array([factor], dtype=np.float32)),
    )


def test_batchnorm_factor_ignored_is_caught(worker: CaffeWorker) -> None:
    """The mean and variance blobs used as they are, without Caffe's division by the factor
    (a port that loads blobs 0 and 1 into running_mean / running_var)."""
    case = _bn_case("")

    def raw(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return [F.batch_norm(b[0], p[0].detach(), p[1].detach(), eps=1e-5)]

    _caught(worker, case, raw, "forward caffe~ref64: t0")


def test_batchnorm_batch_stats_unbiased_variance_is_caught(worker: CaffeWorker) -> None:
    """use_global_stats: false normalized with the unbiased (M - 1) variance."""
    case = _bn_case("use_global_stats: false")

    def unbiased(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        x = b[0]
        axes = (0, 2, 3)
        mean = x.mean(dim=axes, keepdim=True)
        var = x.var(dim=axes, keepdim=True, unbiased=True)
        return [(x - mean) / torch.sqrt(var + 1e-5)]

    _caught(worker, case, unbiased, "forward caffe~ref64: t0")


def test_batchnorm_global_stats_default_follows_the_phase(worker: CaffeWorker) -> None:
    """Unset use_global_stats in TEST uses the blobs: a port normalizing with the batch's
    statistics (a module left in training mode) is caught."""
    case = _bn_case("")

    def batch(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return normalization.batch_norm(
            _with(spec, "batch_norm_param", use_global_stats=False), b, p
        )

    _caught(worker, case, batch, "forward caffe~ref64: t0")


def test_scale_on_axis_1_is_caught(worker: CaffeWorker) -> None:
    """A (3,) scale at axis 2 of a (2, 3, 3) bottom applied at axis 1, which fits too."""
    case = LayerCase(
        "Scale",
        (_x((2, 3, 3)), _x((3,), 1)),
        "scale_param { axis: 2 }",
    )

    def axis1(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return [b[0] * b[1].reshape(1, 3, 1)]

    _caught(worker, case, axis1, "forward caffe~ref64: t0")


def test_bias_without_its_diff_sum_over_the_batch_is_caught(worker: CaffeWorker) -> None:
    """A bias parameter whose diff is taken from the first sample only (a per-sample
    gradient where Caffe sums over the outer axes)."""
    case = LayerCase("Bias", (_x((3, 4, 2)),), "bias_param { axis: 1 num_axes: 1 }", seed=3)

    def first(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        x, bias = b[0], p[0].reshape(1, 4, 1)
        y = x + bias.detach()
        return [y + (bias - bias.detach()) * (torch.arange(3) == 0).reshape(3, 1, 1)]

    _caught(worker, case, first, f"backward caffe~ref64: d/d {LAYER}/0")


# -- no false alarm: library ports that are right pass --------------------------------------


def _f(spec: ref.LayerSpec, kind: str, name: str) -> float:
    return neuron.f32(spec.param(kind)[name])


def _lib_batch_norm(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
    """F.batch_norm, which applies the statistics fused as x / sigma - mean / sigma."""
    x, eps = b[0], _f(spec, "batch_norm_param", "eps")
    if normalization.use_global_stats(spec):
        f = float(p[2].detach().reshape(()))
        inv = 0.0 if f == 0 else 1.0 / f
        return [F.batch_norm(x, p[0].detach() * inv, p[1].detach() * inv, eps=eps)]
    if x.numel() == x.shape[1]:  # one value per channel: torch refuses, Caffe gives 0
        return [x * 0.0]
    return [F.batch_norm(x, None, None, training=True, eps=eps)]


def _lib_exp(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
    base = _f(spec, "exp_param", "base")
    ln = 1.0 if base == -1 else math.log(base)
    return [
        torch.exp((b[0] * _f(spec, "exp_param", "scale") + _f(spec, "exp_param", "shift")) * ln)
    ]


def _lib_log(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
    base = _f(spec, "log_param", "base")
    ln = 1.0 if base == -1 else math.log(base)
    t = b[0] * _f(spec, "log_param", "scale") + _f(spec, "log_param", "shift")
    return [torch.log(t) / ln]


LIBRARY_PORTS: dict[str, Fn] = {
    "ELU": lambda spec, b, p: [F.elu(b[0], alpha=_f(spec, "elu_param", "alpha"))],
    "Sigmoid": lambda spec, b, p: [torch.sigmoid(b[0])],
    "TanH": lambda spec, b, p: [torch.tanh(b[0])],
    "BNLL": lambda spec, b, p: [F.softplus(b[0])],
    "PReLU": lambda spec, b, p: [F.prelu(b[0], p[0].reshape(-1))],
    "Exp": _lib_exp,
    "Log": _lib_log,
    "BatchNorm": _lib_batch_norm,
}


@pytest.mark.parametrize("layer_type", sorted(LIBRARY_PORTS))
def test_a_right_library_port_passes(worker: CaffeWorker, layer_type: str) -> None:
    """PyTorch's own functions, which order the float32 operations their own way (expm1,
    1 / (1 + exp(-x)), softplus's threshold, the fused batch_norm), are within the bounds:
    the bounds hold for a direct port, not only for Caffe's algorithm. (Not Power, whose
    diff at x = 0 is Caffe's NaN, not the derivative: a port's 0 there is a finding.)"""

    @settings(max_examples=25, database=None, deadline=None)
    @given(case=layercheck.CASES[layer_type]())
    def prop(case: LayerCase) -> None:
        result = run_case(worker, case, port=LIBRARY_PORTS[layer_type])
        assert result.passed, result.summary()

    prop()


# -- kinks: Caffe's diff where the derivative is one-sided or undefined ---------------------


def test_kink_diffs_are_caffes(worker: CaffeWorker) -> None:
    """At x = 0 (and -0): AbsVal 0, ELU alpha g, PReLU a g (and no slope diff), BNLL g / 2;
    Caffe's and the reference's diffs agree exactly there."""
    x = np.array([[0.0, -0.0, 1.0, -1.0]], dtype=np.float32)
    g = np.array([[1.5, -2.0, 1.0, 1.0]], dtype=np.float32)
    expected = {
        "AbsVal": ("", [0.0, 0.0]),
        "ELU": ("elu_param { alpha: 0.5 }", [0.75, -1.0]),
        "BNLL": ("", [0.75, -1.0]),
    }
    for type_name, (params, at_zero) in expected.items():
        case = LayerCase(type_name, (x,), params)
        out = _caffe(worker, case, g)
        spec = spec_of(worker, case)
        mine = _ref_diff(case, spec, g).numpy()
        assert out["diff"][0, :2].tolist() == at_zero, type_name
        assert mine[0, :2].tolist() == at_zero, type_name
    slope = np.array([0.25], dtype=np.float32)
    case = LayerCase("PReLU", (x.reshape(1, 1, 4),), "", blobs=(slope,))
    gp = g.reshape(1, 1, 4)
    out = _caffe(worker, case, gp)
    assert out["diff"].reshape(-1)[:2].tolist() == [0.375, -0.5]
    # The slope diff sums g x over x <= 0: the zeros add nothing, x = -1 adds -1.
    assert out["param_diffs"][0].tolist() == [-1.0]


def test_power_diff_at_zero_is_caffes_nan(worker: CaffeWorker) -> None:
    """shift 0, power 3: Caffe's diff is power y / x, 0/0 = NaN at x = 0 where the
    derivative is 0; the reference gives the same NaN, and a port's autograd 0 is caught."""
    x = np.array([[0.0, 2.0, -1.5]], dtype=np.float32)
    g = np.ones_like(x)
    case = LayerCase("Power", (x,), "power_param { power: 3 }")
    out = _caffe(worker, case, g)
    assert np.isnan(out["diff"][0, 0]) and out["diff"][0, 1] == 12.0
    spec = spec_of(worker, case)
    assert np.isnan(_ref_diff(case, spec, g).numpy()[0, 0])
    assert run_case(worker, case).passed

    def autograd(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return [b[0] ** 3]

    result = run_case(worker, case, port=autograd)
    assert not result.passed
    assert "backward torch~ref64: d/d b0" in result.summary()


def test_power_zero_diff_scale_is_a_constant(worker: CaffeWorker) -> None:
    """power 0 gives 1 and scale 0 gives shift^power, with a zero diff, whatever x."""
    x = _x((2, 3), 5)
    g = _x((2, 3), 6)
    for params, value in (("power: 0 shift: 2", 1.0), ("power: 2 scale: 0 shift: 3", 9.0)):
        case = LayerCase("Power", (x,), f"power_param {{ {params} }}")
        out = _caffe(worker, case, g)
        assert (out["top"] == value).all() and (out["diff"] == 0).all(), params
        assert run_case(worker, case).passed


def test_batchnorm_zero_factor_means_zero_statistics(worker: CaffeWorker) -> None:
    """A factor of 0 makes the mean and variance 0 (not a division by 0): y = x / sqrt(eps),
    and the statistics blobs get no diff."""
    case = _bn_case("eps: 0.25", factor=0.0)
    out = _caffe(worker, case, np.ones_like(case.bottoms[0]))
    np.testing.assert_array_equal(out["top"], case.bottoms[0] / np.float32(0.5))
    assert all((d == 0).all() for d in out["param_diffs"])
    assert run_case(worker, case).passed


def test_invalid_parameters_are_named() -> None:
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"'bad' \(Exp\): base must be > 0 or -1"):
        neuron.exp(ref.LayerSpec("bad", "Exp", params={"exp_param": _exp(-2.0)}), [x], [])
    with pytest.raises(ValueError, match=r"'bad' \(Log\): base 1"):
        neuron.log(ref.LayerSpec("bad", "Log", params={"log_param": _exp(1.0)}), [x], [])
    spec = ref.LayerSpec("bad", "Scale", params={"scale_param": {"axis": 1, "bias_term": False}})
    with pytest.raises(ValueError, match=r"'bad' \(Scale\): blob of shape \(2,\)"):
        normalization.scale(spec, [x, torch.ones(2)], [])


def _exp(base: float) -> dict[str, float]:
    return {"base": base, "scale": 1.0, "shift": 0.0}
