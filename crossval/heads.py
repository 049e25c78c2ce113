"""The head and loss tables: every check, test and command iterates these.

A head row says how to build its Caffe net (through the worker's NetSpec builders), its
PyTorch reference, its fixed (surgery) params, and how float32 error propagates through it
(forward and backward, from ``tolerances``). A loss row says which blob it consumes, how the
reference computes it, and its error bounds. Formulas live in ``reference/``, bounds in
``tolerances``; this module only wires them together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from crossval import reference
from crossval.reference import losses as ref_losses

from . import tolerances as tol
from .names import HEAD_NAMES, LOSS_NAMES

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]


@dataclass(frozen=True)
class Case:
    """One generated example: a head, a loss, inputs, learnable weights and loss parameters."""

    head: str
    loss: str
    x: F32  # (N, D) features, the `pool5` blob
    target: F32  # (N, 1) ages, or (N,) class labels for softmax_with_loss
    weights: dict[str, F32]  # learnable params by state_dict key
    bins: int = 100
    scale: float = 99.0
    sigma: float = 1.0
    normalization: str | None = None  # None: Caffe's default (VALID)
    ignore_label: int | None = None
    region: str = ""  # which hard region the generator aimed at
    ip_name: str = ""  # the InnerProduct's Caffe name when not the head's default (fc1, fc<K>)

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    @property
    def features(self) -> int:
        return int(np.prod(self.x.shape[1:]))

    def describe(self) -> str:
        parts = [f"{self.head}+{self.loss}", f"N={self.batch}", f"D={self.features}"]
        parts.append(HEADS[self.head].shape_text(self))
        parts += LOSSES[self.loss].params(self)
        if self.region:
            parts.append(self.region)
        return " ".join(parts)


# ---- losses -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loss:
    """A loss row: what it consumes, the reference call, its value and gradient bounds.

    The `*_each` entries are the same computations for a batch of independent cases (a
    leading case axis on every array; the case supplies only what the cases share): the
    reference without the checks that read data (it runs under ``torch.func.vmap``, the case
    generator having checked the labels), and the bounds of each case."""

    name: str
    caffe_type: str
    consumes: str  # "pred_age" or "logits"
    reference: Callable[[Tensor, Tensor, Case], Tensor]
    value_bound: Callable[[F64, F64, Case, F64, F64 | None], float]
    grad_bound: Callable[[F64, F64, Case, F64, F64 | None], F64]
    reference_each: Callable[[Tensor, Tensor, Case], Tensor]
    value_bound_each: Callable[[F64, F64, Case, F64, F64 | None], F64]
    grad_bound_each: Callable[[F64, F64, Case, F64, F64 | None], F64]
    params: Callable[[Case], list[str]] = lambda case: []  # the case's loss params, described
    rule: str = ""  # the tolerance table's rule for the loss value; default <name>_loss
    has_sigma: bool = False  # the case's sigma is a parameter of the loss (SmoothL1)

    @property
    def labels(self) -> bool:
        """Targets are class labels (the loss reads the logits), not ages."""
        return self.consumes == "logits"

    def kink(self, case: Case) -> tuple[str, str, float] | None:
        """(prediction blob, target blob, distance) of the loss's non-smooth point, where a
        finite difference's step may cross it (SmoothL1: |pred - target| = 1 / sigma^2)."""
        return ("pred_age", "true_age", 1.0 / case.sigma**2) if self.has_sigma else None

    @property
    def value_rule(self) -> str:
        return self.rule or self.name + "_loss"


def _labels(case: Case, k: int) -> tuple[NDArray[np.int64], NDArray[np.bool_], float]:
    lab = np.trunc(case.target.astype(np.float64)).astype(np.int64).reshape(-1)
    valid = (
        np.ones_like(lab, dtype=bool) if case.ignore_label is None else (lab != case.ignore_label)
    )
    norm = case.normalization or "VALID"
    n = {"VALID": int(valid.sum()), "FULL": lab.size, "BATCH_SIZE": lab.size, "NONE": 1}[norm]
    return lab, valid, float(max(n, 1))


