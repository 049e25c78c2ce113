"""The PyTorch reference alone (no Caffe): hand-computed values, structure, gradients."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from numpy.typing import NDArray
from torch import Tensor

import crossval.reference as ref
from crossval import heads as table

DTYPES = (torch.float32, torch.float64)
LN3 = math.log(3.0)
CAP = 126 * math.log(2.0)  # -log(FLT_MIN)


def assert_exact(actual: Tensor, desired: Tensor, what: str) -> None:
    """Bit-for-bit equality (dtype, shape and every value), with a readable message."""
    assert actual.dtype == desired.dtype, f"{what}: dtype {actual.dtype}, should be {desired.dtype}"
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape}, should be {desired.shape}"
    diff = (actual != desired).nonzero()
    if len(diff):
        i = tuple(int(k) for k in diff[0])
        pytest.fail(
            f"{what}: out{list(i)}={actual[i].item()!r}, but should be exactly "
            f"{desired[i].item()!r} ({len(diff)} of {actual.numel()} differ)"
        )


def set_ip(head: torch.nn.Module, name: str, weight: Tensor, bias: Tensor) -> None:
    state = head.state_dict()
    state[f"{name}.weight"] = weight
    state[f"{name}.bias"] = bias
    head.load_state_dict(state)


# ---------------------------------------------------------------- param_name


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        ("fc100", "fc100"),
        ("fc8-101", "fc8_101"),
        ("conv1/relu", "conv1_relu"),
        ("fc.a b", "fc_a_b"),
        ("8fc", "_8fc"),
    ],
)
def test_param_name(layer: str, expected: str) -> None:
    assert ref.param_name(layer) == expected
    assert expected.isidentifier()


def test_param_name_rejects_empty() -> None:
    with pytest.raises(ValueError):
        ref.param_name("")


# ---------------------------------------------------------------- heads: structure

Head = ref.SigmoidScaleHead | ref.ExpectationHead
HEADS: dict[str, tuple[Callable[[], Head], dict[str, tuple[int, ...]]]] = {
    "sigmoid_scale": (
        lambda: ref.SigmoidScaleHead(7),
        {"fc1.weight": (1, 7), "fc1.bias": (1,), "pred_age.weight": (1,)},
    ),
    "expectation_100": (
        lambda: ref.ExpectationHead(7),
        {"fc100.weight": (100, 7), "fc100.bias": (100,), "pred_age.weight": (1, 100)},
    ),
    "expectation_101": (
        lambda: ref.ExpectationHead(7, bins=101, ip_name="fc8-101"),
        {"fc8_101.weight": (101, 7), "fc8_101.bias": (101,), "pred_age.weight": (1, 101)},
    ),
}
# The same heads as the head table describes them (crossval.heads: head, K, InnerProduct name).
DESCRIBED = {
    "sigmoid_scale": ("sigmoid_scale", 100, ""),
    "expectation_100": ("expectation", 100, ""),
    "expectation_101": ("expectation", 101, "fc8-101"),
}


def described(case: str) -> tuple[table.Head, table.Case]:
    """The head table's row for `case` and a case of its shape (D = 7)."""
    name, bins, ip_name = DESCRIBED[case]
    x = np.zeros((1, 7), np.float32)
    shape = table.Case(name, "euclidean", x, x[:, :1], {}, bins=bins, ip_name=ip_name)
    return table.HEADS[name], shape


@pytest.mark.parametrize("case", HEADS)
def test_head_state_dict_keys_and_shapes(case: str) -> None:
    make, expected = HEADS[case]
    head = make()
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert list(shapes) == list(expected)
    assert shapes == expected


@pytest.mark.parametrize("case", HEADS)
def test_head_fixed_constants_are_buffers(case: str) -> None:
    head = HEADS[case][0]()
    row, shape = described(case)
    assert [n for n, _ in head.named_parameters()] == list(row.learnable(shape))
    assert [n for n, _ in head.named_buffers()] == [f"{row.fixed_layer}.weight"]
    assert row.fixed_layer == "pred_age"


