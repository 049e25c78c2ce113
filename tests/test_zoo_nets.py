"""The zoo's real age-net architectures in real Caffe, against hand-written ports.

Each net is built by its zoo builder in the worker, run in Caffe (TEST phase) on generated
weights and inputs, and its port runs on the same weights and inputs. Every layer is then
checked locally, on each side's own values: the layer's top must be within
``LAYER_BOUNDS[type].forward`` of ``crossval.reference.layers.forward`` applied in float64 to that
side's own bottoms (Caffe's layer spec from the worker's ``layer_specs``). Layers that run in
place (ReLU, Dropout, BatchNorm, Scale after their producer) leave only the last value in
the blob, so they are checked together with the layer that produced it: the reference runs
through the chain, and the bound is carried through it (each layer's own bound plus the
incoming bound times the layer's slope: its exact diagonal Jacobian for the affine layers,
its Lipschitz constant for ReLU).

A correct port and Caffe pass every layer; each buggy variant fails first at the layer its
docstring names ("Goes wrong first at: ``layer``"), or has another shape there.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from torch import nn

from crossval.caffe_side.replies import NetDescription
from crossval.reference import layers as ref
from crossval.reference.layers import LayerSpec
from crossval.tolerances.layers import LAYER_BOUNDS
from crossval.transfer import caffe_to_state_dict, state_dict_key
from crossval.worker import CaffeWorker

Array = NDArray[Any]


@dataclass(frozen=True)
class Net:
    builder: str
    port: str  # module in tests/ports
    kwargs: Mapping[str, Any]
    batch: int = 2


NETS = {
    "levi_hassner": Net("levi_hassner_age", "levi_hassner", {"size": 67}),
    "caffenet": Net("caffenet_age", "caffenet", {"size": 67, "width": 0.125}),
    "googlenet_ave": Net(
        "googlenet_block",
        "googlenet",
        {"size": 9, "channels": 16, "width": 0.25, "branch_pool": "AVE"},
    ),
    "googlenet_global": Net(
        "googlenet_block",
        "googlenet",
        {"size": 9, "channels": 16, "width": 0.25, "global_pool": True},
    ),
    "resnet": Net("resnet_block", "resnet", {"size": 8, "channels": 8, "coeff": (1.0, -0.5)}),
}

# (net, variant): the buggy variants, each on a net where its bug shows.
BUGS = [
    ("levi_hassner", "make_pool_floor"),
    ("levi_hassner", "make_lrn_alpha_unscaled"),
    ("levi_hassner", "make_dropout_active"),
    ("levi_hassner", "make_softmax_batch_axis"),
    ("caffenet", "make_groups_interleaved"),
    ("caffenet", "make_dropout_active"),
    ("googlenet_ave", "make_ave_pool_exclude_pad"),
    ("googlenet_global", "make_concat_pre_relu"),
    ("resnet", "make_conv_bias"),
    ("resnet", "make_bn_eps_1e3"),
    ("resnet", "make_bn_factor_ignored"),
    ("resnet", "make_scale_without_bias"),
    ("resnet", "make_eltwise_coeff_ignored"),
]


@dataclass
class Prepared:
    specs: list[LayerSpec]
    params: dict[str, list[Array]]
    inputs: dict[str, Array]
    caffe_blobs: dict[str, Array]


def generate_params(described: NetDescription, rng: np.random.Generator) -> dict[str, Any]:
    """Weights of every layer by Caffe's shapes: He-scaled kernels, small biases, BatchNorm
    sums with a scale factor other than 1 and variances in [0.01, 1], Scale near 1."""
    out: dict[str, list[Array]] = {}
    for lay in described.layers:
        shapes = [p.shape for p in lay.params]
        if not shapes:
            continue
        kind = lay.type
        if kind == "BatchNorm":
            (c,), factor = shapes[0], rng.uniform(0.5, 4.0)
            mean = rng.normal(0.0, 0.5, c) * factor
            var = rng.uniform(0.01, 1.0, c) * factor
            blobs = [mean, var, np.array([factor])]
        elif kind == "Scale":
            blobs = [rng.normal(1.0, 0.2, s) for s in shapes]
            if len(blobs) > 1:
                blobs[1] = rng.normal(0.0, 0.1, shapes[1])
        else:
            fan_in = int(np.prod(shapes[0][1:]))
            blobs = [rng.normal(0.0, np.sqrt(2.0 / fan_in), shapes[0])]
            blobs += [rng.normal(0.0, 0.1, s) for s in shapes[1:]]
        out[lay.name] = [np.asarray(b, dtype=np.float32) for b in blobs]
    return out


_prepared: dict[str, Prepared] = {}


def prepare(worker: CaffeWorker, key: str, seed: int = 0, scale: float = 1.0) -> Prepared:
    cached = seed == 0 and scale == 1.0
    if cached and key in _prepared:
        return _prepared[key]
    net = NETS[key]
    text = worker.prototxt(net.builder, batch=net.batch, **net.kwargs)
    specs = [LayerSpec.from_caffe(d) for d in worker.layer_specs(text)]
    described = worker.describe(text)
    rng = np.random.default_rng(seed)
    params = generate_params(described, rng)
    inputs = {
        name: rng.normal(0.0, scale, shape).astype(np.float32)
        for name, shape in described.inputs.items()
    }
    run = worker.run(text, inputs, params=params, phase="TEST")
    prepared = Prepared(specs, params, inputs, run.blobs)
    if cached:
        _prepared[key] = prepared
    return prepared


def port_module(net: Net) -> Any:
    return importlib.import_module(f"ports.{net.port}")


def load_weights(
    module: Any, port: nn.Module, params: Mapping[str, list[Array]], strict: bool
) -> None:
    """Caffe's params into the port by crossval's naming rule (and the port's own map).
    Strict: every param must fit and every port entry be covered. Otherwise the params that
    fit are copied and the rest left (a buggy port's misfit shows in its blobs)."""
    mapping = module.caffe_map() if hasattr(module, "caffe_map") else None
    state = port.state_dict()
    if strict:
        port.load_state_dict(caffe_to_state_dict(params, state, mapping), strict=True)
        return
    fitting = {}
    for layer, blobs in params.items():
        for i, value in enumerate(blobs):
            key = state_dict_key(layer, i, mapping)
            if key in state and tuple(state[key].shape) == value.shape:
                fitting[key] = torch.from_numpy(value.copy())
    port.load_state_dict(fitting, strict=False)


def run_port(net: Net, make: str, prepared: Prepared, strict: bool) -> dict[str, Array]:
    module = port_module(net)
    torch.manual_seed(0)
    port = getattr(module, make)(**net.kwargs)
    load_weights(module, port, prepared.params, strict)
    with torch.no_grad():
        out = port(**{k: torch.from_numpy(v) for k, v in prepared.inputs.items()})
    return {k: v.detach().numpy() for k, v in out.items()}


# -- the local check --------------------------------------------------------------------


def steps(specs: Sequence[LayerSpec]) -> list[list[LayerSpec]]:
    """The layers grouped so that each group ends with a blob value a side can return: a
    layer, then the in-place layers that follow it on its top."""
    groups: list[list[LayerSpec]] = []
    open_by_blob: dict[str, list[LayerSpec]] = {}
    read: set[str] = set()
    for spec in specs:
        if spec.type == "Input":
            continue
        if spec.bottoms and tuple(spec.bottoms) == tuple(spec.tops):
            (blob,) = spec.tops
            assert blob in open_by_blob and blob not in read, (
                f"{spec.name} changes {blob} in place after a layer read it: not supported here"
            )
            open_by_blob[blob].append(spec)
            continue
        read.update(spec.bottoms)
        group = [spec]
        groups.append(group)
        for top in spec.tops:
            open_by_blob[top] = group
    return groups


def _lipschitz(spec: LayerSpec) -> float:
    slope = float(spec.param("relu_param")["negative_slope"])
    return max(1.0, abs(slope))


@dataclass
class Finding:
    layers: tuple[str, ...]
    text: str


def check_group(
    group: Sequence[LayerSpec],
    params: Mapping[str, list[Array]],
    blobs: Mapping[str, Array],
    worst: dict[str, float] | None = None,
) -> Finding | None:
    """The group's tops on this side against the float64 reference on this side's bottoms;
    `worst` collects the largest err/bound per group (keyed by its layers' types)."""
    names = tuple(s.name for s in group)
    first = group[0]
    for b in (*first.bottoms, *first.tops):
        if b not in blobs:
            return Finding(names, f"blob {b!r} not returned")

    def t64(a: Array) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float64))

    def np_(ts: Sequence[torch.Tensor]) -> list[Array]:
        return [t.numpy() for t in ts]

    bottoms = [t64(blobs[b]) for b in first.bottoms]
    blobs0 = [t64(p) for p in params.get(first.name, [])]
    try:
        tops = ref.forward(first, bottoms, blobs0)
    except (RuntimeError, ValueError, IndexError) as exc:
        return Finding(names, f"the reference cannot run {first.name} on these bottoms: {exc}")
    bounds = LAYER_BOUNDS[first.type].forward(first, np_(bottoms), np_(blobs0), np_(tops))
    for spec in group[1:]:
        x = tops[0]
        p = [t64(a) for a in params.get(spec.name, [])]
        y = ref.forward(spec, [x], p)[0]
        own = LAYER_BOUNDS[spec.type].forward(spec, [x.numpy()], np_(p), [y.numpy()])[0]
        if spec.type == "ReLU":
            slope: Array | float = _lipschitz(spec)
        else:
            _, gb, _ = ref.vjp(spec, [x], p, [torch.ones_like(y)])
            assert gb[0] is not None
            slope = np.abs(gb[0].numpy())
        tops, bounds = [y], [slope * bounds[0] + own]
    for name, top, bound in zip(first.tops, tops, bounds, strict=True):
        got = blobs[name]
        if tuple(got.shape) != tuple(top.shape):
            return Finding(
                names, f"{name}: shape {tuple(got.shape)}, the reference {tuple(top.shape)}"
            )
        err = np.abs(got.astype(np.float64) - top.numpy())
        bad = ~(err <= bound)
        if worst is not None:
            kind = "+".join(s.type for s in group)
            ratio = np.where(err == 0, 0.0, err / np.where(bound > 0, bound, np.inf))
            worst[kind] = max(worst.get(kind, 0.0), float(np.max(ratio, initial=0.0)))
        if bad.any():
            i = np.unravel_index(int(np.argmax(np.where(bad, err, -1))), err.shape)
            return Finding(
                names,
                f"{name}{list(i)}={got[i]!r}, but should be {top.numpy()[i]!r} within "
                f"{bound[i]:.3g} ({int(bad.sum())} of {bad.size} out)",
            )
    return None


