"""Vision layers against real Caffe: realistic port mistakes are caught on cases where they
matter, and the semantics where Caffe is not the textbook (MAX pooling ties, the LRN running
sum, the kernel-less convolution) are checked explicitly."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import Tensor

from crossval import layercheck
from crossval.layercheck import LayerCase, run_case
from crossval.reference import layers as ref
from crossval.reference.layers import vision
from crossval.tolerances import LIBM_ULPS, U32, gamma
from crossval.worker import CaffeWorker


def _x(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> np.ndarray[Any, Any]:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _with(spec: ref.LayerSpec, kind: str, **changes: Any) -> ref.LayerSpec:
    params = {**spec.params, kind: {**spec.params[kind], **changes}}
    return ref.LayerSpec(spec.name, spec.type, spec.bottoms, spec.tops, params, spec.phase)


def _caught(
    worker: CaffeWorker,
    case: LayerCase,
    wrong: ref.LayerFn,
    where: str,
) -> str:
    """`case` passes with the reference and fails with `wrong` as the float32 side; the
    failure text names `where` (a comparison such as "forward torch~ref64: t0", or a shape)."""
    result = run_case(worker, case)
    assert result.passed, result.summary()
    result = run_case(worker, case, port=wrong)
    assert not result.passed
    summary = result.summary()
    assert where in summary, summary
    return summary


# -- Pooling -------------------------------------------------------------------------------


def test_pooling_floor_rounding_is_caught(worker: CaffeWorker) -> None:
    """A 6 -> 2 pool where Caffe's CEIL gives 3 (kernel 3, stride 2)."""
    case = LayerCase("Pooling", (_x((2, 2, 6, 7)),), "pooling_param { kernel_size: 3 stride: 2 }")

    def floor(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return vision.pooling(_with(spec, "pooling_param", round_mode="FLOOR"), b, p)

    _caught(worker, case, floor, "has shape (2, 2, 2, 3) in the float32 side, (2, 2, 3, 3)")


def test_pooling_last_window_rule_is_caught(worker: CaffeWorker) -> None:
    """H = 5, kernel 2, stride 2, pad 1: ceil gives 4 windows, but the 4th would start at
    6 = H + pad, in the right padding, so Caffe drops it. A port that pads explicitly and
    then pools without padding (Pad + AveragePool) keeps it."""
    case = LayerCase(
        "Pooling",
        (_x((1, 2, 5, 5)),),
        "pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 }",
    )

    def pad_then_pool(
        spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]
    ) -> list[Tensor]:
        padded = F.pad(b[0], (1, 1, 1, 1))
        return [F.avg_pool2d(padded, 2, 2, 0, ceil_mode=True)]

    _caught(worker, case, pad_then_pool, "has shape (1, 2, 4, 4) in the float32 side, (1, 2, 3, 3)")