@pytest.mark.parametrize("case", HEADS)
def test_head_float64_converts_everything(case: str) -> None:
    head = HEADS[case][0]().to(torch.float64)
    for key, value in head.state_dict().items():
        assert value.dtype == torch.float64, key
    out = head(torch.randn(3, 7, dtype=torch.float64))
    row, shape = described(case)
    assert list(out) == list(row.blobs(shape))
    for blob, value in out.items():
        assert value.dtype == torch.float64, blob


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_scale_constant_is_99(dtype: torch.dtype) -> None:
    head = ref.SigmoidScaleHead(3).to(dtype)
    assert_exact(head.state_dict()["pred_age.weight"], torch.tensor([99.0], dtype=dtype), "scale")


@pytest.mark.parametrize("bins", [100, 101])
@pytest.mark.parametrize("dtype", DTYPES)
def test_expectation_kernel_is_arange(bins: int, dtype: torch.dtype) -> None:
    head = ref.ExpectationHead(3, bins=bins).to(dtype)
    desired = torch.tensor([list(range(bins))], dtype=dtype)
    assert_exact(head.state_dict()["pred_age.weight"], desired, "pred_age kernel")


def test_expectation_names() -> None:
    head = ref.ExpectationHead(4, bins=101, ip_name="fc8-101")
    assert head.ip_layer == "fc8-101"
    assert list(head(torch.zeros(1, 4))) == ["fc8-101", "prob", "pred_age"]
    assert [n for n, _ in head.named_parameters()] == ["fc8_101.weight", "fc8_101.bias"]
    assert list(ref.ExpectationHead(4)(torch.zeros(1, 4))) == ["fc100", "prob", "pred_age"]
    assert list(ref.SigmoidScaleHead(4)(torch.zeros(1, 4))) == ["fc1", "pred01", "pred_age"]
    with pytest.raises(ValueError):
        ref.ExpectationHead(4, ip_name="prob")


# ---------------------------------------------------------------- heads: values


def test_expectation_head_matches_numpy_float64() -> None:
    rng = np.random.default_rng(0)
    n, c, h, w, k = 3, 2, 2, 2, 101
    x = rng.normal(size=(n, c, h, w))
    weight = rng.normal(size=(k, c * h * w))
    bias = rng.normal(size=k)
    head = ref.ExpectationHead(c * h * w, bins=k, ip_name="fc8-101").to(torch.float64)
    set_ip(head, "fc8_101", torch.from_numpy(weight), torch.from_numpy(bias))

    z = x.reshape(n, -1) @ weight.T + bias  # InnerProduct flattens NCHW in C order
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    age = (p * np.arange(k)).sum(axis=1, keepdims=True)

    out = head(torch.from_numpy(x))
    torch.testing.assert_close(out["fc8-101"], torch.from_numpy(z))
    torch.testing.assert_close(out["prob"], torch.from_numpy(p))
    torch.testing.assert_close(out["pred_age"], torch.from_numpy(age))


@pytest.mark.parametrize("dtype", DTYPES)
def test_expectation_softmax_is_over_bins(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    head = ref.ExpectationHead(5).to(dtype)
    x = 3 * torch.randn(4, 5, dtype=dtype)
    prob = head(x)["prob"]
    torch.testing.assert_close(prob.sum(dim=1), torch.ones(4, dtype=dtype))
    for i in range(4):
        torch.testing.assert_close(head(x[i : i + 1])["prob"][0], prob[i])


def test_sigmoid_scale_head_matches_numpy_float64() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3, 1, 2))
    weight = rng.normal(size=(1, 6))
    bias = rng.normal(size=1)
    head = ref.SigmoidScaleHead(6).to(torch.float64)
    set_ip(head, "fc1", torch.from_numpy(weight), torch.from_numpy(bias))
    z = x.reshape(4, -1) @ weight.T + bias
    out = head(torch.from_numpy(x))
    torch.testing.assert_close(out["fc1"], torch.from_numpy(z))
    torch.testing.assert_close(out["pred01"], torch.from_numpy(1 / (1 + np.exp(-z))))
    torch.testing.assert_close(out["pred_age"], torch.from_numpy(99 / (1 + np.exp(-z))))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_scale_head_saturates_exactly(dtype: torch.dtype) -> None:
    # Caffe's tanh form gives exactly 0 at -50; 1/(1+exp(50)) would give ~2e-22.
    head = ref.SigmoidScaleHead(1).to(dtype)
    set_ip(head, "fc1", torch.ones(1, 1, dtype=dtype), torch.zeros(1, dtype=dtype))
    out = head(torch.tensor([[50.0], [-50.0], [0.0]], dtype=dtype))
    assert_exact(out["pred_age"], torch.tensor([[99.0], [0.0], [49.5]], dtype=dtype), "pred_age")
    assert_exact(out["pred01"], torch.tensor([[1.0], [0.0], [0.5]], dtype=dtype), "pred01")


