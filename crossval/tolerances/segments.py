"""Bounds for a segment: several layers the float64 reference composes because the port does
not return the blobs between them (or Caffe overwrites them in place).

A float32 implementation of the segment commits, at every layer, an error within that
layer's own bound (``crossval.tolerances.layers``, at the values it meets), forward and
backward; those errors are carried through the rest of the segment. Linearised, the error of
an output element i is ``sum_j a_ij r_j`` with ``a_ij = J_ij b_j`` (J: the derivative of the
output with respect to the intermediate value j, b_j: its layer's bound) and ``|r_j| <= 1``.

The reference measures the carried error itself: it reruns the segment in float64 with every
layer's tops moved by ``s * b`` and, in the backward pass, every bottom diff that a later
backward step reads moved by ``s' * b'`` (random signs s, s'; b, b' the layers' forward and
backward bounds at the unperturbed values; a diff nothing reads after, a param's or a
segment input's, gets its own bound added instead, which is what the noise would move it by),
``SEGMENT_SAMPLES`` times, and takes the root mean square ``S`` of how
far each output, bottom diff and param diff moved. With random signs ``E[delta_i^2] =
sum_j a_ij^2 = sigma_i^2``: S estimates sigma_i with K = SEGMENT_SAMPLES degrees of freedom.
Perturbing the nonlinear reference rather than its derivative also covers kinks (a ReLU at 0,
a MAX pooling tie, a saturated sigmoid whose y(1 - y) is all rounding), where a linearisation
would see none of the spread. The runs come in antithetic pairs (s, then -s): a value within
its own bound of a kink crosses it in one run of every pair, so a ReLU mask that float32 may
flip is flipped in the spread too. In the linear regime a pair moves by +delta and -delta, so
the K runs give K/2 independent estimates.

Bound: ``SEGMENT_SAFETY * S + b_own``, with b_own the bound of the layer that writes the
output (or, for a diff, the bound of the layers that compute it) added so a segment is never
tighter than its last layer alone. If the actual float32 errors were as large as every layer's
worst-case bound with independent random signs, the actual error is a normal variable of
standard deviation sigma_i and the chance that it exceeds F S is the chance that Student's t
with K/2 degrees of freedom exceeds F: for K = 8, F = 10 that is 5.6e-4 per element. Actual
float32 errors are a fraction rho of the worst-case bounds (gamma(n) grows as n, rounding
errors as sqrt(n); the per-layer campaigns measured largest err/bound below 1 and typical
values far below); at rho = 0.3 the chance is that of t_4 exceeding 33, about 5e-6, and
the own-layer term b_own comes on top.
An ill-conditioned example (a large J) gets a wide bound, never a false alarm and never
silence: where the spread is infinite or NaN, the bound is infinite and the check says so.

The commonest segment in real nets is a Convolution or InnerProduct followed by ReLUs and
Dropouts run in place on its top (Caffe keeps only the last value). It gets a worst-case bound
without perturbation (rule ``segment_chain``): ReLU (negative_slope in [0, 1]) and Dropout in
TEST are 1-Lipschitz, so the top's error is at most the sum of the layers' own forward bounds.
Backward, each ReLU multiplies the diff by its mask, and float32 may flip the mask only where
the bottom is within its carried forward bound of 0: there the diff may be off by
(1 - slope) |g|; those errors and the ReLUs' own backward bounds reach the linear layer's top
diff, whose bottom and param diffs then move by at most the layer applied to absolute values
(its vjp at |W|, |x| and the top diff's error bound), on top of its own backward bound taken at
|g| plus that error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from crossval.reference import layers as ref
from crossval.reference.layers import LayerSpec

from . import ETA32, F64, TABLE, Rule, gamma
from .layers import LAYER_BOUNDS, WIDE, diff_magnitudes, forward

SEGMENT_SAMPLES = 8
SEGMENT_SAFETY = 10.0
CHAIN_HEADS = ("Convolution", "InnerProduct", "Deconvolution")  # linear: |J| is f on |values|

TABLE["segment_chain"] = Rule(
    "segment_chain",
    "a Convolution, InnerProduct or Deconvolution with ReLUs and Dropouts in place on its top",
    "forward: the sum of the layers' own bounds (the in-place layers are 1-Lipschitz); "
    "backward: (1 - slope) |g| where a ReLU's bottom is within its carried bound of 0, plus "
    "the ReLUs' own bounds, carried through the linear layer on absolute values, plus its own "
    "bound at |g| + that error (crossval.tolerances.segments)",
)
TABLE["segment"] = Rule(
    "segment",
    "several layers composed by the float64 reference between blobs the port returns",
    f"{SEGMENT_SAFETY:g} x the rms spread of the reference's outputs and diffs over "
    f"{SEGMENT_SAMPLES} runs with every layer's tops and diffs moved by random signs times "
    "its own bound, plus the last layer's own bound (crossval.tolerances.segments)",
)


class _GradNoise(torch.autograd.Function):
    """Identity forward; adds a fixed tensor to the gradient passing back through it."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, noise: Tensor) -> Tensor:
        ctx.noise = noise
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return g + ctx.noise, None


