"""Whole nets from ``crossval.caffe_side.zoo`` in real Caffe against the ports in tests/ports.

Caffe runs in a child process (the zoo is not registered in the worker here): it builds the
net with the zoo builder, loads it in TEST phase, sets random He-scaled weights, runs one
forward and saves every blob and param. The ports get the same weights through
``crossval.transfer`` (the ``<layer>.weight`` / ``<layer>.bias`` naming rule) and must return
every Caffe blob within ``blob_tolerance``; each buggy variant must differ at the blob its
docstring names and at no blob before it (in Caffe's order).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from torch import nn

from crossval import provision
from crossval.transfer import TransferError, caffe_to_state_dict

REPO = Path(__file__).resolve().parents[1]
PORTS = Path(__file__).resolve().parent / "ports"

# Runs in the child: argv[1] is a JSON request, argv[2] the output directory.
CAFFE_SCRIPT = textwrap.dedent("""
    import json
    import sys
    from pathlib import Path

    import numpy as np
    import caffe

    from crossval.caffe_side.zoo import ZOO

    caffe.set_mode_cpu()
    req = json.loads(sys.argv[1])
    out = Path(sys.argv[2])
    (out / "net.prototxt").write_text(ZOO[req["builder"]](**req["kwargs"]))
    net = caffe.Net(str(out / "net.prototxt"), caffe.TEST)
    rng = np.random.default_rng(req["seed"])
    if req["random_weights"]:
        for blobs in net.params.values():
            w = blobs[0].data
            fan_in = w.size // w.shape[0]
            # He scaling keeps every pre-activation of order 1 through the 16 layers.
            w[...] = rng.normal(0.0, np.sqrt(2.0 / fan_in), w.shape)
            if len(blobs) > 1:
                blobs[1].data[...] = rng.normal(0.0, 0.1, blobs[1].data.shape)
    data = net.blobs["data"].data
    data[...] = rng.normal(0.0, 1.0, data.shape)
    net.forward()
    layers = [
        {
            "name": name,
            "type": layer.type,
            "bottoms": list(net.bottom_names[name]),
            "tops": list(net.top_names[name]),
        }
        for name, layer in zip(net._layer_names, net.layers)
    ]
    meta = {
        "layers": layers,
        "blobs": {k: list(v.data.shape) for k, v in net.blobs.items()},
        "params": {k: [list(b.data.shape) for b in v] for k, v in net.params.items()},
    }
    (out / "meta.json").write_text(json.dumps(meta))
    arrays = {f"blob:{k}": v.data for k, v in net.blobs.items()}
    if req["save_params"]:
        for k, v in net.params.items():
            for i, b in enumerate(v):
                arrays[f"param:{k}:{i}"] = b.data
    np.savez(out / "run.npz", **arrays)
""")


@dataclass
class CaffeRun:
    """One Caffe forward: blobs in Caffe's order, params by layer, the layer list."""

    blobs: dict[str, NDArray[np.float32]]
    params: dict[str, list[NDArray[np.float32]]]
    layers: list[dict[str, Any]]
    blob_shapes: dict[str, tuple[int, ...]]
    param_shapes: dict[str, list[tuple[int, ...]]]
    seconds: float


