"""validate-port's engine (crossval.portcheck) against real Caffe: the reference as a port
passes every local check, the buggy ports are caught at the right layer, a correct port at a
saturated sigmoid raises no false alarm, segments, determinism and param findings."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from ports import dex, heads, tiny
from torch import Tensor, nn

from crossval.errors import UsageError
from crossval.portcheck.command import check_port, generated, port_examples
from crossval.portcheck.engine import ExampleVerdict, Finding, PortChecker, PortExample
from crossval.portcheck.refport import reference_port
from crossval.reference.layers import UnsupportedLayer
from crossval.worker import CaffeWorker


@pytest.fixture(scope="module")
def nets(worker: CaffeWorker, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = {
        "tiny": worker.prototxt("tiny_cnn", bins=7),
        "dex32": worker.prototxt("dex_vgg16", size=32),
        "sigmoid": worker.prototxt("sigmoid_scale", features=16, deploy=True),
        "expectation": worker.prototxt("expectation", features=16, deploy=True),
        "in_place": _IN_PLACE,
    }
    init = tmp_path_factory.mktemp("init") / "expectation.caffemodel"
    worker.surgery(out["expectation"], phase="TEST", out=str(init))
    out["expectation.weights"] = str(init)
    return out


def _weights(nets: dict[str, str], net: str) -> str:
    return nets.get(net + ".weights", "")


def _run(
    worker: CaffeWorker, nets: dict[str, str], net: str, port: nn.Module, ex: PortExample
) -> tuple[PortChecker, ExampleVerdict]:
    checker = PortChecker(worker, nets[net], port, weights=_weights(nets, net))
    return checker, checker.run(ex)


def _clean(checker: PortChecker, v: ExampleVerdict) -> None:
    assert checker.fault(v) is None, "\n".join(map(str, v.findings))
    assert not v.findings, "\n".join(map(str, v.findings))
    assert v.comparisons and all(c.passed for c in v.comparisons)


# -- the reference as a port --------------------------------------------------------------


@pytest.mark.parametrize("net", ["tiny", "sigmoid", "expectation", "dex32"])
def test_reference_port_passes_every_local_check(
    worker: CaffeWorker, nets: dict[str, str], net: str
) -> None:
    """float32 and float64 reference ports: no finding on the port's side, and Caffe within
    each layer's bound of the reference on Caffe's own blobs (the engine's Caffe side)."""
    ex = PortExample(7, 1.0, 3.0)
    for dtype in (torch.float32,) if net == "dex32" else (torch.float32, torch.float64):
        port = reference_port(worker, nets[net], dtype=dtype, weights=_weights(nets, net))
        checker, v = _run(worker, nets, net, port, ex)
        _clean(checker, v)
        assert not v.segment_layers or net == "dex32"  # DEX's in-place ReLUs: segments
        if dtype == torch.float64:
            # float64 blobs are the reference itself: every forward error is 0
            fwd = [c for c in v.comparisons if c.check == "forward port~ref64"]
            assert fwd and max(c.max_abs for c in fwd) == 0.0


def test_reference_port_refuses_an_unsupported_layer(worker: CaffeWorker) -> None:
    text = (
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }'
        '\nlayer { name: "thr" type: "Threshold" bottom: "data" top: "thr" }\n'
    )
    with pytest.raises(UnsupportedLayer, match="'thr' has type 'Threshold'"):
        reference_port(worker, text)


# -- buggy ports, each at its layer ----------------------------------------------------------


def _fault(checker: PortChecker, v: ExampleVerdict) -> Finding:
    fault = checker.fault(v)
    assert fault is not None, "no finding"
    return fault


@pytest.mark.parametrize(
    ("net", "make", "layer", "kind"),
    [
        ("tiny", tiny.make_pool_floor, "pool1 (Pooling)", "shape"),
        ("tiny", tiny.make_softmax_dim0, "prob (Softmax)", "forward"),
        ("expectation", heads.expectation_kernel_from_one, "pred_age (Convolution)", "fixed"),
        ("expectation", heads.expectation_softmax_over_batch, "prob (Softmax)", "forward"),
        ("sigmoid", heads.sigmoid_scale_100, "pred_age (Scale)", "fixed"),
        ("expectation", heads.expectation_trainable_kernel, "pred_age (Convolution)", "fixed"),
    ],
)
def test_buggy_ports_are_caught_at_their_layer(
    worker: CaffeWorker,
    nets: dict[str, str],
    net: str,
    make: Callable[[], nn.Module],
    layer: str,
    kind: str,
) -> None:
    checker, v = _run(worker, nets, net, make(), PortExample(3, 1.0, 3.0))
    fault = _fault(checker, v)
    assert fault.layer.startswith(layer) and fault.kind == kind and fault.local, str(fault)