def test_pooling_ave_divisor_without_padding_is_caught(worker: CaffeWorker) -> None:
    """count_include_pad=False: border windows divided by their cells in the image only."""
    case = LayerCase(
        "Pooling",
        (_x((2, 1, 5, 5)),),
        "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }",
    )

    def no_pad(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        g = vision.pool_geometry(spec, b[0].shape)
        return [
            F.avg_pool2d(b[0], g.kernel, g.stride, g.pad, ceil_mode=True, count_include_pad=False)
        ]

    _caught(worker, case, no_pad, "forward torch~ref64: t0")


def test_max_pooling_ignores_padding(worker: CaffeWorker) -> None:
    """A port padding MAX pooling with zeros: wrong where a border window is all negative."""
    x = -np.abs(_x((1, 2, 4, 4))) - 1
    case = LayerCase("Pooling", (x,), "pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 }")

    def zero_pad(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        g = vision.pool_geometry(spec, b[0].shape)
        padded = F.pad(b[0], (g.pad[1], g.pad[1], g.pad[0], g.pad[0]))
        return [F.max_pool2d(padded, g.kernel, g.stride, 0, ceil_mode=True)]

    _caught(worker, case, zero_pad, "forward torch~ref64: t0")


def test_max_pooling_ties_go_to_the_first_maximum(worker: CaffeWorker) -> None:
    """Caffe's strict `>` scan sends a tied window's diff to its first cell (row-major), not
    shared and not the last; the reference does the same, and a last-maximum port is caught
    in the backward only."""
    x = np.zeros((1, 1, 2, 3), np.float32)
    spec = ref.LayerSpec(
        "p",
        "Pooling",
        tops=("t",),
        params={
            "pooling_param": {
                "pool": "MAX",
                "kernel_size": 2,
                "kernel_h": 0,
                "kernel_w": 0,
                "stride": 1,
                "stride_h": 0,
                "stride_w": 0,
                "pad": 0,
                "pad_h": 0,
                "pad_w": 0,
                "global_pooling": False,
                "round_mode": "CEIL",
            }
        },
    )
    g = torch.tensor([[[[1.0, 10.0]]]], dtype=torch.float64)
    _, (gx,), _ = ref.vjp(spec, [torch.from_numpy(x).double()], [], [g])
    assert gx is not None
    assert gx.tolist() == [[[[1.0, 10.0, 0.0], [0.0, 0.0, 0.0]]]]

    ties = np.round(_x((2, 2, 5, 5), seed=3)).astype(np.float32)
    case = LayerCase("Pooling", (ties,), "pooling_param { pool: MAX kernel_size: 3 stride: 1 }")

    def last(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        flipped = vision.pooling(spec, [b[0].flip(2, 3)], p)[0]
        return [flipped.flip(2, 3)]

    summary = _caught(worker, case, last, "backward torch~ref64: d/d b0")
    assert "forward" not in summary


def test_max_pooling_mask_top(worker: CaffeWorker) -> None:
    """The second top of MAX pooling is the first maximum's index h * W + w, as a float."""
    ties = np.round(_x((1, 2, 4, 5), seed=4)).astype(np.float32)
    case = LayerCase(
        "Pooling", (ties,), "pooling_param { pool: MAX kernel_size: 2 stride: 2 }", tops=2
    )
    result = run_case(worker, case)
    assert result.passed, result.summary()
    assert any(c.blob == "t1" for c in result.comparisons)


# -- Convolution ---------------------------------------------------------------------------


def test_regrouped_convolution_is_caught(worker: CaffeWorker) -> None:
    """Groups are contiguous channel ranges; a port taking every group-th channel fails."""
    case = LayerCase(
        "Convolution",
        (_x((2, 4, 4, 4)),),
        "convolution_param { num_output: 4 group: 2 kernel_size: 3 pad: 1 }",
        seed=5,
    )

    def interleaved(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return vision.convolution(spec, [b[0][:, [0, 2, 1, 3]]], p)

    _caught(worker, case, interleaved, "forward torch~ref64: t0")


def test_flipped_kernel_is_caught(worker: CaffeWorker) -> None:
    """Caffe's Convolution is a cross-correlation; a true (flipped-kernel) convolution fails."""
    case = LayerCase(
        "Convolution",
        (_x((1, 2, 5, 6)),),
        "convolution_param { num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 "
        "dilation: 2 }",
        seed=6,
    )

    def flipped(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return vision.convolution(spec, b, [p[0].flip(2, 3), *p[1:]])

    _caught(worker, case, flipped, "forward torch~ref64: t0")


def test_swapped_pad_axes_are_caught(worker: CaffeWorker) -> None:
    """pad_h and pad_w read the wrong way round."""
    case = LayerCase(
        "Convolution",
        (_x((1, 1, 4, 4)),),
        "convolution_param { num_output: 1 kernel_size: 3 pad_h: 1 pad_w: 2 bias_term: false }",
        seed=7,
    )

    def swapped(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return vision.convolution(_with(spec, "convolution_param", pad_h=2, pad_w=1), b, p)

    _caught(worker, case, swapped, "in the float32 side")


def test_kernel_less_convolution_on_n_by_k(worker: CaffeWorker) -> None:
    """The seed's expectation head: Convolution(1, no bias, no kernel) on the N x K softmax,
    kernel arange(K) by surgery, is prob @ arange(K)."""
    k = 101
    prob = np.random.default_rng(8).dirichlet(np.ones(k), size=4).astype(np.float32)
    kernel = np.arange(k, dtype=np.float32).reshape(1, k)
    case = LayerCase(
        "Convolution",
        (prob,),
        "convolution_param { num_output: 1 bias_term: false engine: CAFFE }",
        blobs=(kernel,),
    )
    result = run_case(worker, case)
    assert result.passed, result.summary()
    spec = ref.LayerSpec(
        "c",
        "Convolution",
        params={"convolution_param": dict(_spec_params(worker, case))},
    )
    (age,) = ref.forward(
        spec, [torch.from_numpy(prob).double()], [torch.from_numpy(kernel).double()]
    )
    assert age.shape == (4, 1)
    np.testing.assert_array_equal(age.numpy()[:, 0], prob.astype(np.float64) @ np.arange(k))


def _spec_params(worker: CaffeWorker, case: LayerCase) -> dict[str, Any]:
    from crossval.layercheck.run import spec_of

    return dict(spec_of(worker, case).params["convolution_param"])


# -- Deconvolution -------------------------------------------------------------------------


def test_transposed_deconvolution_weights_are_caught(worker: CaffeWorker) -> None:
    """Deconvolution's weight is (C_in, num_output / group, k); a port reading it as
    Convolution's (num_output, C_in / group, k) fails."""
    case = LayerCase(
        "Deconvolution",
        (_x((2, 3, 3, 3)),),
        "convolution_param { num_output: 3 kernel_size: 2 stride: 2 }",
        seed=9,
    )

    def transposed(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return vision.deconvolution(spec, b, [p[0].transpose(0, 1), *p[1:]])

    _caught(worker, case, transposed, "forward torch~ref64: t0")


# -- LRN -----------------------------------------------------------------------------------


def test_lrn_alpha_not_divided_is_caught(worker: CaffeWorker) -> None:
    case = LayerCase("LRN", (_x((2, 6, 3, 3)),), "lrn_param { local_size: 5 alpha: 1.0 }")

    def undivided(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        return vision.lrn(
            _with(spec, "lrn_param", alpha=5.0 * spec.param("lrn_param")["alpha"]), b, p
        )

    _caught(worker, case, undivided, "forward torch~ref64: t0")


def test_lrn_within_channel_ignores_k(worker: CaffeWorker) -> None:
    """WITHIN_CHANNEL is Power(shift 1): a port adding k there fails."""
    case = LayerCase(
        "LRN",
        (_x((1, 2, 4, 4)),),
        "lrn_param { local_size: 3 alpha: 1.0 k: 2.0 norm_region: WITHIN_CHANNEL }",
    )

    def with_k(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
        q = vision.lrn_params(spec, b[0].shape)
        avg = F.avg_pool2d(b[0] * b[0], q.size, 1, (q.size - 1) // 2, count_include_pad=True)
        k = float(spec.param("lrn_param")["k"])
        return [b[0] * (k + q.alpha * avg).pow(-q.beta)]

    _caught(worker, case, with_k, "forward torch~ref64: t0")


def test_lrn_running_sum_error_is_allowed(worker: CaffeWorker) -> None:
    """Large squares in the first channels, small ones after (the Levi-Hassner LRN): Caffe's
    running sum carries the large squares' rounding into the later channels' scale, so its
    top is off there by more than a direct window sum's bound, while the reference (a direct
    sum, in float32) is within that. The layer's bound allows both."""
    c, size, beta = 12, 5, 0.75
    x = np.full((1, c, 2, 2), 0.7071, np.float32)
    x[:, :2] = 3001.7
    x = x * np.float32(1.0 + np.random.default_rng(10).random(x.shape) * 0.1).astype(np.float32)
    case = LayerCase(
        "LRN",
        (x.astype(np.float32),),
        f"lrn_param {{ local_size: {size} alpha: 1e-4 beta: {beta} }}",
    )
    result = run_case(worker, case)
    assert result.passed, result.summary()
    direct = (beta * gamma(size + 3) + (LIBM_ULPS + 2) * U32) * 1.0
    by_check = {c.check: c for c in result.comparisons if c.blob == "t0"}
    caffe, port = by_check["forward caffe~ref64"], by_check["forward torch~ref64"]
    rel_caffe = caffe.err[:, 4:] / np.abs(caffe.desired[:, 4:])
    rel_port = port.err / np.maximum(np.abs(port.desired), 1e-30)
    assert rel_caffe.max() > direct, rel_caffe.max()
    assert rel_port.max() <= direct


# -- parameters Caffe rejects --------------------------------------------------------------


def _spec(
    worker: CaffeWorker, type_name: str, params: str, shape: tuple[int, ...]
) -> ref.LayerSpec:
    from crossval.layercheck.run import spec_of

    return spec_of(worker, LayerCase(type_name, (np.zeros(shape, np.float32),), params))


@pytest.mark.parametrize(
    ("type_name", "params", "shape", "message"),
    [
        (
            "Convolution",
            "convolution_param { num_output: 4 group: 3 kernel_size: 1 }",
            (1, 6, 2, 2),
            "group 3 must divide",
        ),
        (
            "Convolution",
            "convolution_param { num_output: 2 kernel_h: 2 kernel_w: 1 }",
            (1, 1, 2, 2, 2),
            "kernel_h & kernel_w can only",
        ),
        (
            "Convolution",
            "convolution_param { num_output: 2 kernel_size: 3 kernel_h: 2 kernel_w: 2 }",
            (1, 1, 4, 4),
            "not both",
        ),
        (
            "Convolution",
            "convolution_param { num_output: 2 kernel_size: 1 stride_w: 2 }",
            (1, 1, 4, 4),
            "stride dimensions must be nonzero",
        ),
        (
            "Convolution",
            "convolution_param { num_output: 1 kernel_size: 5 }",
            (1, 1, 3, 3),
            "exceeds the padded input",
        ),
        (
            "Pooling",
            "pooling_param { kernel_size: 2 pad: 2 }",
            (1, 1, 4, 4),
            "must be smaller than the kernel",
        ),
        (
            "Pooling",
            "pooling_param { global_pooling: true kernel_size: 2 }",
            (1, 1, 4, 4),
            "cannot be specified",
        ),
        (
            "Pooling",
            "pooling_param { kernel_size: 1 stride: 3 }",
            (1, 1, 5, 5),
            "starts at 6, past the input",
        ),
        (
            "Pooling",
            "pooling_param { pool: STOCHASTIC kernel_size: 2 }",
            (1, 1, 4, 4),
            "not implemented",
        ),
        ("LRN", "lrn_param { local_size: 4 }", (1, 3, 2, 2), "odd values for local_size"),
    ],
)
def test_parameters_caffe_rejects_are_named(
    worker: CaffeWorker, type_name: str, params: str, shape: tuple[int, ...], message: str
) -> None:
    """Each raises a ValueError naming the layer (Caffe aborts on a CHECK, divides by zero, or
    in the empty-window pooling scatters a diff through index -1)."""
    spec = _spec(worker, type_name, params, shape)
    with pytest.raises(ValueError, match=rf"layer 'layer' \({type_name}\): .*{message}"):
        ref.forward(spec, [torch.zeros(shape, dtype=torch.float64)], [torch.zeros(1)] * 2)


# -- real nets' layers at their own sizes ----------------------------------------------------


@pytest.mark.parametrize(
    ("type_name", "params", "shape", "scale"),
    [
        # Levi and Hassner's age net: conv1 (on a smaller image: the same 147-term sums),
        # pool1 (56 -> 28 by CEIL, 27 by floor), norm1 on
        # large post-ReLU activations (the false alarm), conv2.
        (
            "Convolution",
            "convolution_param { num_output: 96 kernel_size: 7 stride: 4 }",
            (1, 3, 115, 115),
            100.0,
        ),
        ("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }", (2, 96, 56, 56), 1.0),
        ("LRN", "lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }", (2, 96, 28, 28), 1e3),
        (
            "Convolution",
            "convolution_param { num_output: 256 kernel_size: 5 pad: 2 }",
            (1, 96, 14, 14),
            1.0,
        ),
        # CaffeNet-style grouped conv and LRN with k 2; GoogLeNet's final AVE pool.
        (
            "Convolution",
            "convolution_param { num_output: 256 kernel_size: 5 pad: 2 group: 2 }",
            (1, 96, 13, 13),
            1.0,
        ),
        ("LRN", "lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 k: 2 }", (1, 256, 13, 13), 1e3),
        ("Pooling", "pooling_param { pool: AVE kernel_size: 7 stride: 1 }", (2, 64, 7, 7), 1.0),
    ],
)
def test_real_net_layers(
    worker: CaffeWorker, type_name: str, params: str, shape: tuple[int, ...], scale: float
) -> None:
    """Real nets' layers at full size (long accumulations, 96 and 256 channels) pass."""
    x = np.maximum(_x(shape, seed=11, scale=scale), 0).astype(np.float32)  # post-ReLU
    case = LayerCase(type_name, (x,), params, seed=12, weight_scale=0.05)
    result = run_case(worker, case)
    assert result.passed, result.summary()


# -- right library ports pass --------------------------------------------------------------


def _torch_conv(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
    """F.conv2d as a converter writes it (2-D, channel axis 1)."""
    g = vision.conv_geometry(spec, b[0].shape)
    bias = p[1] if g.bias_term else None
    return [F.conv2d(x, p[0], bias, g.stride, g.pad, g.dilation, g.group) for x in b]


def _torch_pool(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
    """nn.MaxPool2d / AvgPool2d with ceil_mode as round_mode, padding counted."""
    g = vision.pool_geometry(spec, b[0].shape)
    ceil = spec.param("pooling_param")["round_mode"] == "CEIL"
    if g.method == "MAX":
        return [F.max_pool2d(b[0], g.kernel, g.stride, g.pad, ceil_mode=ceil)]
    return [F.avg_pool2d(b[0], g.kernel, g.stride, g.pad, ceil_mode=ceil)]


def _torch_lrn(spec: ref.LayerSpec, b: Sequence[Tensor], p: Sequence[Tensor]) -> list[Tensor]:
    """F.local_response_norm (ACROSS_CHANNELS)."""
    q = spec.param("lrn_param")
    return [F.local_response_norm(b[0], int(q["local_size"]), q["alpha"], q["beta"], q["k"])]


def _fits_torch(case: LayerCase) -> bool:
    x = case.bottoms[0]
    if case.type == "Convolution":
        return x.ndim == 4 and "axis" not in case.params
    if case.type == "Pooling":
        # PyTorch wants pad <= kernel / 2, and has no mask top.
        if case.tops != 1 or "global" in case.params:
            return False
        fields = dict(f.split(": ") for f in re.findall(r"\w+: \w+", case.params))
        kernel = [int(v) for k, v in fields.items() if k.startswith("kernel")]
        pads = [int(v) for k, v in fields.items() if k.startswith("pad")]
        return 2 * max(pads, default=0) <= min(kernel)
    return "ACROSS" in case.params


@pytest.mark.parametrize(
    ("type_name", "port"),
    [("Convolution", _torch_conv), ("Pooling", _torch_pool), ("LRN", _torch_lrn)],
)
def test_library_ports_pass(worker: CaffeWorker, type_name: str, port: ref.LayerFn) -> None:
    """The bounds hold for PyTorch's own layers too (no false alarm on a right port)."""

    @settings(database=None, max_examples=60)
    @given(case=layercheck.CASES[type_name]().filter(_fits_torch))
    def prop(case: LayerCase) -> None:
        result = run_case(worker, case, port=port)
        assert result.passed, result.summary()

    prop()
