"""Weight transfer between Caffe params and a PyTorch state_dict: names, copies, errors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from numpy.typing import NDArray
from torch import nn

from crossval.errors import CrossvalError
from crossval.reference import ExpectationHead, SigmoidScaleHead
from crossval.transfer import (
    CaffeParams,
    TransferError,
    caffe_to_state_dict,
    state_dict_key,
    state_dict_to_caffe,
)

IN_FEATURES = 3

# float32 bit patterns a copy must keep: zeros of both signs, denormals (1e-45 is 0x00000001),
# the normal range's ends, infinities, and NaNs with assorted signs and payloads (0x7f800001 is
# a signalling NaN, which any arithmetic on the way would quiet).
SPECIAL_BITS = np.array(
    [
        0x00000000,  # 0.0
        0x80000000,  # -0.0
        0x00000001,  # 1e-45, smallest denormal
        0x80000001,  # -1e-45
        0x007FFFFF,  # largest denormal
        0x00800000,  # smallest normal
        0x7F7FFFFF,  # float32 max
        0xFF7FFFFF,  # -float32 max
        0x7F800000,  # inf
        0xFF800000,  # -inf
        0x7FC00000,  # quiet NaN
        0xFFC00000,  # negative quiet NaN
        0x7F800001,  # signalling NaN
        0x7FC12345,  # quiet NaN with a payload
        0xFFFFFFFF,  # all ones: a negative NaN
    ],
    dtype=np.uint32,
)

HeadFactory = Callable[[], nn.Module]
# (test id, factory, Caffe InnerProduct layer name, its state_dict prefix)
HEADS: list[tuple[str, HeadFactory, str, str]] = [
    ("sigmoid_scale", lambda: SigmoidScaleHead(IN_FEATURES), "fc1", "fc1"),
    ("expectation_K100", lambda: ExpectationHead(IN_FEATURES), "fc100", "fc100"),
    (
        "expectation_K101_fc8-101",
        lambda: ExpectationHead(IN_FEATURES, bins=101, ip_name="fc8-101"),
        "fc8-101",
        "fc8_101",
    ),
]
HEAD_PARAMS = pytest.mark.parametrize(
    ("make", "ip_layer", "ip_attr"),
    [pytest.param(make, layer, attr, id=name) for name, make, layer, attr in HEADS],
)


def bits_of(a: NDArray[np.float32]) -> NDArray[np.uint32]:
    assert a.dtype == np.float32, f"dtype {a.dtype}, should be float32"
    out: NDArray[np.uint32] = np.ascontiguousarray(a).view(np.uint32)
    return out


def assert_same_bits(actual: NDArray[np.float32], desired: NDArray[np.float32], what: str) -> None:
    """Same dtype, shape and bytes; NaN payloads and the sign of zero included."""
    assert actual.dtype == desired.dtype, f"{what}: dtype {actual.dtype}, not {desired.dtype}"
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape}, not {desired.shape}"
    a, d = bits_of(actual), bits_of(desired)
    bad = np.flatnonzero(a != d)
    assert bad.size == 0, (
        f"{what}: {bad.size} of {a.size} differ; first at flat {bad[0]}: "
        f"{a.flat[bad[0]]:#010x}, should be {d.flat[bad[0]]:#010x}"
    )


def assert_same_tensor(actual: torch.Tensor, desired: torch.Tensor, what: str) -> None:
    assert actual.dtype == desired.dtype, f"{what}: dtype {actual.dtype}, not {desired.dtype}"
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape}, not {desired.shape}"
    a = actual.detach().contiguous().numpy().tobytes()
    d = desired.detach().contiguous().numpy().tobytes()
    assert a == d, f"{what}: bytes differ"


def caffe_params(
    head: nn.Module, ip_layer: str, fill: Callable[[tuple[int, ...]], NDArray[np.float32]]
) -> CaffeParams:
    """Caffe params for `head`'s net: the InnerProduct weight and bias, and the fixed blob."""
    state = head.state_dict()
    ip_attr = state_dict_key(ip_layer, 0).rsplit(".", 1)[0]
    return {
        ip_layer: [
            fill(tuple(state[f"{ip_attr}.weight"].shape)),
            fill(tuple(state[f"{ip_attr}.bias"].shape)),
        ],
        "pred_age": [fill(tuple(state["pred_age.weight"].shape))],
    }


def layout_of(params: CaffeParams) -> dict[str, list[tuple[int, ...]]]:
    return {layer: [tuple(b.shape) for b in blobs] for layer, blobs in params.items()}