def first_failure(
    prepared: Prepared, blobs: Mapping[str, Array], worst: dict[str, float] | None = None
) -> Finding | None:
    for group in steps(prepared.specs):
        finding = check_group(group, prepared.params, blobs, worst)
        if finding is not None:
            return finding
    return None


def named_layer(doc: str | None) -> str:
    m = re.search(r"Goes wrong first at: ``([^`]+)``", doc or "")
    assert m, f"docstring names no layer: {doc!r}"
    return m.group(1)


# -- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(NETS))
def test_caffe_and_the_port_pass_every_layer(worker: CaffeWorker, key: str) -> None:
    net = NETS[key]
    prepared = prepare(worker, key)
    assert first_failure(prepared, prepared.caffe_blobs) is None
    blobs = run_port(net, "make", prepared, strict=True)
    tops = {t for s in prepared.specs for t in s.tops}
    assert tops <= set(blobs), f"the port does not return {sorted(tops - set(blobs))}"
    for name in tops:
        assert blobs[name].shape == prepared.caffe_blobs[name].shape, name
    finding = first_failure(prepared, blobs)
    assert finding is None, f"{finding.layers}: {finding.text}"


@pytest.mark.parametrize("key", list(NETS))
def test_no_false_alarm_on_large_inputs(worker: CaffeWorker, key: str) -> None:
    """Inputs 30 times larger (saturated softmaxes, LRN windows far from 1), two seeds."""
    for seed in (1, 2):
        prepared = prepare(worker, key, seed, scale=30.0)
        for side, blobs in (
            ("Caffe", prepared.caffe_blobs),
            ("the port", run_port(NETS[key], "make", prepared, strict=True)),
        ):
            finding = first_failure(prepared, blobs)
            assert finding is None, f"{side}, seed {seed}: {finding.layers}: {finding.text}"