def _swl_value(z: F64, t: F64, case: Case, e_z: F64, p: F64 | None) -> float:
    assert p is not None
    lab, valid, norm = _labels(case, z.shape[1])
    return tol.softmax_with_loss(p, tol.softmax(z, p, e_z), lab, valid, norm, ref_losses.FLT_MIN)


def _swl_grad(z: F64, t: F64, case: Case, e_z: F64, p: F64 | None) -> F64:
    assert p is not None
    lab, valid, norm = _labels(case, z.shape[1])
    return tol.softmax_with_loss_grad(p, tol.softmax(z, p, e_z), lab, valid, norm)


def _labels_each(t: F64, case: Case) -> tuple[NDArray[np.int64], NDArray[np.bool_], F64]:
    """`_labels` of each case: t (cases, N) -> labels, valid (cases, N), normalizers (cases,)."""
    lab = np.trunc(t).astype(np.int64).reshape(t.shape[0], -1)
    valid = (
        np.ones_like(lab, dtype=bool) if case.ignore_label is None else (lab != case.ignore_label)
    )
    norm = case.normalization or "VALID"
    size = lab.shape[1]
    n = valid.sum(-1) if norm == "VALID" else np.full(len(lab), {"NONE": 1}.get(norm, size))
    return lab, valid, np.maximum(n, 1).astype(np.float64)


def _swl_value_each(z: F64, t: F64, case: Case, e_z: F64, p: F64 | None) -> F64:
    assert p is not None
    lab, valid, norm = _labels_each(t, case)
    e_p = tol.softmax(z, p, e_z, axis=-1)
    return tol.softmax_with_loss_each(p, e_p, lab, valid, norm, ref_losses.FLT_MIN)


def _swl_grad_each(z: F64, t: F64, case: Case, e_z: F64, p: F64 | None) -> F64:
    assert p is not None
    lab, valid, norm = _labels_each(t, case)
    return tol.softmax_with_loss_grad_each(p, tol.softmax(z, p, e_z, axis=-1), lab, valid, norm)


LOSSES: dict[str, Loss] = {
    row.name: row
    for row in (
        Loss(
            "euclidean",
            "EuclideanLoss",
            "pred_age",
            lambda a, t, c: ref_losses.euclidean_loss(a, t),
            lambda a, t, c, e, _: tol.euclidean_loss(a, t, e),
            lambda a, t, c, e, _: tol.euclidean_loss_grad(a, t, e),
            lambda a, t, c: ref_losses.euclidean_loss(a, t),
            lambda a, t, c, e, _: tol.euclidean_loss_each(a, t, e),
            lambda a, t, c, e, _: tol.euclidean_loss_grad_each(a, t, e),
        ),
        Loss(
            "smooth_l1",
            "Python SmoothL1Loss",
            "pred_age",
            lambda a, t, c: ref_losses.smooth_l1_loss(a, t, c.sigma),
            lambda a, t, c, e, _: tol.smooth_l1_loss(a, t, c.sigma, e),
            lambda a, t, c, e, _: tol.smooth_l1_loss_grad(a, t, c.sigma, e),
            lambda a, t, c: ref_losses.smooth_l1_loss(a, t, c.sigma),
            lambda a, t, c, e, _: tol.smooth_l1_loss_each(a, t, c.sigma, e),
            lambda a, t, c, e, _: tol.smooth_l1_loss_grad_each(a, t, c.sigma, e),
            lambda c: [f"sigma={c.sigma:g}"],
            has_sigma=True,
        ),
        Loss(
            "softmax_with_loss",
            "SoftmaxWithLoss",
            "logits",
            lambda z, t, c: ref_losses.softmax_with_loss(
                z, t, normalization=c.normalization or "VALID", ignore_label=c.ignore_label
            ),
            _swl_value,
            _swl_grad,
            lambda z, t, c: ref_losses.softmax_with_loss_unchecked(
                z, t, normalization=c.normalization or "VALID", ignore_label=c.ignore_label
            ),
            _swl_value_each,
            _swl_grad_each,
            lambda c: (
                [f"norm={c.normalization or 'VALID(default)'}"]
                + ([] if c.ignore_label is None else [f"ignore={c.ignore_label}"])
            ),
            "softmax_with_loss",
        ),
    )
}


