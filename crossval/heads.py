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

import reference
from reference import losses as ref_losses

from . import tolerances as tol

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

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    @property
    def features(self) -> int:
        return int(np.prod(self.x.shape[1:]))

    def describe(self) -> str:
        parts = [f"{self.head}+{self.loss}", f"N={self.batch}", f"D={self.features}"]
        if self.head == "expectation":
            parts.append(f"K={self.bins}")
        else:
            parts.append(f"scale={self.scale:g}")
        if self.loss == "smooth_l1":
            parts.append(f"sigma={self.sigma:g}")
        if self.loss == "softmax_with_loss":
            parts.append(f"norm={self.normalization or 'VALID(default)'}")
            if self.ignore_label is not None:
                parts.append(f"ignore={self.ignore_label}")
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

    def ip_layer(self, case: Case) -> str:
        raise NotImplementedError

    def reference(self, case: Case, dtype: torch.dtype = torch.float32) -> nn.Module:
        raise NotImplementedError

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
        ref: dict[str, F64] = {k: np.asarray(v, dtype=np.float64) for k, v in blobs.items()}
        ref["pool5"] = case.x.astype(np.float64)
        source = case.weights if weights is None else weights
        for k in self.learnable(case):
            ref[k] = np.asarray(source[k], dtype=np.float64)
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
        ref: dict[str, F64] = {k: np.asarray(v, dtype=np.float64) for k, v in blobs.items()}
        ref["pool5"] = x.astype(np.float64)
        for k in self.learnable(case):
            ref[k] = np.asarray(weights[k], dtype=np.float64)
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
            "softmax_with_loss" if case.loss == "softmax_with_loss" else case.loss + "_loss",
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

    def ip_layer(self, case: Case) -> str:
        return "fc1"

    def forward_rule(self, blob: str, case: Case) -> str:
        return {"fc1": "inner_product", "pred01": "sigmoid", "pred_age": "scale"}[blob]

    def reference(self, case: Case, dtype: torch.dtype = torch.float32) -> nn.Module:
        return self.load(reference.SigmoidScaleHead(case.features, case.scale), case, dtype)

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

    def ip_layer(self, case: Case) -> str:
        return f"fc{case.bins}"

    def forward_rule(self, blob: str, case: Case) -> str:
        return (
            "inner_product"
            if blob == self.ip_layer(case)
            else {
                "prob": "softmax",
                "pred_age": "dot_fixed",
            }[blob]
        )

    def reference(self, case: Case, dtype: torch.dtype = torch.float32) -> nn.Module:
        return self.load(reference.ExpectationHead(case.features, case.bins), case, dtype)

    def prototxt_args(self, case: Case, train: bool = True) -> dict[str, Any]:
        args: dict[str, Any] = {"head": self.name, "features": case.features, "bins": case.bins}
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
        x, w, b = ref["pool5"], ref[f"{ip}.weight"], ref[f"{ip}.bias"]
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
        e_x, e_w, e_b = tol.inner_product_grads(ref["pool5"], ref[f"{ip}.weight"], grads[ip], e_gz)
        return {"pool5": e_x, f"{ip}.weight": e_w, f"{ip}.bias": e_b, **blob_bounds, ip: e_gz}


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

COMBINATIONS: tuple[tuple[str, str], ...] = tuple(
    (h.name, loss) for h in HEADS.values() for loss in h.losses
)