@pytest.mark.parametrize(("key", "variant"), BUGS)
def test_each_buggy_port_fails_first_at_its_layer(
    worker: CaffeWorker, key: str, variant: str
) -> None:
    net = NETS[key]
    prepared = prepare(worker, key)
    make: Callable[..., nn.Module] = getattr(port_module(net), variant)
    expected = named_layer(make.__doc__)
    blobs = run_port(net, variant, prepared, strict=False)
    finding = first_failure(prepared, blobs)
    assert finding is not None, f"{variant} passes every layer"
    assert expected in finding.layers, f"{variant} fails first at {finding.layers}: {finding.text}"


def test_groups_follow_in_place_layers(worker: CaffeWorker) -> None:
    prepared = prepare(worker, "resnet")
    groups = [[s.name for s in g] for g in steps(prepared.specs)]
    assert groups[0] == ["conv1", "bn_conv1", "scale_conv1", "conv1_relu"]
    assert ["res2a", "res2a_relu"] in groups
    assert ["res2a_branch2b", "bn2a_branch2b", "scale2a_branch2b"] in groups


# Published sizes: (builder, kwargs, blob shapes Caffe must give).
FULL_SIZE = [
    (
        "levi_hassner_age",
        {},
        {"conv1": (1, 96, 56, 56), "pool1": (1, 96, 28, 28), "pool2": (1, 256, 14, 14)},
    ),
    ("levi_hassner_age_v1", {}, {"pool5": (1, 384, 7, 7), "prob": (1, 8)}),
    ("caffenet_age", {}, {"conv1": (1, 96, 55, 55), "pool5": (1, 256, 6, 6), "fc6": (1, 4096)}),
    (
        "googlenet_block",
        {},
        {"inception_3a/output": (1, 256, 28, 28), "pool5/7x7_s1": (1, 256, 22, 22)},
    ),
    ("googlenet_block", {"size": 7, "global_pool": True}, {"pool5/7x7_s1": (1, 256, 1, 1)}),
    (
        "resnet_block",
        {"size": 56, "channels": 64},
        {"res2a": (1, 64, 56, 56), "pool5": (1, 64, 1, 1)},
    ),
]


@pytest.mark.thorough
@pytest.mark.parametrize(("builder", "kwargs", "shapes"), FULL_SIZE)
def test_zoo_nets_at_their_published_sizes_pass_in_caffe(
    worker: CaffeWorker, builder: str, kwargs: dict[str, Any], shapes: dict[str, tuple[int, ...]]
) -> None:
    text = worker.prototxt(builder, **kwargs)
    described = worker.describe(text)
    for name, shape in shapes.items():
        assert described.blobs[name] == shape, name
    rng = np.random.default_rng(0)
    params = generate_params(described, rng)
    inputs = {k: rng.normal(0.0, 1.0, s).astype(np.float32) for k, s in described.inputs.items()}
    run = worker.run(text, inputs, params=params, phase="TEST")
    specs = [LayerSpec.from_caffe(d) for d in worker.layer_specs(text)]
    # Caffe itself, layer by layer, at the published size.
    finding = first_failure(Prepared(specs, params, inputs, run.blobs), run.blobs)
    assert finding is None, f"Caffe at {finding.layers}: {finding.text}"