# ---------------------------------------------------------------- euclidean_loss


@pytest.mark.parametrize("dtype", DTYPES)
def test_euclidean_loss_values(dtype: torch.dtype) -> None:
    pred = torch.tensor([[1.0], [2.0], [3.0]], dtype=dtype)
    loss = ref.euclidean_loss(pred, torch.tensor([0.0, 0.0, 1.0], dtype=dtype))
    assert_exact(loss, torch.tensor(1.5, dtype=dtype), "(1 + 4 + 4) / 3 / 2")
    # Divided by N only, not by N * D (MSELoss would give 15 / 6).
    pred = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]], dtype=dtype)
    loss = ref.euclidean_loss(pred, torch.zeros(2, 3, 1, 1, dtype=dtype))
    assert_exact(loss, torch.tensor(3.75, dtype=dtype), "15 / 2 / 2")


def test_euclidean_loss_gradient() -> None:
    pred = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0.5, 0.0, 4.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(ref.euclidean_loss(pred, target), pred)
    torch.testing.assert_close(grad, (pred.detach() - target[:, None]) / 3)


@pytest.mark.parametrize("loss", [ref.euclidean_loss, ref.smooth_l1_loss])
def test_pair_loss_rejects_mismatched_shapes(loss: Callable[[Tensor, Tensor], Tensor]) -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 2\)"):
        loss(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        loss(torch.zeros(2, 3), torch.zeros(3, 2))


# ---------------------------------------------------------------- smooth_l1_loss


@pytest.mark.parametrize("dtype", DTYPES)
def test_smooth_l1_sigma1(dtype: torch.dtype) -> None:
    pred = torch.tensor([[0.5], [2.0], [-2.0]], dtype=dtype, requires_grad=True)
    loss = ref.smooth_l1_loss(pred, torch.zeros(3, dtype=dtype))
    # 0.5 * 0.25 (inside |x| < 1) + (2 - 0.5) twice, over N = 3
    torch.testing.assert_close(loss, torch.tensor(3.125 / 3, dtype=dtype))
    (grad,) = torch.autograd.grad(loss, pred)
    torch.testing.assert_close(grad, torch.tensor([[0.5], [1.0], [-1.0]], dtype=dtype) / 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_smooth_l1_sigma3(dtype: torch.dtype) -> None:
    # Boundary at 1/9: x = 0.1 is quadratic, x = -0.5 is linear.
    pred = torch.tensor([[0.1], [-0.5]], dtype=dtype, requires_grad=True)
    loss = ref.smooth_l1_loss(pred, torch.zeros(2, 1, dtype=dtype), sigma=3.0)
    desired = (0.5 * 9 * 0.1**2 + (0.5 - 0.5 / 9)) / 2
    torch.testing.assert_close(loss, torch.tensor(desired, dtype=dtype))
    (grad,) = torch.autograd.grad(loss, pred)
    torch.testing.assert_close(grad, torch.tensor([[9 * 0.1], [-1.0]], dtype=dtype) / 2)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 3.0])
def test_smooth_l1_matches_torch(sigma: float) -> None:
    torch.manual_seed(3)
    pred, target = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    desired = F.smooth_l1_loss(pred, target, beta=1 / sigma**2, reduction="sum") / 5
    torch.testing.assert_close(ref.smooth_l1_loss(pred, target, sigma=sigma), desired)


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.nan, math.inf])
def test_smooth_l1_rejects_bad_sigma(sigma: float) -> None:
    with pytest.raises(ValueError, match="sigma"):
        ref.smooth_l1_loss(torch.zeros(2, 1), torch.zeros(2), sigma=sigma)


# ---------------------------------------------------------------- softmax_with_loss

