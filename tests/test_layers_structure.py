"""Structure and loss layers: realistic port mistakes caught by the per-layer check against
real Caffe, and Caffe's backward where it is not the derivative of its forward (Eltwise MAX
ties, PROD at a zero bottom, the SigmoidCrossEntropyLoss kink, the SoftmaxWithLoss clamp)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from torch import Tensor

from crossval.layercheck import LayerCase, run_case
from crossval.layercheck.run import spec_of
from crossval.reference import layers as ref
from crossval.reference import losses
from crossval.reference.layers import LayerSpec
from crossval.worker import CaffeWorker

F32 = np.float32
Fn = Callable[[LayerSpec, Sequence[Tensor], Sequence[Tensor]], list[Tensor]]


def _x(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(F32)


def _with(spec: LayerSpec, kind: str, **fields: object) -> LayerSpec:
    params = {**spec.params, kind: {**spec.params[kind], **fields}}
    return LayerSpec(
        spec.name, spec.type, spec.bottoms, spec.tops, params, spec.phase, spec.set_fields
    )


def _caught(worker: CaffeWorker, case: LayerCase, wrong: Fn) -> str:
    """The case passes with the reference and fails with `wrong` as the float32 side (a port);
    returns the failure text."""
    assert run_case(worker, case).passed, run_case(worker, case).summary()
    result = run_case(worker, case, port=wrong)
    assert not result.passed, f"the wrong {case.type} passed: {result.summary()}"
    return result.summary()


def _original(type_name: str) -> Fn:
    return ref.LAYERS[type_name].forward


# ---- port mistakes, each caught ----------------------------------------------------------


def test_eltwise_coeff_ignored_is_caught(worker: CaffeWorker) -> None:
    case = LayerCase(
        "Eltwise", (_x(2, 3), _x(2, 3, seed=1)), "eltwise_param { coeff: 1 coeff: -1 }"
    )
    f = _original("Eltwise")

    def wrong(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        return f(_with(spec, "eltwise_param", coeff=[]), bottoms, blobs)

    assert "forward torch~ref64: t0" in _caught(worker, case, wrong)


def test_eltwise_max_tie_to_first_bottom_is_caught(worker: CaffeWorker) -> None:
    """torch.max / argmax send a tie's diff to bottom 0; Caffe's `a > b ? 0 : 1` to bottom 1."""
    a = _x(2, 4)
    case = LayerCase("Eltwise", (a, a.copy()), "eltwise_param { operation: MAX }", seed=3)

    def wrong(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        return [torch.stack(list(bottoms)).max(dim=0).values]

    text = _caught(worker, case, wrong)
    assert "backward torch~ref64: d/d b0" in text


def test_eltwise_prod_division_gradient_is_caught(worker: CaffeWorker) -> None:
    """Caffe's default (stable_prod_grad) multiplies the other bottoms; top / x gives NaN at a
    zero bottom."""
    a = _x(2, 3)
    a[0, 1] = 0.0
    case = LayerCase("Eltwise", (a, _x(2, 3, seed=1)), "eltwise_param { operation: PROD }")
    f = _original("Eltwise")

    def wrong(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        return f(_with(spec, "eltwise_param", stable_prod_grad=False), bottoms, blobs)

    assert "backward torch~ref64: d/d b0[0, 1]" in _caught(worker, case, wrong)


def test_concat_dim_ignored_is_caught(worker: CaffeWorker) -> None:
    case = LayerCase("Concat", (_x(2, 2, 3), _x(2, 2, 3, seed=1)), "concat_param { concat_dim: 2 }")

    def wrong(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        return [torch.cat(list(bottoms), dim=int(spec.param("concat_param")["axis"]))]

    assert "has shape" in _caught(worker, case, wrong)


def test_slice_point_as_widths_is_caught(worker: CaffeWorker) -> None:
    case = LayerCase("Slice", (_x(2, 6),), "slice_param { slice_point: 2 slice_point: 3 }", tops=3)

    def wrong(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        (x,) = bottoms
        w = [int(p) for p in spec.param("slice_param")["slice_point"]]
        return list(torch.split(x, [*w, x.shape[1] - sum(w)], dim=1))[:3]

    assert "has shape" in _caught(worker, case, wrong)


def test_split_diffs_not_summed_is_caught(worker: CaffeWorker) -> None:
    case = LayerCase("Split", (_x(3, 2),), "", tops=3, seed=4)

    def wrong(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        (x,) = bottoms
        return [x.view(x.shape), *(x.detach().clone() for _ in spec.tops[1:])]

    assert "backward torch~ref64: d/d b0" in _caught(worker, case, wrong)


def test_flatten_end_axis_ignored_is_caught(worker: CaffeWorker) -> None:
    case = LayerCase("Flatten", (_x(2, 3, 2, 2),), "flatten_param { axis: 1 end_axis: 2 }")

    def wrong(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        return [bottoms[0].flatten(1)]

    assert "has shape" in _caught(worker, case, wrong)


def test_reshape_axis_ignored_is_caught(worker: CaffeWorker) -> None:
    """shape { dim: 0 dim: -1 } from axis 1: (2, 3, 4) -> (2, 3, 4); over the whole blob it
    would give (2, 12)."""
    case = LayerCase(
        "Reshape", (_x(2, 3, 4),), "reshape_param { shape { dim: 0 dim: -1 } axis: 1 }"
    )
    f = _original("Reshape")

    def wrong(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        return f(_with(spec, "reshape_param", axis=0), bottoms, blobs)

    assert "has shape" in _caught(worker, case, wrong)


def test_crop_first_offset_for_every_axis_is_caught(worker: CaffeWorker) -> None:
    case = LayerCase(
        "Crop",
        (_x(1, 2, 5, 5), np.zeros((1, 2, 3, 3), F32)),
        "crop_param { axis: 2 offset: 1 offset: 2 }",
        no_diff=(1,),
    )
    f = _original("Crop")

    def wrong(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        return f(_with(spec, "crop_param", offset=[1]), bottoms, blobs)

    assert "forward torch~ref64: t0" in _caught(worker, case, wrong)


def test_softmax_over_last_axis_is_caught(worker: CaffeWorker) -> None:
    case = LayerCase("Softmax", (_x(2, 3, 2, 2),), "")

    def wrong(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        return [torch.softmax(bottoms[0], dim=-1)]

    assert "forward torch~ref64: t0" in _caught(worker, case, wrong)


def test_euclidean_loss_as_mse_mean_is_caught(worker: CaffeWorker) -> None:
    case = LayerCase("EuclideanLoss", (_x(4, 3), _x(4, 3, seed=1)), "", seed=2)

    def wrong(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        return [torch.nn.functional.mse_loss(bottoms[0], bottoms[1])]

    assert "forward torch~ref64: t0" in _caught(worker, case, wrong)


def _softmax_loss_case(params: str, logits: np.ndarray, labels: np.ndarray) -> LayerCase:
    return LayerCase("SoftmaxWithLoss", (logits, labels), params, no_diff=(1,), seed=5)


def test_softmax_loss_without_clamp_is_caught(worker: CaffeWorker) -> None:
    """log(p) with no FLT_MIN clamp: -inf where Caffe's per-sample loss caps near 87.34."""
    z = np.array([[0.0, 200.0, -200.0], [1.0, 2.0, 3.0]], F32)
    case = _softmax_loss_case("", z, np.array([2, 0], F32))

    def wrong(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        z, y = bottoms
        logp = torch.log(torch.softmax(z, 1)).gather(1, y.long().unsqueeze(1))
        return [-logp.mean()]

    assert "forward torch~ref64: t0" in _caught(worker, case, wrong)


def test_softmax_loss_ignored_labels_counted_is_caught(worker: CaffeWorker) -> None:
    case = _softmax_loss_case(
        "loss_param { ignore_label: 1 }", _x(4, 3), np.array([0, 1, 1, 2], F32)
    )
    f = _original("SoftmaxWithLoss")

    def wrong(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        # VALID's count taken over all labels: the loss of the valid ones divided by 4, not 2.
        (loss,) = f(spec, bottoms, blobs)
        return [loss * 2 / 4]

    assert "forward torch~ref64: t0" in _caught(worker, case, wrong)


def test_sigmoid_cross_entropy_mean_is_caught(worker: CaffeWorker) -> None:
    """BCEWithLogits' mean over elements, where Caffe divides by the batch size."""
    t = np.array([[0, 1, 0.25], [1, 0, 0.7]], F32)
    case = LayerCase("SigmoidCrossEntropyLoss", (_x(2, 3), t), "", no_diff=(1,), seed=6)

    def wrong(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        x, t = bottoms
        return [torch.nn.functional.binary_cross_entropy_with_logits(x, t.detach())]

    assert "forward torch~ref64: t0" in _caught(worker, case, wrong)


def test_sigmoid_cross_entropy_reads_normalization_presence(worker: CaffeWorker) -> None:
    """Unset normalization is BATCH_SIZE for this layer, an explicit VALID is VALID: both
    checked against Caffe, and they differ."""
    x, t = _x(2, 3), np.array([[0, 1, 0], [1, 1, 0]], F32)
    unset = LayerCase("SigmoidCrossEntropyLoss", (x, t), "", no_diff=(1,))
    valid = LayerCase(
        "SigmoidCrossEntropyLoss", (x, t), "loss_param { normalization: VALID }", no_diff=(1,)
    )
    tops = []
    for case in (unset, valid):
        assert run_case(worker, case).passed
        spec = spec_of(worker, case)
        tops.append(float(ref.forward(spec, [torch.from_numpy(x), torch.from_numpy(t)], [])[0]))
    assert tops[0] == pytest.approx(tops[1] * 3, rel=1e-6)


def test_smooth_l1_sigma_as_beta_is_caught(worker: CaffeWorker) -> None:
    param = (
        'python_param { module: "crossval.caffe_side.layers" layer: "SmoothL1Loss" '
        "param_str: '{\"sigma\": 3.0}' }"
    )
    case = LayerCase("Python", (_x(3, 2), _x(3, 2, seed=1)), param, seed=7)

    def wrong(spec: LayerSpec, bottoms: Sequence[Tensor], blobs: Sequence[Tensor]) -> list[Tensor]:
        a, b = bottoms
        loss = torch.nn.functional.smooth_l1_loss(a, b, beta=3.0, reduction="sum") / a.shape[0]
        return [loss.reshape(1)]

    assert "forward torch~ref64: t0" in _caught(worker, case, wrong)


# ---- Caffe's backward where it is not the derivative of the forward ------------------------


def _grads(case: LayerCase, worker: CaffeWorker, g: Sequence[np.ndarray]) -> list[Tensor | None]:
    spec = spec_of(worker, case)
    b = [torch.from_numpy(x.astype(np.float64)) for x in case.bottoms]
    _, gb, _ = ref.vjp(spec, b, [], [torch.from_numpy(x.astype(np.float64)) for x in g])
    return gb


def test_eltwise_max_ties_follow_caffes_mask(worker: CaffeWorker) -> None:
    """b0 = b1: the diff goes to bottom 1; b0 = b2 > b1: to bottom 0; b1 = b2: to bottom 1."""
    b0 = np.array([1.0, 2.0, 0.0], F32)
    b1 = np.array([1.0, -1.0, 3.0], F32)
    b2 = np.array([0.0, 2.0, 3.0], F32)
    case = LayerCase("Eltwise", (b0, b1, b2), "eltwise_param { operation: MAX }", seed=8)
    assert run_case(worker, case).passed
    gb = _grads(case, worker, [np.ones(3, F32)])
    got = np.stack([g.numpy() for g in gb if g is not None])
    assert got.tolist() == [[0, 1, 0], [1, 0, 1], [0, 0, 0]]


def test_eltwise_prod_division_form_is_nan_at_zero_as_in_caffe(worker: CaffeWorker) -> None:
    a = np.array([[0.0, 2.0, -1.5]], F32)
    b = np.array([[3.0, 0.5, 4.0]], F32)
    case = LayerCase(
        "Eltwise", (a, b), "eltwise_param { operation: PROD stable_prod_grad: false }", seed=9
    )
    assert run_case(worker, case).passed
    g0 = _grads(case, worker, [np.ones((1, 3), F32)])[0]
    assert g0 is not None and bool(torch.isnan(g0[0, 0])) and g0[0, 1] == 0.5


def test_sigmoid_cross_entropy_diff_at_zero_is_sigmoid_minus_target(worker: CaffeWorker) -> None:
    """At x = 0 the forward's |x| has a kink: autograd of the formula gives 1 - t there, Caffe
    sigmoid(0) - t = 0.5 - t."""
    x = np.array([[0.0, 0.0, 1.0]], F32)
    t = np.array([[1.0, 0.0, 1.0]], F32)
    case = LayerCase("SigmoidCrossEntropyLoss", (x, t), "", no_diff=(1,), seed=10)
    assert run_case(worker, case).passed
    g0 = _grads(case, worker, [np.array(2.0, F32)])[0]
    assert g0 is not None
    assert g0[0, :2].tolist() == [2 * (0.5 - 1.0), 2 * 0.5]


def test_softmax_loss_clamped_diff_is_p_minus_one(worker: CaffeWorker) -> None:
    """Past the FLT_MIN clamp the loss is flat, yet Caffe's diff stays p - onehot."""
    z = np.array([[0.0, 200.0]], F32)
    case = _softmax_loss_case("", z, np.array([0], F32))
    assert run_case(worker, case).passed
    g0 = _grads(case, worker, [np.array(1.0, F32)])[0]
    assert g0 is not None and g0[0].tolist() == pytest.approx([-1.0, 1.0])


# ---- refusals -----------------------------------------------------------------------------


def test_unknown_python_layer_is_named() -> None:
    spec = LayerSpec(
        "py",
        "Python",
        params={"python_param": {"module": "mylayers", "layer": "Fancy", "param_str": ""}},
    )
    with pytest.raises(ref.UnsupportedLayer, match=r"'py' has type 'Python \(mylayers.Fancy\)'"):
        ref.forward(spec, [torch.zeros(2, 1), torch.zeros(2, 1)], [])


def test_eltwise_prod_with_coeff_is_refused() -> None:
    spec = LayerSpec(
        "e",
        "Eltwise",
        params={
            "eltwise_param": {"operation": "PROD", "coeff": [1.0, 2.0], "stable_prod_grad": True}
        },
    )
    with pytest.raises(ValueError, match=r"'e' \(Eltwise\): coeff is only allowed with"):
        ref.forward(spec, [torch.ones(2), torch.ones(2)], [])


def test_concat_axis_and_concat_dim_together_are_refused() -> None:
    spec = LayerSpec(
        "c",
        "Concat",
        params={"concat_param": {"axis": 1, "concat_dim": 1}},
        set_fields={"concat_param": frozenset({"axis", "concat_dim"})},
    )
    with pytest.raises(ValueError, match=r"'c' \(Concat\): either axis or concat_dim"):
        ref.forward(spec, [torch.ones(1, 2), torch.ones(1, 2)], [])


def test_smooth_l1_layer_is_the_one_loss_implementation() -> None:
    """The Python layer wraps crossval.reference.losses.smooth_l1_loss (no second copy)."""
    a, b = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    spec = LayerSpec(
        "s",
        "Python",
        params={
            "python_param": {
                "module": "crossval.caffe_side.layers",
                "layer": "SmoothL1Loss",
                "param_str": json.dumps({"sigma": 2.0}),
            }
        },
    )
    (top,) = ref.forward(spec, [a, b], [])
    assert top.shape == (1,) and float(top[0]) == float(losses.smooth_l1_loss(a, b, 2.0))


def test_softmax_loss_second_top_is_refused() -> None:
    spec = LayerSpec(
        "l",
        "SoftmaxWithLoss",
        tops=("loss", "prob"),
        params={"softmax_param": {"axis": 1}, "loss_param": {}},
    )
    with pytest.raises(ValueError, match=r"'l' \(SoftmaxWithLoss\): a second top"):
        ref.forward(spec, [torch.zeros(2, 3), torch.zeros(2)], [])