def run_caffe(
    install: provision.CaffeInstall,
    workdir: Path,
    builder: str,
    seed: int = 0,
    random_weights: bool = True,
    save_params: bool = True,
    **kwargs: Any,
) -> CaffeRun:
    request = {
        "builder": builder,
        "kwargs": kwargs,
        "seed": seed,
        "random_weights": random_weights,
        "save_params": save_params,
    }
    env = install.env()
    env["PYTHONPATH"] = ":".join([env["PYTHONPATH"], str(REPO)])
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CAFFE_SCRIPT, json.dumps(request), str(workdir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"Caffe run {request} failed:\n{proc.stderr[-4000:]}"
    meta = json.loads((workdir / "meta.json").read_text())
    blobs: dict[str, NDArray[np.float32]] = {}
    params: dict[str, list[NDArray[np.float32]]] = {}
    with np.load(workdir / "run.npz") as npz:
        for name in meta["blobs"]:
            blobs[name] = npz[f"blob:{name}"]
        if save_params:
            for layer, shapes in meta["params"].items():
                params[layer] = [npz[f"param:{layer}:{i}"] for i in range(len(shapes))]
    return CaffeRun(
        blobs=blobs,
        params=params,
        layers=meta["layers"],
        blob_shapes={k: tuple(v) for k, v in meta["blobs"].items()},
        param_shapes={k: [tuple(s) for s in v] for k, v in meta["params"].items()},
        seconds=seconds,
    )


# One pytest worker runs the module, so each Caffe run (a child process writing a DEX net's
# 33 M params) is made once and shared by the tests that name it (the same kwargs, spelled
# out: bins=101 is the zoo's default).
pytestmark = pytest.mark.xdist_group("zoo_ports")


@pytest.fixture(scope="module")
def caffe_runs(
    caffe_install: provision.CaffeInstall, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., CaffeRun]:
    """Caffe runs, memoized per request for the module (the variants share them)."""
    cache: dict[str, CaffeRun] = {}

    def get(builder: str, **kwargs: Any) -> CaffeRun:
        key = json.dumps([builder, kwargs], sort_keys=True)
        if key not in cache:
            workdir = tmp_path_factory.mktemp(builder)
            cache[key] = run_caffe(caffe_install, workdir, builder, **kwargs)
        return cache[key]

    return get


def load_port(name: str) -> ModuleType:
    """tests/ports/<name>.py, imported from its path (as a tool loads a port file)."""
    spec = importlib.util.spec_from_file_location(f"zoo_ports_{name}", PORTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEX = load_port("dex")
TINY = load_port("tiny")


# -- tolerance ------------------------------------------------------------------------------


def fan_in_sums(run: CaffeRun) -> dict[str, int]:
    """Per blob: the sum of (fan-in + 1) over the Convolution/InnerProduct layers before it.

    The fan-in of a layer with params is its weight's size over its output count: kernel_h *
    kernel_w * in_channels for a Convolution, in_features for an InnerProduct; the + 1 is
    the bias. Layers without params (ReLU, Pooling, Dropout, Softmax) pass it on.
    """
    sums: dict[str, int] = {}
    for layer in run.layers:
        fan = max((sums[b] for b in layer["bottoms"]), default=0)
        shapes = run.param_shapes.get(layer["name"])
        if shapes:
            weight = shapes[0]
            fan += int(np.prod(weight)) // weight[0] + 1
        for top in layer["tops"]:
            sums[top] = fan
    return sums


def blob_tolerance(fan_in_sum: int, caffe_blob: NDArray[np.float32]) -> float:
    """Allowed max |port - Caffe| for a blob: 8 * fan_in_sum * 2**-24 * max|blob|.

    A stand-in used only in this file (the project's derived bounds in crossval.tolerances
    cover the heads): a float32 dot product of length n is off by at most about n * u
    (u = 2**-24) relative to the sum of |terms|; summing n over the layers on the path
    bounds the accumulated error to first order, and 8 covers both sides (Caffe and
    PyTorch each round, in different orders) plus the exp and division of the softmax.
    Scaling by max|blob| assumes the sums of |terms| are of the order of the blob's values,
    which the He-scaled random weights of these tests keep true. The input blob (fan-in sum
    0) must match exactly.
    """
    return 8.0 * fan_in_sum * 2.0**-24 * float(np.abs(caffe_blob).max(initial=0.0))


@dataclass
class BlobCheck:
    name: str
    ok: bool
    detail: str


def compare_blobs(run: CaffeRun, port_blobs: dict[str, torch.Tensor]) -> list[BlobCheck]:
    """Every Caffe blob, in Caffe's order, against the port's blob of that name."""
    sums = fan_in_sums(run)
    checks = []
    for name, ref in run.blobs.items():
        if name not in port_blobs:
            checks.append(BlobCheck(name, False, "missing from the port's output"))
            continue
        got = port_blobs[name].detach().cpu().numpy()
        if got.shape != ref.shape:
            checks.append(BlobCheck(name, False, f"shape {got.shape}, Caffe {ref.shape}"))
            continue
        err = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max(initial=0.0))
        tol = blob_tolerance(sums[name], ref)
        checks.append(BlobCheck(name, err <= tol, f"max|err| {err:.3g}, allowed {tol:.3g}"))
    return checks


def first_divergence(checks: list[BlobCheck]) -> str | None:
    return next((c.name for c in checks if not c.ok), None)


def report(checks: list[BlobCheck]) -> str:
    return "\n".join(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in checks)


# -- running a port ---------------------------------------------------------------------------


def transfer(module: nn.Module, run: CaffeRun) -> None:
    """Caffe's params onto the port, strictly (every param, every state_dict key)."""
    state = caffe_to_state_dict(run.params, module.state_dict())
    module.load_state_dict(state, strict=True)


def forward(module: nn.Module, run: CaffeRun) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out: dict[str, torch.Tensor] = module(data=torch.from_numpy(run.blobs["data"].copy()))
    return out


def expected_divergence(make: Callable[..., nn.Module]) -> str:
    """The blob a buggy variant's docstring names: "Diverges first at: ``<blob>``"."""
    match = re.search(r"Diverges first at: ``([^`]+)``", make.__doc__ or "")
    assert match, f"{make.__name__}'s docstring names no first diverging blob"
    return match.group(1)


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    """Ports with a random forward (active dropout) reproduce run to run."""
    torch.manual_seed(0)
    yield


# -- the nets -------------------------------------------------------------------------------

TINY_BLOBS = ["data", "conv1", "relu1", "pool1", "fc1", "relu_fc1", "drop1", "fc2", "prob"]
DEX_BLOBS = [
    "data",
    "conv1_1",
    "conv1_2",
    "pool1",
    "conv2_1",
    "conv2_2",
    "pool2",
    "conv3_1",
    "conv3_2",
    "conv3_3",
    "pool3",
    "conv4_1",
    "conv4_2",
    "conv4_3",
    "pool4",
    "conv5_1",
    "conv5_2",
    "conv5_3",
    "pool5",
    "fc6",
    "fc7",
    "fc8-101",
    "prob",
]


def test_tiny_caffe_net_shapes(caffe_runs: Callable[..., CaffeRun]) -> None:
    run = caffe_runs("tiny_cnn", batch=2)
    assert list(run.blobs) == TINY_BLOBS
    # Caffe's MAX pooling rounds up: 9 x 9 pools to 5 x 5 (PyTorch's default: 4 x 4).
    assert run.blob_shapes["pool1"] == (2, 4, 5, 5)
    assert run.param_shapes == {
        "conv1": [(4, 3, 3, 3), (4,)],
        "fc1": [(16, 100), (16,)],
        "fc2": [(7, 16), (7,)],
    }
    # Nothing is in place: every layer writes its own top.
    assert all(layer["tops"] != layer["bottoms"] for layer in run.layers)


def test_dex_caffe_net_layout(caffe_runs: Callable[..., CaffeRun]) -> None:
    run = caffe_runs("dex_vgg16", batch=2, size=32, bins=101)
    assert list(run.blobs) == DEX_BLOBS
    in_place = [layer["name"] for layer in run.layers if layer["tops"] == layer["bottoms"]]
    relus = [f"relu{b}_{i}" for b, convs, _ in DEX.VGG16_BLOCKS for i in range(1, convs + 1)]
    assert in_place == [*relus, "relu6", "drop6", "relu7", "drop7"]
    assert [layer["name"] for layer in run.layers][-2:] == ["fc8-101", "prob"]
    assert run.blob_shapes["pool5"] == (2, 512, 1, 1)
    assert run.param_shapes["fc6"] == [(4096, 512), (4096,)]
    # In place: after the forward the conv blobs hold the post-ReLU values.
    assert all(run.blobs[name].min() >= 0 for name in DEX_BLOBS[1:21])


@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_port_matches_caffe(caffe_runs: Callable[..., CaffeRun], batch: int) -> None:
    run = caffe_runs("tiny_cnn", batch=batch, seed=batch)
    port = TINY.make()
    transfer(port, run)
    out = forward(port, run)
    assert set(out) == set(run.blobs)
    checks = compare_blobs(run, out)
    assert first_divergence(checks) is None, report(checks)


# K = 100 (fc8-100) only in `thorough`; the two K = 101 runs are shared with the variants below
@pytest.mark.parametrize(
    ("batch", "size", "bins"),
    [(2, 32, 101), (1, 48, 101), pytest.param(1, 32, 100, marks=pytest.mark.thorough)],
)
def test_dex_port_matches_caffe(
    caffe_runs: Callable[..., CaffeRun], batch: int, size: int, bins: int
) -> None:
    run = caffe_runs("dex_vgg16", batch=batch, size=size, bins=bins)
    assert f"fc8-{bins}" in run.blobs and f"fc8-{bins}" in run.params
    port = DEX.make(size=size, bins=bins)
    transfer(port, run)
    out = forward(port, run)
    assert set(out) == set(run.blobs)
    checks = compare_blobs(run, out)
    assert first_divergence(checks) is None, report(checks)


# -- buggy variants -------------------------------------------------------------------------

# (port module, variant, Caffe run). flatten_nhwc needs pool5 larger than 1 x 1 to show:
# at size 32 pool5 is 1 x 1 and both flatten orders agree, so it runs at 48 (pool5 2 x 2, by
# Caffe's ceil rounding of pool4's 3 x 3).
VARIANTS: list[tuple[ModuleType, str, str, dict[str, Any]]] = [
    (DEX, "make_flatten_nhwc", "dex_vgg16", {"batch": 1, "size": 48, "bins": 101}),
    (DEX, "make_bgr_swap", "dex_vgg16", {"batch": 2, "size": 32, "bins": 101}),
    (TINY, "make_pool_floor", "tiny_cnn", {"batch": 3, "seed": 3}),
    (TINY, "make_dropout_active", "tiny_cnn", {"batch": 3, "seed": 3}),
    (TINY, "make_softmax_dim0", "tiny_cnn", {"batch": 3, "seed": 3}),
]


@pytest.mark.parametrize(
    ("port", "variant", "builder", "kwargs"),
    VARIANTS,
    ids=[f"{p.__name__.rsplit('_', 1)[-1]}.{v}" for p, v, _, _ in VARIANTS],
)
def test_buggy_variant_diverges_where_its_docstring_says(
    caffe_runs: Callable[..., CaffeRun],
    port: ModuleType,
    variant: str,
    builder: str,
    kwargs: dict[str, Any],
) -> None:
    run = caffe_runs(builder, **kwargs)
    make = getattr(port, variant)
    expected = expected_divergence(make)
    opts = {"size": kwargs["size"]} if "size" in kwargs else {}
    module: nn.Module = make(**opts)
    try:
        transfer(module, run)
    except TransferError as exc:
        # Only floor pooling changes a param shape (fc1 is sized from its own pool1).
        assert variant == "make_pool_floor", exc
        assert "fc1" in str(exc) and "(16, 100)" in str(exc) and "(16, 64)" in str(exc)
        fitting = {
            layer: blobs
            for layer, blobs in run.params.items()
            if all(
                tuple(b.shape) == tuple(module.state_dict()[f"{layer}.{s}"].shape)
                for b, s in zip(blobs, ("weight", "bias"), strict=False)
            )
        }
        assert set(fitting) == {"conv1", "fc2"}
        module.load_state_dict(
            caffe_to_state_dict(
                fitting,
                {k: v for k, v in module.state_dict().items() if not k.startswith("fc1.")},
            ),
            strict=False,
        )
    checks = compare_blobs(run, forward(module, run))
    assert first_divergence(checks) == expected, report(checks)


def test_pool_floor_shape(caffe_runs: Callable[..., CaffeRun]) -> None:
    run = caffe_runs("tiny_cnn", batch=3, seed=3)
    module = TINY.make_pool_floor()
    with torch.no_grad():
        out = module(data=torch.from_numpy(run.blobs["data"].copy()))
    assert tuple(out["pool1"].shape) == (3, 4, 4, 4) != run.blob_shapes["pool1"]


def test_softmax_dim0_matches_caffe_at_batch_one(caffe_runs: Callable[..., CaffeRun]) -> None:
    run = caffe_runs("tiny_cnn", batch=1, seed=1)
    module = TINY.make_softmax_dim0()
    transfer(module, run)
    checks = compare_blobs(run, forward(module, run))
    assert first_divergence(checks) is None, report(checks)


def test_flatten_nhwc_is_invisible_when_pool5_is_one_by_one(
    caffe_runs: Callable[..., CaffeRun],
) -> None:
    run = caffe_runs("dex_vgg16", batch=2, size=32, bins=101)
    module = DEX.make_flatten_nhwc(size=32)
    transfer(module, run)
    checks = compare_blobs(run, forward(module, run))
    assert first_divergence(checks) is None, report(checks)


# -- full size ------------------------------------------------------------------------------


@pytest.mark.thorough
def test_dex_full_size_shapes(caffe_install: provision.CaffeInstall, tmp_path: Path) -> None:
    """DEX at 224 x 224: Caffe's blob and param shapes are the default port's; one forward."""
    run = run_caffe(caffe_install, tmp_path, "dex_vgg16", random_weights=False, save_params=False)
    assert list(run.blob_shapes) == DEX_BLOBS
    assert run.blob_shapes["pool5"] == (1, 512, 7, 7)
    assert run.blob_shapes["prob"] == (1, 101)
    assert run.param_shapes["fc6"] == [(4096, 25088), (4096,)]
    # No weight_filler: Caffe's default filler is constant 0, so every logit is 0 and every
    # age bin gets exactly 1/101 (exp(0) = 1, a sum of 101 ones, one float32 division).
    assert np.all(run.blobs["prob"] == np.float32(1) / np.float32(101))

    port = DEX.make()
    state = port.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        f"{layer.replace('-', '_')}.{suffix}": shape
        for layer, shapes in run.param_shapes.items()
        for suffix, shape in zip(("weight", "bias"), shapes, strict=True)
    }
    out = forward(port, run)
    assert {k: tuple(v.shape) for k, v in out.items()} == run.blob_shapes
    assert torch.isfinite(out["prob"]).all()