# (N=2, C=3, H=1, W=2): outer 2, inner 2, 4 positions; label 255 is ignored below.
LOGITS = [[[[0.5, -1.0]], [[2.0, 0.0]], [[-0.5, 3.0]]], [[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 0.0]]]]
LABELS = [[[0, 2]], [[255, 1]]]


def per_position_nll() -> NDArray[np.float64]:
    z = np.asarray(LOGITS, dtype=np.float64)
    lse = np.log(np.exp(z).sum(axis=1))
    picked = np.array([[z[0, 0, 0, 0], z[0, 2, 0, 1]], [np.nan, z[1, 1, 0, 1]]])
    out: NDArray[np.float64] = (lse[:, 0, :] - picked).ravel()
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("kwargs", "normalizer"),
    [
        ({"normalization": "VALID"}, 3),
        ({"normalization": "FULL"}, 4),
        ({"normalization": "BATCH_SIZE"}, 2),
        ({"normalization": "NONE"}, 1),
        ({"normalize": True}, 3),
        ({"normalize": False, "normalization": "NONE"}, 2),
    ],
)
def test_softmax_with_loss_normalizations(
    kwargs: dict[str, Any], normalizer: int, dtype: torch.dtype
) -> None:
    nll = per_position_nll()
    desired = np.nansum(nll) / normalizer
    logits = torch.tensor(LOGITS, dtype=dtype)
    for labels in (torch.tensor(LABELS), torch.tensor(LABELS, dtype=dtype).unsqueeze(1)):
        loss = ref.softmax_with_loss(logits, labels, ignore_label=255, **kwargs)
        torch.testing.assert_close(loss, torch.tensor(desired, dtype=dtype))


def test_softmax_with_loss_valid_without_ignore_counts_all() -> None:
    logits = torch.zeros(2, 3, dtype=torch.float64)
    loss = ref.softmax_with_loss(logits, torch.tensor([0, 2]))
    torch.testing.assert_close(loss, torch.tensor(LN3, dtype=torch.float64))


@pytest.mark.parametrize("normalization", ref.NORMALIZATIONS)
def test_softmax_with_loss_all_ignored_is_zero(normalization: str) -> None:
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = ref.softmax_with_loss(
        logits, torch.full((3,), -1), normalization=normalization, ignore_label=-1
    )
    assert_exact(loss.detach(), torch.tensor(0.0, dtype=torch.float64), "all-ignored loss")
    (grad,) = torch.autograd.grad(loss, logits)
    assert_exact(grad, torch.zeros(3, 4, dtype=torch.float64), "all-ignored grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_with_loss_clamps_at_flt_min(dtype: torch.dtype) -> None:
    logits = torch.tensor([[0.0, 1e4], [0.0, 0.0]], dtype=dtype, requires_grad=True)
    loss = ref.softmax_with_loss(logits, torch.tensor([0, 1]), normalization="NONE")
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, torch.tensor(CAP + math.log(2.0), dtype=dtype))
    # Caffe's backward ignores the clamp: (p - onehot) times the top diff, not 0.
    (grad,) = torch.autograd.grad(2.5 * loss, logits)
    desired = 2.5 * torch.tensor([[-1.0, 1.0], [0.5, -0.5]], dtype=dtype)
    torch.testing.assert_close(grad, desired)


def test_softmax_with_loss_truncates_labels_toward_zero() -> None:
    logits = torch.tensor([[0.3, -1.2, 2.0], [1.0, 0.5, -0.7]], dtype=torch.float64)
    as_float = ref.softmax_with_loss(logits, torch.tensor([2.9, -0.5], dtype=torch.float64))
    as_int = ref.softmax_with_loss(logits, torch.tensor([2, 0]))
    assert_exact(as_float, as_int, "labels 2.9, -0.5 vs 2, 0")
    desired = -torch.log_softmax(logits, dim=1)[[0, 1], [2, 0]].mean()
    torch.testing.assert_close(as_int, desired)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([[0, 1], [3, 0]]), r"label 3 at position \(1, 0\)"),
        (torch.tensor([[0, 1], [0, -1]]), r"label -1 at position \(1, 1\)"),
        (torch.tensor([[0.0, 3.5], [0.0, 0.0]]), r"label 3.5 \(cast to 3\) at position \(0, 1\)"),
    ],
)
def test_softmax_with_loss_rejects_out_of_range(labels: Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ref.softmax_with_loss(torch.zeros(2, 3, 2), labels)


def test_softmax_with_loss_ignored_label_may_be_out_of_range() -> None:
    loss = ref.softmax_with_loss(torch.zeros(2, 3), torch.tensor([255, 1]), ignore_label=255)
    torch.testing.assert_close(loss, torch.tensor(LN3))


def test_softmax_with_loss_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="labels shape"):
        ref.softmax_with_loss(torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="normalization"):
        ref.softmax_with_loss(torch.zeros(2, 3), torch.zeros(2), normalization="MEAN")