def special_fill(offset: int = 0) -> Callable[[tuple[int, ...]], NDArray[np.float32]]:
    """Fill arrays with SPECIAL_BITS, cycled (each array starting at its own offset)."""
    counter = [offset]

    def fill(shape: tuple[int, ...]) -> NDArray[np.float32]:
        n = int(np.prod(shape))
        idx = (np.arange(n) + counter[0]) % SPECIAL_BITS.size
        counter[0] += 1
        out: NDArray[np.float32] = SPECIAL_BITS[idx].view(np.float32).reshape(shape)
        return out

    return fill


def random_fill(seed: int) -> Callable[[tuple[int, ...]], NDArray[np.float32]]:
    rng = np.random.default_rng(seed)

    def fill(shape: tuple[int, ...]) -> NDArray[np.float32]:
        out: NDArray[np.float32] = rng.standard_normal(shape).astype(np.float32)
        return out

    return fill


def run(head: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out: dict[str, torch.Tensor] = head(x)
    return out


# ---------------------------------------------------------------- state_dict_key


@pytest.mark.parametrize(
    ("layer", "index", "key"),
    [
        ("fc8-101", 0, "fc8_101.weight"),
        ("fc8-101", 1, "fc8_101.bias"),
        ("fc1", 0, "fc1.weight"),
        ("fc100", 1, "fc100.bias"),
        ("pred_age", 0, "pred_age.weight"),
        ("conv1/relu", 0, "conv1_relu.weight"),
    ],
)
def test_state_dict_key_default(layer: str, index: int, key: str) -> None:
    assert state_dict_key(layer, index) == key
    assert state_dict_key(layer, index, {}) == key
    assert state_dict_key(layer, index, {"other/0": "x.y"}) == key


def test_state_dict_key_matches_reference_head() -> None:
    head = ExpectationHead(IN_FEATURES, bins=101, ip_name="fc8-101")
    assert set(head.state_dict()) == {
        state_dict_key("fc8-101", 0),
        state_dict_key("fc8-101", 1),
        state_dict_key("pred_age", 0),
    }


def test_state_dict_key_third_blob_needs_mapping() -> None:
    with pytest.raises(TransferError) as exc:
        state_dict_key("fc8-101", 2)
    msg = str(exc.value)
    assert "'fc8-101'" in msg
    assert "blob 2" in msg
    assert '"fc8-101/2"' in msg, f"message does not say how to map it: {msg}"
    assert isinstance(exc.value, CrossvalError)


def test_state_dict_key_mapping_overrides() -> None:
    mapping = {"fc8-101/0": "head.linear.weight", "fc8-101/2": "head.extra"}
    assert state_dict_key("fc8-101", 0, mapping) == "head.linear.weight"
    assert state_dict_key("fc8-101", 1, mapping) == "fc8_101.bias"
    assert state_dict_key("fc8-101", 2, mapping) == "head.extra"


# ---------------------------------------------------------------- round trips


@HEAD_PARAMS
def test_round_trip_special_values_bit_exact(
    make: HeadFactory, ip_layer: str, ip_attr: str
) -> None:
    head = make()
    params = caffe_params(head, ip_layer, special_fill())
    state = caffe_to_state_dict(params, head.state_dict())
    assert set(state) == {f"{ip_attr}.weight", f"{ip_attr}.bias", "pred_age.weight"}
    assert set(state) == set(head.state_dict())
    for layer, blobs in params.items():
        for i, value in enumerate(blobs):
            key = state_dict_key(layer, i)
            assert state[key].dtype == torch.float32
            assert_same_bits(state[key].numpy(), value, f"state_dict {key}")

    back = state_dict_to_caffe(state, layout_of(params))
    assert list(back) == list(params)
    for layer, blobs in params.items():
        assert len(back[layer]) == len(blobs)
        for i, value in enumerate(blobs):
            assert_same_bits(back[layer][i], value, f"Caffe param {layer}/{i}")


def test_special_values_cover_what_the_round_trip_must_keep() -> None:
    """The special fill really holds -0.0, 1e-45, huge values and NaN payloads."""
    values = SPECIAL_BITS.view(np.float32)
    assert np.signbit(values[1]) and values[1] == 0
    assert values[2] == np.float32(1e-45)
    assert values[6] == np.finfo(np.float32).max
    nan_bits = {int(b) for b in SPECIAL_BITS[np.isnan(values)]}
    assert {0x7FC00000, 0x7F800001, 0x7FC12345} <= nan_bits


@HEAD_PARAMS
@given(seed=st.integers(0, 2**32 - 1))
def test_round_trip_any_bit_pattern(
    make: HeadFactory, ip_layer: str, ip_attr: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)

    def fill(shape: tuple[int, ...]) -> NDArray[np.float32]:
        bits = rng.integers(0, 2**32, size=shape, dtype=np.uint32)
        out: NDArray[np.float32] = bits.view(np.float32)
        return out

    head = make()
    params = caffe_params(head, ip_layer, fill)
    back = state_dict_to_caffe(caffe_to_state_dict(params, head.state_dict()), layout_of(params))
    for layer, blobs in params.items():
        for i, value in enumerate(blobs):
            assert_same_bits(back[layer][i], value, f"Caffe param {layer}/{i}")


@HEAD_PARAMS
def test_round_trip_state_dict_first(make: HeadFactory, ip_layer: str, ip_attr: str) -> None:
    torch.manual_seed(0)
    head = make()
    original = head.state_dict()
    layout = {
        ip_layer: [
            tuple(original[f"{ip_attr}.weight"].shape),
            tuple(original[f"{ip_attr}.bias"].shape),
        ],
        "pred_age": [tuple(original["pred_age.weight"].shape)],
    }
    params = state_dict_to_caffe(original, layout)
    assert_same_bits(params[ip_layer][0], original[f"{ip_attr}.weight"].numpy(), "weight")
    state = caffe_to_state_dict(params, head.state_dict())
    assert set(state) == set(original)
    for key, value in original.items():
        assert_same_tensor(state[key], value, key)


def test_transfers_copy_rather_than_alias() -> None:
    head = SigmoidScaleHead(IN_FEATURES)
    params = caffe_params(head, "fc1", random_fill(1))
    kept = params["fc1"][0].copy()
    state = caffe_to_state_dict(params, head.state_dict())
    params["fc1"][0][...] = 7.0
    assert_same_bits(state["fc1.weight"].numpy(), kept, "state_dict after the source changed")

    back = state_dict_to_caffe(state, layout_of(params))
    state["fc1.weight"].fill_(-3.0)
    assert_same_bits(back["fc1"][0], kept, "Caffe param after the state_dict changed")


def test_mapping_overrides_in_both_directions() -> None:
    head = SigmoidScaleHead(IN_FEATURES)
    mapping = {"ip/0": "fc1.weight", "ip/1": "fc1.bias", "scale/0": "pred_age.weight"}
    fill = random_fill(2)
    params: CaffeParams = {"ip": [fill((1, IN_FEATURES)), fill((1,))], "scale": [fill((1,))]}
    state = caffe_to_state_dict(params, head.state_dict(), mapping)
    assert set(state) == {"fc1.weight", "fc1.bias", "pred_age.weight"}
    assert_same_bits(state["fc1.bias"].numpy(), params["ip"][1], "fc1.bias")
    assert_same_bits(state["pred_age.weight"].numpy(), params["scale"][0], "pred_age.weight")

    back = state_dict_to_caffe(state, layout_of(params), mapping)
    assert list(back) == ["ip", "scale"]
    for layer, blobs in params.items():
        for i, value in enumerate(blobs):
            assert_same_bits(back[layer][i], value, f"{layer}/{i}")

    with pytest.raises(TransferError):
        caffe_to_state_dict(params, head.state_dict())  # without the mapping: no "ip.weight"


def test_float32_params_into_float64_module_are_exact() -> None:
    head = SigmoidScaleHead(IN_FEATURES).double()
    finite = np.array([-0.0, 1e-45, -1e-45, 3.4028235e38, 0.1, -2.5], dtype=np.float32)
    params: CaffeParams = {
        "fc1": [finite[:3].reshape(1, 3), finite[3:4]],
        "pred_age": [finite[4:5]],
    }
    state = caffe_to_state_dict(params, head.state_dict())
    for layer, blobs in params.items():
        for i, value in enumerate(blobs):
            key = state_dict_key(layer, i)
            assert state[key].dtype == torch.float64
            assert_same_tensor(state[key], torch.from_numpy(value.astype(np.float64)), key)
    # Every float64 value came from float32, so the way back is allowed and exact.
    back = state_dict_to_caffe(state, layout_of(params))
    for layer, blobs in params.items():
        for i, value in enumerate(blobs):
            assert_same_bits(back[layer][i], value, f"{layer}/{i}")


# ---------------------------------------------------------------- outputs


def load_directly(head: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set `head`'s tensors in place, by attribute, without load_state_dict or transfer."""
    targets = dict(head.named_parameters()) | dict(head.named_buffers())
    assert set(targets) == set(state)
    with torch.no_grad():
        for name, value in state.items():
            targets[name].copy_(value)


@HEAD_PARAMS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transferred_weights_give_the_same_output(
    make: HeadFactory, ip_layer: str, ip_attr: str, dtype: torch.dtype
) -> None:
    torch.manual_seed(3)
    x = torch.randn(4, IN_FEATURES, dtype=dtype) * 3
    head = make().to(dtype)
    params = caffe_params(head, ip_layer, random_fill(4))
    params["pred_age"] = [head.state_dict()["pred_age.weight"].numpy().astype(np.float32)]

    transferred = make().to(dtype)
    before = run(transferred, x)
    result = transferred.load_state_dict(caffe_to_state_dict(params, transferred.state_dict()))
    assert not result.missing_keys and not result.unexpected_keys
    out = run(transferred, x)

    direct = make().to(dtype)
    load_directly(
        direct,
        {
            state_dict_key(layer, i): torch.from_numpy(v).to(dtype)
            for layer, blobs in params.items()
            for i, v in enumerate(blobs)
        },
    )
    want = run(direct, x)

    # the same blobs in the same order (the heads' blobs against the table: test_reference)
    assert list(out) == list(want) and want
    for blob in want:
        assert_same_tensor(out[blob], want[blob], f"blob {blob}")
    # The transfer changed something: the check above is not comparing two untouched heads.
    assert not torch.equal(before[ip_layer], out[ip_layer])


@HEAD_PARAMS
def test_state_dict_through_caffe_keeps_the_output(
    make: HeadFactory, ip_layer: str, ip_attr: str
) -> None:
    torch.manual_seed(5)
    source = make()
    x = torch.randn(3, IN_FEATURES)
    state = source.state_dict()
    layout = {
        ip_layer: [
            tuple(state[f"{ip_attr}.weight"].shape),
            tuple(state[f"{ip_attr}.bias"].shape),
        ],
        "pred_age": [tuple(state["pred_age.weight"].shape)],
    }
    params = state_dict_to_caffe(state, layout)

    target = make()  # other random weights
    assert not torch.equal(run(target, x)[ip_layer], run(source, x)[ip_layer])
    target.load_state_dict(caffe_to_state_dict(params, target.state_dict()))
    want, out = run(source, x), run(target, x)
    for blob in want:
        assert_same_tensor(out[blob], want[blob], f"blob {blob}")


# ---------------------------------------------------------------- errors: Caffe -> state_dict


def sigmoid_params() -> tuple[nn.Module, CaffeParams]:
    head = SigmoidScaleHead(4)
    fill = random_fill(6)
    return head, {"fc1": [fill((1, 4)), fill((1,))], "pred_age": [fill((1,))]}


def test_caffe_param_without_state_dict_entry() -> None:
    head, params = sigmoid_params()
    params["fc2"] = [np.zeros((3, 4), dtype=np.float32)]
    with pytest.raises(TransferError) as exc:
        caffe_to_state_dict(params, head.state_dict())
    msg = str(exc.value)
    for part in ("fc2/0", "(3, 4)", "'fc2.weight'", "fc1.weight", "pred_age.weight"):
        assert part in msg, f"{part!r} not in {msg!r}"


def test_caffe_param_shape_mismatch() -> None:
    head, params = sigmoid_params()
    params["fc1"][0] = np.zeros((1, 5), dtype=np.float32)
    with pytest.raises(TransferError) as exc:
        caffe_to_state_dict(params, head.state_dict())
    msg = str(exc.value)
    for part in ("fc1/0", "(1, 5)", "(1, 4)", "'fc1.weight'"):
        assert part in msg, f"{part!r} not in {msg!r}"


def test_state_dict_entry_without_caffe_param() -> None:
    head, params = sigmoid_params()
    del params["pred_age"]
    with pytest.raises(TransferError) as exc:
        caffe_to_state_dict(params, head.state_dict())
    msg = str(exc.value)
    assert "pred_age.weight (1,)" in msg, msg
    assert "fc1" not in msg, f"covered entries named as extra: {msg}"


def test_two_layers_whose_names_collide() -> None:
    head = ExpectationHead(2, bins=101, ip_name="fc8-101")
    fill = random_fill(7)
    params: CaffeParams = {
        "fc8-101": [fill((101, 2)), fill((101,))],
        "fc8_101": [fill((101, 2))],
        "pred_age": [fill((1, 101))],
    }
    with pytest.raises(TransferError) as exc:
        caffe_to_state_dict(params, head.state_dict())
    msg = str(exc.value)
    for part in ("fc8-101/0", "fc8_101/0", "'fc8_101.weight'"):
        assert part in msg, f"{part!r} not in {msg!r}"


def test_two_params_mapped_to_one_key() -> None:
    head, params = sigmoid_params()
    params["copy"] = [params["fc1"][0].copy()]
    with pytest.raises(TransferError) as exc:
        caffe_to_state_dict(params, head.state_dict(), {"copy/0": "fc1.weight"})
    msg = str(exc.value)
    for part in ("copy/0", "fc1/0", "'fc1.weight'"):
        assert part in msg, f"{part!r} not in {msg!r}"


# ---------------------------------------------------------------- errors: state_dict -> Caffe


def test_layout_param_without_state_dict_entry() -> None:
    state = SigmoidScaleHead(4).state_dict()
    with pytest.raises(TransferError) as exc:
        state_dict_to_caffe(state, {"fc1": [(1, 4), (1,)], "pred_age": [(1,)], "fc2": [(3, 4)]})
    msg = str(exc.value)
    for part in ("fc2/0", "(3, 4)", "'fc2.weight'"):
        assert part in msg, f"{part!r} not in {msg!r}"


def test_layout_shape_mismatch() -> None:
    state = SigmoidScaleHead(4).state_dict()
    with pytest.raises(TransferError) as exc:
        state_dict_to_caffe(state, {"fc1": [(1, 4), (2,)], "pred_age": [(1,)]})
    msg = str(exc.value)
    for part in ("fc1/1", "'fc1.bias'", "(1,)", "(2,)"):
        assert part in msg, f"{part!r} not in {msg!r}"


def test_state_dict_entry_without_layout_param_is_named() -> None:
    state = SigmoidScaleHead(4).state_dict()
    with pytest.raises(TransferError) as exc:
        state_dict_to_caffe(state, {"fc1": [(1, 4), (1,)]})
    msg = str(exc.value)
    assert "pred_age.weight" in msg
    assert "fc1" not in msg, f"covered entries named as extra: {msg}"


def test_state_dict_entry_without_layout_param_has_its_shape() -> None:
    state = SigmoidScaleHead(4).state_dict()
    with pytest.raises(TransferError) as exc:
        state_dict_to_caffe(state, {"fc1": [(1, 4), (1,)]})
    assert "pred_age.weight (1,)" in str(exc.value)


@pytest.mark.parametrize(
    "value",
    [0.1, 1.0 + 2.0**-30, 1e300, -1e300, 1e-50, 2.0**-150 * 3],
    ids=["0.1", "1+2^-30", "overflow", "-overflow", "underflow", "between-denormals"],
)
def test_float64_not_representable_in_float32_raises(value: float) -> None:
    state = {
        "fc1.weight": torch.tensor([[0.5, value]], dtype=torch.float64),
        "fc1.bias": torch.zeros(1),
    }
    with pytest.raises(TransferError) as exc:
        state_dict_to_caffe(state, {"fc1": [(1, 2), (1,)]})
    msg = str(exc.value)
    assert "'fc1.weight'" in msg and "float64" in msg and "float32" in msg, msg


def test_float64_representable_in_float32_passes_as_float32() -> None:
    values = [0.5, -0.0, 2.0**-149, -(2.0**-149), float(np.finfo(np.float32).max), 0.1]
    values[-1] = float(np.float32(0.1))  # 0.1 rounded to float32 first: representable
    values += [float("inf"), float("-inf")]
    state = {"fc1.weight": torch.tensor([values], dtype=torch.float64)}
    out = state_dict_to_caffe(state, {"fc1": [(1, len(values))]})
    assert_same_bits(out["fc1"][0], np.array([values], dtype=np.float32), "fc1/0")
    assert np.signbit(out["fc1"][0][0, 1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrower_floats_pass_as_float32(dtype: torch.dtype) -> None:
    t = torch.tensor([[-0.0, 1.5, 65504.0 if dtype == torch.float16 else 2.0**100]], dtype=dtype)
    out = state_dict_to_caffe({"fc1.weight": t}, {"fc1": [(1, 3)]})
    assert_same_bits(out["fc1"][0], t.to(torch.float32).numpy(), "fc1/0")


def test_float64_nan_is_representable() -> None:
    t = torch.tensor([[float("nan"), 1.0]], dtype=torch.float64)
    round_trip = t.to(torch.float32).to(torch.float64)
    assert t.numpy().tobytes() == round_trip.numpy().tobytes()  # the premise holds
    out = state_dict_to_caffe({"fc1.weight": t}, {"fc1": [(1, 2)]})
    assert_same_bits(out["fc1"][0], t.to(torch.float32).numpy(), "fc1/0")