def test_pool_floor_names_caffes_rounding(worker: CaffeWorker, nets: dict[str, str]) -> None:
    checker, v = _run(worker, nets, "tiny", tiny.make_pool_floor(), PortExample(0))
    assert "pool1: (N, 4, 4, 4), Caffe (N, 4, 5, 5); Caffe rounds pooled sizes up" in str(
        _fault(checker, v)
    )


@pytest.mark.parametrize(
    ("make", "layer"),
    [(dex.make_bgr_swap, "conv1_1 (Convolution)")],
)
def test_dex_ports_are_caught_at_their_layer(
    worker: CaffeWorker, nets: dict[str, str], make: Callable[..., nn.Module], layer: str
) -> None:
    """DEX's ReLUs and Dropouts run in place, so each convolution or InnerProduct is checked
    with its in-place layers as one segment; the fault names that segment's first layer.
    (make_flatten_nhwc is no bug at size 32, where pool5 is 1 x 1.)"""
    checker, v = _run(worker, nets, "dex32", make(size=32), PortExample(1))
    assert _fault(checker, v).layer.startswith(layer), str(checker.fault(v))


# -- saturated sigmoid: no false alarm ---------------------------------------------------


class _NaiveSigmoidHead(nn.Module):
    """A correct port of the seed's sigmoid head written as most people would: float32
    1 / (1 + exp(-x)), not Caffe's 0.5 tanh(0.5 x) + 0.5."""

    clamp = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(heads.FEATURES, 1)
        self.pred_age = nn.Module()
        self.pred_age.register_buffer("weight", torch.tensor([99.0]))

    def forward(self, pool5: Tensor) -> dict[str, Tensor]:
        z = self.fc1(pool5)
        y = torch.clamp(1 / (1 + torch.exp(-z)), max=self.clamp)
        scale: Tensor = self.pred_age.weight  # type: ignore[assignment]
        return {"fc1": z, "pred01": y, "pred_age": y * scale}


class _TorchSigmoidHead(_NaiveSigmoidHead):
    """torch.sigmoid: the naive formula's gradient is NaN where exp(-x) overflows (x below
    about -88), which the no-false-alarm property finds; torch.sigmoid's is not."""

    def forward(self, pool5: Tensor) -> dict[str, Tensor]:
        z = self.fc1(pool5)
        y = torch.sigmoid(z)
        scale: Tensor = self.pred_age.weight  # type: ignore[assignment]
        return {"fc1": z, "pred01": y, "pred_age": y * scale}


class _ClampedSigmoidHead(_NaiveSigmoidHead):
    """A "numerically safe" sigmoid clamped below 1 - 1e-3: wrong at 7.3, and its gradient
    there is 0."""

    clamp = 1 - 1e-3


def _saturated(batch: int = 4) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    """fc1 = 7.3 (1 - sigmoid about 6.7e-4) in every sample, up to float32 rounding."""
    rng = np.random.default_rng(0)
    pool5 = np.abs(rng.standard_normal((batch, heads.FEATURES))) + 0.5
    pool5 = (pool5 / pool5.sum(axis=1, keepdims=True) * heads.FEATURES).astype(np.float32)
    w = np.full((1, heads.FEATURES), 7.3 / heads.FEATURES, np.float32)
    params = {"fc1": [w, np.zeros(1, np.float32)], "pred_age": [np.array([99.0], np.float32)]}
    return {"pool5": pool5}, params


def test_saturated_sigmoid_gives_no_false_alarm(worker: CaffeWorker, nets: dict[str, str]) -> None:
    """Pre-activation about 7.3 (1 - y about 7e-4): gradients compared, all within bound;
    a sigmoid clamped at 1 - 1e-3 is caught there, forward and backward."""
    arrays = _saturated()
    z = arrays[0]["pool5"].astype(np.float64) @ arrays[1]["fc1"][0].T.astype(np.float64)
    saturation = 1.0 / (1.0 + np.exp(z))  # 1 - sigmoid(z): the case is in the hard region
    assert np.all((saturation > 6e-4) & (saturation < 7e-4)), saturation
    checker = PortChecker(worker, nets["sigmoid"], _NaiveSigmoidHead())
    v = checker.run(PortExample(0, batch=4), arrays)
    _clean(checker, v)
    assert any(c.check == "backward port~ref64" and c.blob == "d/d fc1" for c in v.comparisons)
    checker = PortChecker(worker, nets["sigmoid"], _ClampedSigmoidHead())
    v = checker.run(PortExample(0, batch=4), arrays)
    fault = _fault(checker, v)
    assert fault.layer.startswith("pred01 (Sigmoid)") and fault.kind == "forward", str(fault)
    assert any(f.kind == "backward" and f.key == "d/d fc1" for f in v.findings)