def test_softmax_with_loss_axis() -> None:
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 3))
    last = ref.softmax_with_loss(logits, labels, axis=-1, normalization="FULL")
    moved = ref.softmax_with_loss(logits.movedim(-1, 1), labels, normalization="FULL")
    torch.testing.assert_close(last, moved)


@given(data=st.data())
def test_softmax_with_loss_matches_numpy(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 4), label="N")
    c = data.draw(st.integers(1, 6), label="C")
    inner = data.draw(st.integers(1, 3), label="inner")
    normalization = data.draw(st.sampled_from(ref.NORMALIZATIONS), label="normalization")
    values = data.draw(
        st.lists(st.floats(-20, 20), min_size=n * c * inner, max_size=n * c * inner),
        label="logits",
    )
    labels = data.draw(
        st.lists(st.integers(-1, c - 1), min_size=n * inner, max_size=n * inner), label="labels"
    )
    z = np.asarray(values, dtype=np.float64).reshape(n, c, inner)
    lab = np.asarray(labels).reshape(n, inner)
    valid = lab != -1
    normalizer = {
        "VALID": int(valid.sum()),
        "FULL": n * inner,
        "BATCH_SIZE": n,
        "NONE": 1,
    }[normalization]
    # Expected value and gradient in numpy (|z| <= 20, so no probability underflows).
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    onehot = np.arange(c)[None, :, None] == np.where(valid, lab, 0)[:, None, :]
    nll = -np.log((p * onehot).sum(axis=1))
    desired = np.where(valid, nll, 0.0).sum() / max(normalizer, 1)
    desired_grad = (p - onehot) * valid[:, None, :] / max(normalizer, 1)

    logits = torch.from_numpy(z).requires_grad_()
    loss = ref.softmax_with_loss(
        logits, torch.from_numpy(lab), normalization=normalization, ignore_label=-1
    )
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, torch.tensor(desired, dtype=torch.float64))
    torch.testing.assert_close(grad, torch.from_numpy(desired_grad))


# ---------------------------------------------------------------- gradcheck (float64)


@pytest.mark.parametrize("normalization", ref.NORMALIZATIONS)
def test_gradcheck_softmax_with_loss(normalization: str) -> None:
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[[0, 2], [-1, 1]], [[1, 1], [2, -1]]])
    assert torch.autograd.gradcheck(
        lambda z: ref.softmax_with_loss(z, labels, normalization=normalization, ignore_label=-1),
        (logits,),
    )


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "euclidean": ref.euclidean_loss,
    "smooth_l1_sigma2": lambda a, b: ref.smooth_l1_loss(a, b, sigma=2.0),
}


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("head_name", HEADS)
def test_gradcheck_head_with_loss(head_name: str, loss_name: str) -> None:
    torch.manual_seed(6)
    head = HEADS[head_name][0]().to(torch.float64)
    loss = LOSSES[loss_name]
    x = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in head.named_parameters()]
    params = tuple(head.state_dict()[k].clone().requires_grad_() for k in names)
    # Targets 0.1 and 3 away from the prediction: with sigma 2 (kink at 0.25) one sample is
    # on the quadratic side and one on the linear side, both far from the kink.
    with torch.no_grad():
        target = head(x)["pred_age"][:, 0] + torch.tensor([0.1, -3.0], dtype=torch.float64)

    def composed(x: Tensor, *params: Tensor) -> Tensor:
        out = torch.func.functional_call(head, dict(zip(names, params, strict=True)), (x,))
        return loss(out["pred_age"], target)

    assert torch.autograd.gradcheck(composed, (x, *params))