def _np(t: Tensor | None) -> F64 | None:
    return None if t is None else t.detach().to(torch.float64).numpy()


@dataclass
class SegmentResult:
    """The float64 reference of a segment and the bound of every value and diff."""

    values: dict[str, F64]
    value_bounds: dict[str, F64]
    input_diffs: dict[str, F64] = field(default_factory=dict)
    input_diff_bounds: dict[str, F64] = field(default_factory=dict)
    param_diffs: dict[tuple[str, int], F64] = field(default_factory=dict)
    param_diff_bounds: dict[tuple[str, int], F64] = field(default_factory=dict)
    rule: str = ""
    # sampled (crossval.tolerances.sampled): the arrays above hold a sample of the elements;
    # ("v", blob), ("x", blob) or ("p", (layer, index)) -> their flat indices in the whole
    # array, and the whole array's shape
    positions: dict[Any, NDArray[np.int64]] = field(default_factory=dict)
    shapes: dict[Any, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class _Run:
    blobs: dict[str, Tensor]
    records: list[tuple[list[Tensor], list[Tensor], list[Tensor]]]  # bottoms, params, tops
    inputs: dict[str, Tensor]
    params: dict[str, list[Tensor]]


def _tensors(arrays: Mapping[str, Any]) -> dict[str, Any]:
    def t(a: Any) -> Tensor:
        return WIDE.get(a, absolute=False)

    return {
        k: [t(a) for a in v] if isinstance(v, list | tuple) else t(v) for k, v in arrays.items()
    }


def _compose(
    layers: Sequence[LayerSpec],
    params: Mapping[str, list[Tensor]],
    inputs: Mapping[str, Tensor],
    grad: bool,
    fwd_noise: list[list[Tensor | None]] | None = None,
    bwd_noise: list[list[Tensor | None]] | None = None,
    bottom_diffs: bool = True,
    param_diffs: bool = True,
) -> _Run:
    xs = {k: v.detach().requires_grad_(grad and bottom_diffs) for k, v in inputs.items()}
    ps = {
        k: [p.detach().requires_grad_(grad and param_diffs) for p in v] for k, v in params.items()
    }
    leaves = {id(x) for x in xs.values()}
    blobs: dict[str, Tensor] = dict(xs)
    records = []
    for i, spec in enumerate(layers):
        bottoms = [blobs[b] for b in spec.bottoms]
        blobs_i = list(ps.get(spec.name, []))
        if bwd_noise is not None:
            # A segment input's diff is read by nothing after: its own bound is added to the
            # bound instead (noise there moves it by exactly that much); params likewise.
            bottoms = [
                _GradNoise.apply(b, n)  # type: ignore[no-untyped-call]
                if n is not None and b.requires_grad and id(b) not in leaves
                else b
                for b, n in zip(bottoms, bwd_noise[i], strict=True)
            ]
        tops = forward(spec, bottoms, blobs_i)
        if fwd_noise is not None:
            tops = [t if n is None else t + n for t, n in zip(tops, fwd_noise[i], strict=True)]
        if grad:
            for t in tops:
                if t.requires_grad:
                    t.retain_grad()
        records.append((bottoms, blobs_i, tops))
        for name, t in zip(spec.tops, tops, strict=True):
            blobs[name] = t
    return _Run(blobs, records, xs, ps)


def _backward(run: _Run, top_diffs: Mapping[str, F64]) -> None:
    pairs = [
        (run.blobs[k], torch.from_numpy(np.array(g, dtype=np.float64)))
        for k, g in top_diffs.items()
        if run.blobs[k].requires_grad
    ]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def segment(
    layers: Sequence[LayerSpec],
    params: Mapping[str, Sequence[F64]],
    inputs: Mapping[str, F64],
    outputs: Sequence[str],
    top_diffs: Mapping[str, F64] | None = None,
    seed: int = 0,
    bottom_diffs: bool = True,
    param_diffs: bool = True,
) -> SegmentResult:
    """The float64 reference of `layers` composed from `inputs` (blob -> float32 values as
    float64), and the bound of each of `outputs`; with `top_diffs` (the diff of each output,
    zero where absent) also every input's and param's diff and its bound. One layer: its own
    bound (``tolerances.layers``); several: see the module docstring."""
    with ref.diffs_of(bottom_diffs, param_diffs):  # the others are constants
        return _segment(layers, params, inputs, outputs, top_diffs, seed, bottom_diffs, param_diffs)


def _segment(
    layers: Sequence[LayerSpec],
    params: Mapping[str, Sequence[F64]],
    inputs: Mapping[str, F64],
    outputs: Sequence[str],
    top_diffs: Mapping[str, F64] | None,
    seed: int,
    bottom_diffs: bool,
    param_diffs: bool,
) -> SegmentResult:
    backward = top_diffs is not None
    diffs = dict(top_diffs or {})
    t_params: dict[str, list[Tensor]] = _tensors({k: list(v) for k, v in params.items()})
    t_inputs: dict[str, Tensor] = _tensors(inputs)
    base = _compose(layers, t_params, t_inputs, backward, None, None, bottom_diffs, param_diffs)
    fwd_b: list[list[F64]] = []
    bwd_b: list[tuple[list[F64 | None], list[F64 | None]]] = []
    if backward:
        _backward(base, diffs)
    chain = len(layers) > 1 and is_chain(layers)
    for spec, (bottoms, blobs, tops) in zip(layers, base.records, strict=True):
        bound = LAYER_BOUNDS[spec.type]
        b_np = [_np(b) for b in bottoms]
        p_np = [_np(p) for p in blobs]
        t_np = [_np(t) for t in tops]
        fwd_b.append(bound.forward(spec, b_np, p_np, t_np))  # type: ignore[arg-type]
        if backward and chain and spec is layers[0]:
            # a chain's linear layer gets its backward bound from _chain_bounds: placeholders
            bwd_b.append(
                (
                    [None if not b.requires_grad else np.zeros(b.shape) for b in bottoms],
                    [None if not p.requires_grad else np.zeros(p.shape) for p in blobs],
                )
            )
        elif backward:
            g_np = [np.zeros(t.shape) if t.grad is None else t.grad.detach().numpy() for t in tops]
            bwd_b.append(bound.backward(spec, b_np, p_np, t_np, g_np))  # type: ignore[arg-type]
    last_writer = {name: i for i, spec in enumerate(layers) for name in spec.tops}
    out = SegmentResult(
        values={k: _np(base.blobs[k]) for k in outputs},  # type: ignore[misc]
        value_bounds={
            k: fwd_b[last_writer[k]][layers[last_writer[k]].tops.index(k)] for k in outputs
        },
        rule="tolerances.segment" if len(layers) > 1 else "",
    )
    if backward:
        for k, x in base.inputs.items():
            own = [
                bwd_b[i][0][j]
                for i, spec in enumerate(layers)
                for j, b in enumerate(spec.bottoms)
                if b == k and i < len(bwd_b)
            ]
            if not x.is_floating_point() or all(o is None for o in own):
                continue
            out.input_diffs[k] = np.zeros(x.shape) if x.grad is None else _np(x.grad)  # type: ignore[assignment]
            total: F64 = np.zeros(x.shape)
            for o in own:
                if o is not None:
                    total = total + np.asarray(o)
            out.input_diff_bounds[k] = total
        for name, ps in base.params.items():
            i = next(n for n, s in enumerate(layers) if s.name == name)
            for j, p in enumerate(ps):
                pb = bwd_b[i][1][j]
                if pb is None:
                    continue
                out.param_diffs[(name, j)] = np.zeros(p.shape) if p.grad is None else _np(p.grad)  # type: ignore[assignment]
                out.param_diff_bounds[(name, j)] = np.asarray(pb)
    if len(layers) == 1:
        return out
    if chain:
        return _chain_bounds(layers, base, fwd_b, bwd_b, out, backward)
    gen = torch.Generator().manual_seed(seed)

    def signs(b: F64 | None) -> Tensor | None:
        if b is None:
            return None
        bt = torch.from_numpy(np.asarray(b, dtype=np.float64))
        s = torch.randint(0, 2, bt.shape, generator=gen, dtype=torch.float64) * 2 - 1
        return s * bt

    # running sums of squared moves (root mean square at the end)
    moved: dict[Any, Tensor] = {}

    def add(key: Any, value: Tensor | None, base_value: F64) -> None:
        if value is None:
            value = torch.zeros(base_value.shape, dtype=torch.float64)
        d = value.detach().to(torch.float64).reshape(base_value.shape).clone()
        d.sub_(torch.from_numpy(base_value))
        if key in moved:
            moved[key].addcmul_(d, d)
        else:
            moved[key] = d.mul_(d)

    fn: list[list[Tensor | None]] = []
    bn: list[list[Tensor | None]] = []
    for n_run in range(SEGMENT_SAMPLES):
        if n_run % 2 == 0:
            fn = [[signs(b) for b in fb] for fb in fwd_b]
            bn = [[signs(b) for b in bb] for bb, _ in bwd_b]
        else:  # the antithetic run: every sign flipped
            fn = [[None if n is None else -n for n in ns] for ns in fn]
            bn = [[None if n is None else -n for n in ns] for ns in bn]
        run = _compose(
            layers,
            t_params,
            t_inputs,
            backward,
            fn,
            bn if backward else None,
            bottom_diffs,
            param_diffs,
        )
        for k in outputs:
            add(("v", k), run.blobs[k], out.values[k])
        if backward:
            _backward(run, diffs)
            for k in out.input_diffs:
                add(("x", k), run.inputs[k].grad, out.input_diffs[k])
            for key in out.param_diffs:
                add(("p", key), run.params[key[0]][key[1]].grad, out.param_diffs[key])

    def spread(key: Any) -> F64:
        rms: F64 = torch.sqrt(moved[key] / SEGMENT_SAMPLES).numpy()
        return np.where(np.isnan(rms), np.inf, rms)

    for k in outputs:
        out.value_bounds[k] = SEGMENT_SAFETY * spread(("v", k)) + out.value_bounds[k]
    for k in out.input_diffs:
        out.input_diff_bounds[k] = SEGMENT_SAFETY * spread(("x", k)) + out.input_diff_bounds[k]
    for key in out.param_diffs:
        out.param_diff_bounds[key] = (
            SEGMENT_SAFETY * spread(("p", key)) + out.param_diff_bounds[key]
        )
    return out


def is_chain(layers: Sequence[LayerSpec]) -> bool:
    """A linear layer with only ReLUs (slope in [0, 1]) and TEST Dropouts in place on its top."""
    head = layers[0]
    if head.type not in CHAIN_HEADS or len(head.tops) != 1:
        return False
    top = head.tops[0]
    for spec in layers[1:]:
        if spec.bottoms != (top,) or spec.tops != (top,):
            return False
        if spec.type == "ReLU":
            if not 0.0 <= float(spec.param("relu_param")["negative_slope"]) <= 1.0:
                return False
        elif spec.type != "Dropout" or spec.phase != "TEST":
            return False
    return True


def _chain_bounds(
    layers: Sequence[LayerSpec],
    base: _Run,
    fwd_b: list[list[F64]],
    bwd_b: list[tuple[list[F64 | None], list[F64 | None]]],
    out: SegmentResult,
    backward: bool,
) -> SegmentResult:
    """See the module docstring (rule ``segment_chain``)."""
    top = layers[0].tops[0]
    carried = [np.asarray(fwd_b[0][0])]  # forward error bound of the value each layer reads
    for b in fwd_b[1:]:
        carried.append(carried[-1] + np.asarray(b[0]))
    out.value_bounds[top] = carried[-1]
    out.rule = "tolerances.segment_chain"
    if not backward:
        return out
    # backward, from the last in-place layer down to the linear layer's top
    err = np.zeros(carried[0].shape)
    for i in range(len(layers) - 1, 0, -1):
        spec = layers[i]
        own = bwd_b[i][0][0]
        err = err + (0.0 if own is None else np.asarray(own))
        if spec.type == "ReLU":
            slope = float(spec.param("relu_param")["negative_slope"])
            x = _np(base.records[i][0][0])
            g_t = base.records[i][2][0].grad
            g = np.zeros(carried[0].shape) if g_t is None else _np(g_t)
            assert x is not None and g is not None
            near = np.abs(x) <= carried[i - 1]
            err = err + np.where(near, (1.0 - slope) * np.abs(g), 0.0)
    bottoms, blobs, tops = base.records[0]
    g0_t = tops[0].grad
    g0 = np.zeros(err.shape) if g0_t is None else np.abs(_np(g0_t))  # type: ignore[arg-type]
    b_np: list[F64] = [_np(b) for b in bottoms]  # type: ignore[misc]
    p_np: list[F64] = [_np(p) for p in blobs]  # type: ignore[misc]
    head = layers[0]
    # its own bound at |g| + err, gamma(n) f*(|g| + err) + n ETA32, plus the carried error
    # f*(err): f* (the vjp on absolute values) is linear in the top diff, so the sum is
    # f*(gamma(n) (|g| + err) + err) + n ETA32, one vjp per count of terms
    nb, npar = LAYER_BOUNDS[head.type].backward_terms(head, b_np, p_np, [g0])  # type: ignore[misc]
    wanted = [
        *[(n, "b", j) for j, n in enumerate(nb) if head.bottoms[j] in out.input_diff_bounds],
        *[(n, "p", j) for j, n in enumerate(npar) if (head.name, j) in out.param_diff_bounds],
    ]
    for n in sorted({w[0] for w in wanted}):
        kinds = {(k, j) for m, k, j in wanted if m == n}
        with ref.diffs_of(any(k == "b" for k, _ in kinds), any(k == "p" for k, _ in kinds)):
            mag_b, mag_p = diff_magnitudes(head, b_np, p_np, [gamma(n) * (g0 + err) + err])
        for k, j in kinds:
            m = mag_b[j] if k == "b" else mag_p[j]
            assert m is not None
            bound = np.asarray(m) + n * ETA32
            if k == "b":
                out.input_diff_bounds[head.bottoms[j]] = bound
            else:
                out.param_diff_bounds[(head.name, j)] = bound
    return out