# -- segments ----------------------------------------------------------------------------


class _Only(nn.Module):
    """A port that returns only some blobs (as a converter exporting the outputs does)."""

    def __init__(self, inner: nn.Module, keep: set[str]) -> None:
        super().__init__()
        self.inner = inner
        self.keep = keep

    def forward(self, **inputs: Tensor) -> dict[str, Tensor]:
        return {k: v for k, v in self.inner(**inputs).items() if k in self.keep}

    def state_dict(self, *args: object, **kwargs: object) -> dict[str, Tensor]:  # type: ignore[override]
        return self.inner.state_dict(*args, **kwargs)  # type: ignore[arg-type, no-any-return]

    def named_parameters(
        self, *args: object, **kwargs: object
    ) -> Iterator[tuple[str, nn.Parameter]]:  # type: ignore[override]
        return self.inner.named_parameters(*args, **kwargs)  # type: ignore[arg-type]


class _NoReLU(tiny.TinyCNN):
    """A converter that dropped relu_fc1 (a parameterless layer)."""

    def forward(self, data: Tensor) -> dict[str, Tensor]:
        conv1 = self.conv1(data)
        pool1 = F.max_pool2d(F.relu(conv1), kernel_size=2, stride=2, ceil_mode=True)
        fc1 = self.fc1(pool1.reshape(pool1.shape[0], -1))
        fc2 = self.fc2(fc1)
        return {"prob": torch.softmax(fc2, dim=1)}


def test_outputs_only_port_is_checked_through_one_segment(
    worker: CaffeWorker, nets: dict[str, str]
) -> None:
    good = _Only(tiny.make(), {"prob"})
    checker, v = _run(worker, nets, "tiny", good, PortExample(5, 1.0, 3.0))
    _clean(checker, v)
    assert not v.local_layers and "relu_fc1" in v.segment_layers and "fc1" in v.not_returned
    for bad in (_Only(tiny.make_softmax_dim0(), {"prob"}), _NoReLU().eval()):
        checker, v = _run(worker, nets, "tiny", bad, PortExample(5, 1.0, 3.0))
        fault = _fault(checker, v)
        assert not fault.local and "relu_fc1 (ReLU)" in fault.layer, str(fault)


# -- the port as users run it ----------------------------------------------------------------


class _FunctionalDropout(tiny.TinyCNN):
    """F.dropout's default is training=True: active whatever eval() says."""

    def forward(self, data: Tensor) -> dict[str, Tensor]:
        blobs = super().forward(data)
        drop1 = F.dropout(blobs["relu_fc1"], 0.5)
        fc2 = self.fc2(drop1)
        return {**blobs, "drop1": drop1, "fc2": fc2, "prob": torch.softmax(fc2, dim=1)}


def test_active_dropout_is_not_deterministic(worker: CaffeWorker, nets: dict[str, str]) -> None:
    checker, v = _run(worker, nets, "tiny", _FunctionalDropout(), PortExample(2))
    fault = _fault(checker, v)
    assert fault.kind == "nondeterministic" and fault.layer.startswith("drop1 (Dropout)")
    assert "random: dropout" in fault.text, fault.text


def test_port_made_in_training_mode_is_run_in_eval(
    worker: CaffeWorker, nets: dict[str, str]
) -> None:
    checker, v = _run(worker, nets, "tiny", tiny.make_dropout_active(), PortExample(2))
    _clean(checker, v)
    assert any("run in eval()" in n and "drop1 (Dropout)" in n for n in v.notes), v.notes


def test_extra_port_parameter_is_a_finding(worker: CaffeWorker, nets: dict[str, str]) -> None:
    port = heads.sigmoid()
    port.pred_age.register_parameter("bias", nn.Parameter(torch.zeros(1)))
    checker, v = _run(worker, nets, "sigmoid", port, PortExample(0))
    fault = _fault(checker, v)
    assert fault.kind == "unmapped" and fault.layer.startswith("pred_age (Scale)")
    assert "'pred_age.bias'" in fault.text
    report = check_port(worker, nets["sigmoid"], heads.sigmoid(), generated(2))
    assert report.exit_code == 0, report.text()