def consumed_blob(case: Case, ip_layer: str) -> str:
    """The blob the case's loss reads: the logits (`ip_layer`) or `pred_age`."""
    return ip_layer if LOSSES[case.loss].consumes == "logits" else "pred_age"


def label_blob(case: Case) -> str:
    """The input blob holding the case's targets: `label` (classes) or `true_age`."""
    return "label" if LOSSES[case.loss].consumes == "logits" else "true_age"


# ---- heads --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseBounds:
    """Every bound for one case, from the float64 reference's values (see `Head.bounds`)."""

    ref: dict[str, F64]  # what the bound functions read: blobs, pool5, learnable weights
    forward: dict[str, F64]  # by blob
    loss: Any  # a float; for many cases (`Head.bounds_each`), one per case
    loss_grad: F64  # on d loss / d (the consumed blob)
    backward: dict[str, F64]  # by gradient key: pool5, params, and blobs on the way
    forward_rules: dict[str, str]  # the tolerance table's rule, by blob
    loss_rule: str


@dataclass(frozen=True)
class Head:
    """A head row. Subclasses fill in the parts that differ between the two heads."""

    name: str
    losses: tuple[str, ...]
    summary: str
    fixed_layer: str = "pred_age"
    surgery: str = ""  # the layer whose kernel net surgery sets, if any
    has_bins: bool = False  # K (the case's bins) shapes the head; else its scale does
    renamable: bool = False  # the InnerProduct may carry another name than the default
    layer_types: tuple[str, str, str] = ("InnerProduct", "", "")  # Caffe types along the chain
    fixed_hint: str = ""  # how a net gets its fixed layer right, for an error message

    def default_ip_name(self, bins: int) -> str:
        """The InnerProduct's name in the seed's nets: fc1 or fc<K>."""
        raise NotImplementedError

    def default_ip(self, case: Case) -> str:
        return self.default_ip_name(case.bins)

    def ip_layer(self, case: Case) -> str:
        """The InnerProduct's Caffe name: the case's own (``Case.ip_name``) or the default."""
        return case.ip_name or self.default_ip(case)

    def ip_outputs(self, bins: int) -> int:
        """The InnerProduct's num_output for K = `bins`: K, or 1."""
        return bins if self.has_bins else 1

    def case_bins(self, bins: int) -> int:
        """The `Case.bins` of a case of this head (the default where K plays no part)."""
        return bins if self.has_bins else Case.bins

    def top_of(self, bins: int, scale: float) -> float:
        """The largest age the head can output (its range is [0, top])."""
        raise NotImplementedError

    def reach(self, z: F64) -> F64:
        """What the generators scale the weights by, of pre-activations z (..., N, K): the
        largest |z| (sigmoid) or logit spread (softmax) over the last two axes."""
        raise NotImplementedError

    def region(self, spread: float) -> str:
        """The hard region a `reach` of `spread` puts a case in."""
        raise NotImplementedError

    def check(self, case: Case) -> None:
        """Refuses (ValueError naming the field) a case this head cannot describe."""
        if case.features < 1:
            raise ValueError(f"a head needs at least one feature, got {case.features}")
        if self.has_bins and case.bins < 1:
            raise ValueError(f"the {self.name} head needs K >= 1 bins, got {case.bins}")
        if case.ip_name and not self.renamable and case.ip_name != self.default_ip(case):
            raise ValueError(
                f"the {self.name} head's InnerProduct must be named "
                f"{self.default_ip(case)!r} (as in the seed and its reference), "
                f"not {case.ip_name!r}"
            )

    def outputs(self, case: Case) -> int:
        """The InnerProduct's num_output: K, or 1."""
        return self.ip_outputs(case.bins)

    @property
    def activation(self) -> str:
        """The blob between the InnerProduct and the fixed layer (pred01, prob)."""
        return self.chain[1]

    def shape_text(self, case: Case) -> str:
        """What sets the head's shape beside D: K=<bins> or scale=<s>."""
        return f"K={case.bins}" if self.has_bins else f"scale={case.scale:g}"

    def fixed_text(self, case: Case) -> str:
        raise NotImplementedError

    def shape_metadata(self, case: Case) -> dict[str, str]:
        """The shape parameter as text (ONNX metadata): bins or scale."""
        if self.has_bins:
            return {"bins": str(case.bins)}
        return {"scale": repr(float(case.scale))}

    def module(self, case: Case) -> nn.Module:
        """The PyTorch reference of the case's shape, its learnable params as PyTorch
        initialises them (float32)."""
        raise NotImplementedError

    def reference(self, case: Case, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The PyTorch reference holding the case's weights, in `dtype`."""
        return self.load(self.module(case), case, dtype)

    def prototxt_args(self, case: Case, train: bool = True) -> dict[str, Any]:
        raise NotImplementedError

    def fixed_value(self, case: Case) -> F32:
        """The value the fixed blob must hold (filler or net surgery)."""
        raise NotImplementedError

    def blobs(self, case: Case) -> tuple[str, ...]:
        return (self.ip_layer(case), *self.chain[1:])

    def consumed(self, case: Case) -> str:
        return consumed_blob(case, self.ip_layer(case))

    def reference_values(
        self, case: Case, blobs: dict[str, Any], weights: dict[str, Any] | None = None
    ) -> dict[str, F64]:
        """What the bound functions read: the float64 reference's blobs, the features and the
        learnable weights (the case's, or `weights`), by name."""
        return self._reference(case, blobs, case.x, case.weights if weights is None else weights)

    def _reference(
        self, case: Case, blobs: dict[str, Any], x: F32, weights: dict[str, Any]
    ) -> dict[str, F64]:
        """`blobs`, the features `x` (as pool5) and the learnable `weights` in float64, by
        name: of one case, or of many along a leading case axis (``bounds_each``)."""
        ref: dict[str, F64] = {k: np.asarray(v, dtype=np.float64) for k, v in blobs.items()}
        ref["pool5"] = x.astype(np.float64)
        for k in self.learnable(case):
            ref[k] = np.asarray(weights[k], dtype=np.float64)
        return ref

    chain: tuple[str, ...] = ()

    def forward_bounds(self, ref: dict[str, F64], case: Case) -> dict[str, F64]:
        raise NotImplementedError

    def backward_bounds(
        self,
        ref: dict[str, F64],
        grads: dict[str, F64],
        case: Case,
        fwd: dict[str, F64],
        e_loss_grad: F64,
    ) -> dict[str, F64]:
        """Bounds on d loss / d (pool5, learnable params, and each blob the backward pass
        goes through, by blob name), keyed like `grads`."""
        raise NotImplementedError

    def forward_rule(self, blob: str, case: Case) -> str:
        """The tolerance table's rule for forward blob `blob`."""
        raise NotImplementedError

    def bounds(
        self,
        case: Case,
        blobs: dict[str, Any],
        grads: dict[str, Any],
        weights: dict[str, Any] | None = None,
    ) -> CaseBounds:
        """All bounds for `case` from the float64 reference's `blobs` and `grads` (at the
        case's weights, or `weights`)."""
        ref = self.reference_values(case, blobs, weights)
        row = LOSSES[case.loss]
        return self._bounds(case, ref, grads, row.value_bound, row.grad_bound)

    def bounds_each(
        self,
        case: Case,
        x: F32,
        target: F32,
        weights: dict[str, Any],
        blobs: dict[str, Any],
        grads: dict[str, Any],
    ) -> CaseBounds:
        """`bounds` of many independent cases at once: every array (the features `x`, the
        targets, the weights, the float64 reference's blobs and grads) has a leading case
        axis, and so has every bound (the loss's is one per case). `case` supplies what the
        cases share (head, loss, shapes, loss parameters)."""
        ref = self._reference(case, blobs, x, weights)
        row = LOSSES[case.loss]
        return self._bounds(
            case, ref, grads, row.value_bound_each, row.grad_bound_each, target=target
        )

    def _bounds(
        self,
        case: Case,
        ref: dict[str, F64],
        grads: dict[str, Any],
        value_bound: Callable[[F64, F64, Case, F64, F64 | None], Any],
        grad_bound: Callable[[F64, F64, Case, F64, F64 | None], F64],
        target: F32 | None = None,
    ) -> CaseBounds:
        fwd = self.forward_bounds(ref, case)
        consumed = self.consumed(case)
        t64 = (case.target if target is None else target).astype(np.float64)
        prob = ref.get("prob")
        e_loss = value_bound(ref[consumed], t64, case, fwd[consumed], prob)
        e_lg = grad_bound(ref[consumed], t64, case, fwd[consumed], prob)
        g64 = {k: np.asarray(v, dtype=np.float64) for k, v in grads.items()}
        return CaseBounds(
            ref,
            fwd,
            e_loss,
            e_lg,
            self.backward_bounds(ref, g64, case, fwd, e_lg),
            {blob: "tolerances." + self.forward_rule(blob, case) for blob in self.blobs(case)},
            LOSSES[case.loss].value_rule,
        )

    def gradient_keys(self, case: Case) -> tuple[str, ...]:
        """The gradients every check compares: d loss / d pool5 and each learnable param."""
        return ("pool5", *self.learnable(case))

    def learnable(self, case: Case) -> tuple[str, str]:
        attr = reference.param_name(self.ip_layer(case))
        return (f"{attr}.weight", f"{attr}.bias")

    def load(self, module: nn.Module, case: Case, dtype: torch.dtype) -> nn.Module:
        state = module.state_dict()
        for key in self.learnable(case):
            state[key] = torch.from_numpy(np.array(case.weights[key], copy=True))
        module.load_state_dict(state)
        return module.to(dtype)


@dataclass(frozen=True)
class SigmoidScale(Head):
    chain: tuple[str, ...] = ("fc1", "pred01", "pred_age")

    layer_types: tuple[str, str, str] = ("InnerProduct", "Sigmoid", "Scale")
    fixed_hint: str = "the seed's Scale is fixed at 99 with lr_mult 0"

    def default_ip_name(self, bins: int) -> str:
        return "fc1"

    def top_of(self, bins: int, scale: float) -> float:
        return float(scale)

    def reach(self, z: F64) -> F64:
        return np.asarray(np.abs(z).max(axis=(-2, -1)))

    def region(self, spread: float) -> str:
        return "saturating" if spread > 20 else "linear"

    def fixed_text(self, case: Case) -> str:
        return f"scale {case.scale:g}"

    def forward_rule(self, blob: str, case: Case) -> str:
        return {"fc1": "inner_product", "pred01": "sigmoid", "pred_age": "scale"}[blob]

    def module(self, case: Case) -> nn.Module:
        return reference.SigmoidScaleHead(case.features, case.scale)

    def prototxt_args(self, case: Case, train: bool = True) -> dict[str, Any]:
        args: dict[str, Any] = {"head": self.name, "features": case.features, "scale": case.scale}
        if train:
            args.update(loss=case.loss, sigma=case.sigma)
        return args

    def fixed_value(self, case: Case) -> F32:
        return np.array([case.scale], dtype=np.float32)

    def forward_bounds(self, ref: dict[str, F64], case: Case) -> dict[str, F64]:
        x, w, b = ref["pool5"], ref["fc1.weight"], ref["fc1.bias"]
        e_fc1 = tol.inner_product(x, w, b)
        e_p01 = tol.sigmoid(ref["pred01"], e_fc1)
        e_age = tol.scale(ref["pred_age"], case.scale, e_p01)
        return {"fc1": e_fc1, "pred01": e_p01, "pred_age": e_age}

    def backward_bounds(
        self,
        ref: dict[str, F64],
        grads: dict[str, F64],
        case: Case,
        fwd: dict[str, F64],
        e_loss_grad: F64,
    ) -> dict[str, F64]:
        e_g01 = tol.scale_grad(grads["pred_age"], case.scale, e_loss_grad)
        e_gfc1 = tol.sigmoid_grad(grads["pred01"], ref["pred01"], e_g01, fwd["pred01"])
        e_x, e_w, e_b = tol.inner_product_grads(
            ref["pool5"], ref["fc1.weight"], grads["fc1"], e_gfc1
        )
        return {
            "pool5": e_x,
            "fc1.weight": e_w,
            "fc1.bias": e_b,
            "pred_age": e_loss_grad,
            "pred01": e_g01,
            "fc1": e_gfc1,
        }


@dataclass(frozen=True)
class Expectation(Head):
    chain: tuple[str, ...] = ("logits", "prob", "pred_age")
    has_bins: bool = True
    renamable: bool = True

    layer_types: tuple[str, str, str] = ("InnerProduct", "Softmax", "Convolution")
    fixed_hint: str = "run `crossval surgery` on the net, or train from its output"

    def default_ip_name(self, bins: int) -> str:
        return f"fc{bins}"

    def top_of(self, bins: int, scale: float) -> float:
        return float(bins - 1)

    def reach(self, z: F64) -> F64:
        return np.asarray((z.max(-1) - z.min(-1)).max(-1))

    def region(self, spread: float) -> str:
        return "spread>100" if spread > 100 else ("spread>88" if spread > 88 else "moderate")

    def fixed_text(self, case: Case) -> str:
        return f"kernel arange({case.bins})"

    def forward_rule(self, blob: str, case: Case) -> str:
        return (
            "inner_product"
            if blob == self.ip_layer(case)
            else {
                "prob": "softmax",
                "pred_age": "dot_fixed",
            }[blob]
        )

    def module(self, case: Case) -> nn.Module:
        return reference.ExpectationHead(case.features, case.bins, ip_name=self.ip_layer(case))

    def prototxt_args(self, case: Case, train: bool = True) -> dict[str, Any]:
        args: dict[str, Any] = {"head": self.name, "features": case.features, "bins": case.bins}
        if case.ip_name:
            args["ip_name"] = case.ip_name
        if train:
            args.update(
                loss=case.loss,
                sigma=case.sigma,
                normalization=case.normalization,
                ignore_label=case.ignore_label,
            )
        return args

    def fixed_value(self, case: Case) -> F32:
        return np.arange(case.bins, dtype=np.float32)[None, :]

    def forward_bounds(self, ref: dict[str, F64], case: Case) -> dict[str, F64]:
        ip = self.ip_layer(case)
        w_key, b_key = self.learnable(case)
        x, w, b = ref["pool5"], ref[w_key], ref[b_key]
        e_z = tol.inner_product(x, w, b)
        e_p = tol.softmax(ref[ip], ref["prob"], e_z, axis=-1)
        e_age = tol.dot_fixed(ref["prob"], self.fixed_value(case).astype(np.float64), e_p)
        return {ip: e_z, "prob": e_p, "pred_age": e_age}

    def backward_bounds(
        self,
        ref: dict[str, F64],
        grads: dict[str, F64],
        case: Case,
        fwd: dict[str, F64],
        e_loss_grad: F64,
    ) -> dict[str, F64]:
        ip = self.ip_layer(case)
        blob_bounds: dict[str, F64] = {}
        if self.consumed(case) == ip:
            e_gz = e_loss_grad
        else:
            k = self.fixed_value(case).astype(np.float64)
            e_gp = tol.dot_fixed_grad(grads["pred_age"], k, e_loss_grad)
            e_gz = tol.softmax_grad(grads["prob"], ref["prob"], e_gp, fwd["prob"])
            blob_bounds = {"pred_age": e_loss_grad, "prob": e_gp}
        w_key, b_key = self.learnable(case)
        e_x, e_w, e_b = tol.inner_product_grads(ref["pool5"], ref[w_key], grads[ip], e_gz)
        return {"pool5": e_x, w_key: e_w, b_key: e_b, **blob_bounds, ip: e_gz}


HEADS: dict[str, Head] = {
    row.name: row
    for row in (
        SigmoidScale(
            "sigmoid_scale",
            ("euclidean", "smooth_l1"),
            "InnerProduct(1) -> Sigmoid -> Scale fixed at 99",
        ),
        Expectation(
            "expectation",
            ("euclidean", "smooth_l1", "softmax_with_loss"),
            "InnerProduct(K) -> Softmax -> Convolution with kernel arange(K)",
            surgery="pred_age",
        ),
    )
}

if tuple(HEADS) != HEAD_NAMES or tuple(LOSSES) != LOSS_NAMES:
    raise ImportError(
        f"crossval.names lists heads {HEAD_NAMES} and losses {LOSS_NAMES}; the tables hold "
        f"{tuple(HEADS)} and {tuple(LOSSES)}"
    )

COMBINATIONS: tuple[tuple[str, str], ...] = tuple(
    (h.name, loss) for h in HEADS.values() for loss in h.losses
)