def test_frozen_learnable_param_is_a_finding(worker: CaffeWorker, nets: dict[str, str]) -> None:
    port = heads.sigmoid()
    port.fc1.weight.requires_grad_(False)
    checker, v = _run(worker, nets, "sigmoid", port, PortExample(0))
    fault = _fault(checker, v)
    assert fault.kind == "frozen" and fault.layer.startswith("fc1 (InnerProduct)"), str(fault)


def test_given_weights_are_copied_into_the_port_once(
    worker: CaffeWorker, nets: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With a net's given weights (--weights, no --generate) the port's tensors are not
    copied again while they hold them unchanged (same storage, same version); a weight the
    port changes unseen (through .data) is still caught, on the reference's own weights,
    and one changed in place in the open is copied again."""
    model = str(tmp_path_factory.mktemp("w") / "tiny.caffemodel")
    _, params = PortChecker(worker, nets["tiny"], tiny.make()).arrays(PortExample(0))
    worker.save(nets["tiny"], params, model)
    port = tiny.make()
    checker = PortChecker(worker, nets["tiny"], port, weights=model, generate=False)
    _clean(checker, checker.run(PortExample(1)))
    with torch.no_grad():
        port.fc1.weight.mul_(2.0)  # in the open: its version moves, so it is copied again
    _clean(checker, checker.run(PortExample(2)))
    port.fc1.weight.data.mul_(1.5)  # unseen by the version counter: not copied again
    fault = _fault(checker, checker.run(PortExample(3)))
    assert fault.layer.startswith("fc1 (InnerProduct)") and fault.kind == "forward", str(fault)


def test_missing_port_tensor_is_bad_usage(worker: CaffeWorker, nets: dict[str, str]) -> None:
    with pytest.raises(UsageError, match=r"fc1/0 .* has no port tensor 'fc1.weight'"):
        PortChecker(worker, nets["sigmoid"], heads.renamed())


def test_report_text_and_exit(worker: CaffeWorker, nets: dict[str, str]) -> None:
    good = check_port(worker, nets["tiny"], tiny.make(), generated(3))
    assert good.exit_code == 0 and good.examples_run == 3
    assert "MATCH" in good.text() and "run in eval()" in good.text()
    bad = check_port(worker, nets["tiny"], tiny.make_softmax_dim0(), generated(3))
    assert bad.exit_code == 1 and bad.examples_run == 1
    assert "first failing layer: prob (Softmax)" in bad.text(), bad.text()


# -- no false alarms -----------------------------------------------------------------------


_GOOD: dict[str, list[Callable[[CaffeWorker, dict[str, str]], nn.Module]]] = {
    "in_place": [
        lambda w, n: _InPlacePort(False),
        lambda w, n: reference_port(w, n["in_place"]),
        lambda w, n: _Only(_InPlacePort(False), {"pool1"}),
    ],
    "tiny": [
        lambda w, n: reference_port(w, n["tiny"]),
        lambda w, n: tiny.make(),
        lambda w, n: _Only(tiny.make(), {"prob", "fc1"}),
    ],
    "sigmoid": [lambda w, n: heads.sigmoid(), lambda w, n: _TorchSigmoidHead()],
    "expectation": [
        lambda w, n: reference_port(w, n["expectation"], weights=n["expectation.weights"]),
        lambda w, n: heads.expectation(),
    ],
}


@pytest.mark.parametrize("net", sorted(_GOOD))
def test_no_false_alarm(worker: CaffeWorker, nets: dict[str, str], net: str) -> None:
    checkers = [
        PortChecker(worker, nets[net], make(worker, nets), weights=_weights(nets, net))
        for make in _GOOD[net]
    ]

    @settings(max_examples=max(settings().max_examples // 2, 10), database=None)
    @given(ex=port_examples(2))
    def prop(ex: PortExample) -> None:
        for checker in checkers:
            _clean(checker, checker.run(ex))

    prop()


def test_naive_sigmoid_gradient_overflow_is_caught(
    worker: CaffeWorker, nets: dict[str, str]
) -> None:
    """Found by the property: 1 / (1 + exp(-x)) in float32 has a NaN gradient at x = -100."""
    inputs, params = _saturated(2)
    params["fc1"][0] = -params["fc1"][0] * (100 / 7.3)
    checker = PortChecker(worker, nets["sigmoid"], _NaiveSigmoidHead())
    fault = _fault(checker, checker.run(PortExample(0), (inputs, params)))
    assert fault.layer.startswith("pred01 (Sigmoid)") and fault.kind == "backward", str(fault)
    assert "d/d fc1" in fault.text and "=nan" in fault.text


def test_segment_bound_is_wider_than_local(worker: CaffeWorker, nets: dict[str, str]) -> None:
    """The segment carries each layer's error: its bound at prob is above the local one."""
    ex = PortExample(4, 1.0, 3.0)
    _, local = _run(worker, nets, "tiny", tiny.make(), ex)
    _, seg = _run(worker, nets, "tiny", _Only(tiny.make(), {"prob"}), ex)

    def bound(v: ExampleVerdict) -> float:
        c = next(c for c in v.comparisons if c.check == "forward port~ref64" and c.blob == "prob")
        return float(np.max(c.bound))

    assert bound(seg) > bound(local)


def test_caffe_side_reports_a_disagreement_distinctly(
    worker: CaffeWorker, nets: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Caffe's blobs are checked against the reference too: with a deliberately wrong
    Softmax reference (over the batch axis), Caffe's prob is reported as Caffe's."""
    from crossval.reference import layers as ref

    right = ref.LAYERS["Softmax"]

    def wrong(spec: ref.LayerSpec, bottoms: list[Tensor], blobs: list[Tensor]) -> list[Tensor]:
        return [torch.softmax(bottoms[0], dim=0)]

    monkeypatch.setitem(ref.LAYERS, "Softmax", ref.LayerType("Softmax", wrong, right.formula))
    report = check_port(worker, nets["tiny"], tiny.make(), generated(1))
    assert report.exit_code == 1
    assert report.caffe_findings and report.caffe_findings[0]["layer"].startswith("prob (Softmax)")
    assert "Caffe disagrees with Caffe's semantics" in report.text(), report.text()


class _Raises(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


def test_port_exception_is_a_finding_at_its_module(
    worker: CaffeWorker, nets: dict[str, str]
) -> None:
    port = tiny.make()
    port.fc2.__class__ = _Raises
    report = check_port(worker, nets["tiny"], port, generated(2))
    assert report.exit_code == 1 and report.fault is not None
    fault = report.fault
    assert fault["kind"] == "exception" and fault["layer"].startswith("fc2 (InnerProduct)")
    assert "RuntimeError: mat1 and mat2" in fault["text"] and "module 'fc2'" in fault["text"]


@pytest.mark.parametrize("loss", ["euclidean", "softmax_with_loss", "smooth_l1"])
def test_reference_port_on_nets_with_a_loss(worker: CaffeWorker, loss: str) -> None:
    """Train nets (labels among the inputs, a loss at the top, SmoothL1 a Python layer whose
    top does not follow the batch): the top diff seeds the loss, every layer checked."""
    text = worker.prototxt("expectation", features=16, loss=loss)
    report = check_port(worker, text, reference_port(worker, text), generated(3))
    assert report.exit_code == 0 and report.examples_run == 3, report.text()
    assert "loss" in report.local_layers


_IN_PLACE = """
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
"""


class _InPlacePort(nn.Module):
    def __init__(self, pre_relu: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.pre_relu = pre_relu

    def forward(self, data: Tensor) -> dict[str, Tensor]:
        conv = self.conv1(data)
        relu = F.relu(conv)
        pool = F.max_pool2d(relu, 2, 2, ceil_mode=True)
        return {"conv1": conv if self.pre_relu else relu, "pool1": pool}


def test_in_place_blob_is_checked_as_caffe_holds_it(worker: CaffeWorker) -> None:
    """conv1 + relu1 (in place) are one segment whose output is the post-ReLU blob; a port
    returning the pre-ReLU value under that name is told what Caffe's blob holds."""
    report = check_port(worker, _IN_PLACE, _InPlacePort(False), generated(3))
    assert report.exit_code == 0, report.text()
    assert report.segment_layers == ["conv1", "relu1"] and report.local_layers == ["pool1"]
    report = check_port(worker, _IN_PLACE, _InPlacePort(True), generated(3))
    assert report.fault is not None and report.fault["layer"].startswith("conv1 (Convolution)")
    assert "holds the output of relu1 (ReLU)" in report.fault["text"], report.text()
