"""Deliberately wrong implementations of the heads and losses: realistic port bugs.

Each is an ``Impl`` the checks must reject, whether it stands in for a port (the float32
PyTorch side) or for the reference itself. Rows name the mistake and where it shows."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossval import reference
from crossval.reference import losses as ref_losses

from ..checks import Impl, ModuleFactory
from ..heads import Case


class _ExpectationKernelFromOne(reference.ExpectationHead):
    """Bins valued 1..K instead of 0..K-1 (a public DEX port: +1 year on every age)."""

    def __init__(self, in_features: int, bins: int) -> None:
        super().__init__(in_features, bins)
        self.pred_age.weight.copy_(torch.arange(1, bins + 1, dtype=self.pred_age.weight.dtype))


class _ExpectationSoftmaxOverBatch(reference.ExpectationHead):
    """Softmax over the batch axis instead of the bins."""

    def forward(self, pool5: Tensor) -> dict[str, Tensor]:
        ip: Tensor = self.get_submodule(self.ip_attr)(pool5.reshape(pool5.shape[0], -1))
        prob = reference.softmax(ip, axis=0)
        pred_age: Tensor = self.pred_age(prob)
        return {self.ip_layer: ip, "prob": prob, "pred_age": pred_age}


class _ExpectationTrainableKernel(reference.ExpectationHead):
    """The surgery kernel left trainable: a Parameter, so an optimizer moves it."""

    def __init__(self, in_features: int, bins: int) -> None:
        super().__init__(in_features, bins)
        kernel = self.pred_age.weight.detach().clone()
        del self.pred_age.weight
        self.pred_age.weight = nn.Parameter(kernel)


class _SigmoidTrainableScale(reference.SigmoidScaleHead):
    """The fixed x99 scale left trainable."""

    def __init__(self, in_features: int, scale: float = 99.0) -> None:
        super().__init__(in_features, scale)
        value = self.pred_age.weight.detach().clone()
        del self.pred_age.weight
        self.pred_age.weight = nn.Parameter(value)


def _sigmoid_module(cls: type[reference.SigmoidScaleHead]) -> ModuleFactory:
    """The port factory of a sigmoid head mutant: `cls` at the case's features and scale."""

    def factory(case: Case, dtype: torch.dtype) -> nn.Module:
        return cls(case.features, case.scale)

    return factory


def _expectation_module(cls: type[reference.ExpectationHead]) -> ModuleFactory:
    """The port factory of an expectation head mutant: `cls` at the case's features and
    bins."""

    def factory(case: Case, dtype: torch.dtype) -> nn.Module:
        return cls(case.features, case.bins)

    return factory


def _scale_100(case: Case, dtype: torch.dtype) -> nn.Module:
    return reference.SigmoidScaleHead(case.features, scale=100.0)


def _mse_for_euclidean(a: Tensor, t: Tensor, case: Case) -> Tensor:
    return F.mse_loss(a, t.reshape(a.shape))


@dataclass(frozen=True)
class Mutant:
    impl: Impl
    head: str
    loss: str
    mistake: str
    shows_in: tuple[str, ...]  # check kinds that must flag it: forward, loss, gradient
    when: str = "always"  # the inputs it shows at (batch > 1, sigma != 1, ...)


MUTANTS: dict[str, Mutant] = {
    m.impl.name: m
    for m in (
        Mutant(
            Impl("scale-100", module=_scale_100),
            "sigmoid_scale",
            "euclidean",
            "fixed scale 100 instead of 99 (ages 0..100)",
            ("forward", "loss", "gradient"),
        ),
        Mutant(
            Impl("kernel-1..K", module=_expectation_module(_ExpectationKernelFromOne)),
            "expectation",
            "euclidean",
            "surgery kernel 1..K instead of 0..K-1",
            ("fixed", "forward", "loss"),
        ),
        Mutant(
            Impl("softmax-over-batch", module=_expectation_module(_ExpectationSoftmaxOverBatch)),
            "expectation",
            "euclidean",
            "softmax over the batch axis",
            ("forward", "loss", "gradient"),
            "only at batch > 1",
        ),
        Mutant(
            Impl("mse-for-euclidean", loss=_mse_for_euclidean),
            "sigmoid_scale",
            "euclidean",
            "MSELoss (mean) for EuclideanLoss (sum / 2N)",
            ("loss", "gradient"),
        ),
    )
}

# Ports that compute the same forward and gradients but train a constant: only training
# shows them (crossval.training reports "fixed parameter moved").
TRAINING_MUTANTS: dict[str, Mutant] = {
    m.impl.name: m
    for m in (
        Mutant(
            Impl("trainable-kernel", module=_expectation_module(_ExpectationTrainableKernel)),
            "expectation",
            "euclidean",
            "surgery kernel left trainable (requires_grad)",
            ("train",),
        ),
        Mutant(
            Impl("trainable-scale", module=_sigmoid_module(_SigmoidTrainableScale)),
            "sigmoid_scale",
            "euclidean",
            "fixed x99 scale left trainable",
            ("train",),
        ),
    )
}


# ---- the catalogue: every realistic port bug, each a small named port ------------------------
#
# `CATALOGUE` holds the forward/loss/gradient mutants (MUTANTS' rows and more), run through
# `Harness.run_case(case, port=...)`; `SOLVER_MUTANTS` hold training mutants that are an
# alternative update rule (a `CaffeSolver` subclass), run through a training trajectory;
# `TRAINING_MUTANTS` are ports training a constant. `EQUIVALENT` lists mistakes that cannot
# change any output of these heads, each with the reason, kept out of the count.


class _SigmoidBiasDropped(reference.SigmoidScaleHead):
    """The InnerProduct bias blob (Caffe blob 1) never applied."""

    def forward(self, pool5: Tensor) -> dict[str, Tensor]:
        fc1 = F.linear(pool5.reshape(pool5.shape[0], -1), self.fc1.weight)
        pred01 = reference.sigmoid(fc1)
        pred_age: Tensor = self.pred_age(pred01)
        return {"fc1": fc1, "pred01": pred01, "pred_age": pred_age}


class _SigmoidBiasData(reference.SigmoidScaleHead):
    """The bias added through `.data`: the forward is right, the bias gets no gradient."""

    def forward(self, pool5: Tensor) -> dict[str, Tensor]:
        x = pool5.reshape(pool5.shape[0], -1)
        fc1 = F.linear(x, self.fc1.weight) + self.fc1.bias.data
        pred01 = reference.sigmoid(fc1)
        pred_age: Tensor = self.pred_age(pred01)
        return {"fc1": fc1, "pred01": pred01, "pred_age": pred_age}


class SigmoidGradFromInput(torch.autograd.Function):
    """Caffe's sigmoid forward; backward x (1 - x) (the input) instead of y (1 - y). The
    `sigmoid-grad-from-input` mutant's sigmoid, and the Sigmoid layer's in the layer tests."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return reference.sigmoid(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        out: Tensor = g * x * (1 - x)
        return out


class _SigmoidWrongGrad(reference.SigmoidScaleHead):
    def forward(self, pool5: Tensor) -> dict[str, Tensor]:
        fc1: Tensor = self.fc1(pool5.reshape(pool5.shape[0], -1))
        pred01: Tensor = SigmoidGradFromInput.apply(fc1)  # type: ignore[no-untyped-call]
        pred_age: Tensor = self.pred_age(pred01)
        return {"fc1": fc1, "pred01": pred01, "pred_age": pred_age}


class _ExpectationKernel(reference.ExpectationHead):
    """An expectation head whose fixed kernel is `kernel(bins)`."""

    def kernel(self, bins: int) -> Tensor:
        raise NotImplementedError

    def __init__(self, in_features: int, bins: int) -> None:
        super().__init__(in_features, bins)
        self.pred_age.weight.copy_(self.kernel(bins).to(self.pred_age.weight.dtype)[None])


class _ExpectationKernelZeros(_ExpectationKernel):
    """Net surgery forgotten: the kernel keeps its filler value, zeros."""

    def kernel(self, bins: int) -> Tensor:
        return torch.zeros(bins)


class _ExpectationKernelFlipped(_ExpectationKernel):
    """The kernel flipped, as a converter from a true-convolution framework does."""

    def kernel(self, bins: int) -> Tensor:
        return torch.arange(bins - 1, -1, -1)


class _ExpectationSoftmaxNoShift(reference.ExpectationHead):
    """Softmax as exp(z) / sum exp(z), without subtracting the max."""

    def forward(self, pool5: Tensor) -> dict[str, Tensor]:
        ip: Tensor = self.get_submodule(self.ip_attr)(pool5.reshape(pool5.shape[0], -1))
        e = torch.exp(ip)
        prob = e / e.sum(dim=1, keepdim=True)
        pred_age: Tensor = self.pred_age(prob)
        return {self.ip_layer: ip, "prob": prob, "pred_age": pred_age}


class _SoftmaxDiagonalGrad(torch.autograd.Function):
    """Caffe's softmax forward; a hand-written backward keeping only the diagonal, g p."""

    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        p = reference.softmax(z, axis=1)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        out: Tensor = g * p
        return out


class _ExpectationSoftmaxDiagonalGrad(reference.ExpectationHead):
    def forward(self, pool5: Tensor) -> dict[str, Tensor]:
        ip: Tensor = self.get_submodule(self.ip_attr)(pool5.reshape(pool5.shape[0], -1))
        prob: Tensor = _SoftmaxDiagonalGrad.apply(ip)  # type: ignore[no-untyped-call]
        pred_age: Tensor = self.pred_age(prob)
        return {self.ip_layer: ip, "prob": prob, "pred_age": pred_age}


# -- Euclidean and SmoothL1 -------------------------------------------------------------------


def _diff(a: Tensor, t: Tensor) -> Tensor:
    return a - t.reshape(a.shape).to(a.dtype)


def _euclidean_no_half(a: Tensor, t: Tensor, case: Case) -> Tensor:
    d = _diff(a, t)
    return (d * d).sum() / a.shape[0]


def _euclidean_sum(a: Tensor, t: Tensor, case: Case) -> Tensor:
    d = _diff(a, t)
    return (d * d).sum() / 2


def _euclidean_per_element(a: Tensor, t: Tensor, case: Case) -> Tensor:
    d = _diff(a, t)
    return (d * d).sum() / d.numel() / 2


class _EuclideanHalvedGrad(torch.autograd.Function):
    """Caffe's forward sum / 2N; a Python-layer backward that reuses the 2N: diff / 2N."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, t: Tensor) -> Tensor:
        d = _diff(a, t)
        ctx.save_for_backward(d)
        return (d * d).sum() / a.shape[0] / 2

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (d,) = ctx.saved_tensors
        return g * d / d.shape[0] / 2, None


def _euclidean_halved_grad(a: Tensor, t: Tensor, case: Case) -> Tensor:
    out: Tensor = _EuclideanHalvedGrad.apply(a, t)  # type: ignore[no-untyped-call]
    return out


def _smooth_l1_sigma_as_beta(a: Tensor, t: Tensor, case: Case) -> Tensor:
    return F.smooth_l1_loss(a, t.reshape(a.shape).to(a.dtype), beta=case.sigma)


def _smooth_l1_sigma_ignored(a: Tensor, t: Tensor, case: Case) -> Tensor:
    return ref_losses.smooth_l1_loss(a, t, 1.0)


# -- SoftmaxWithLoss --------------------------------------------------------------------------


def _swl(z: Tensor, t: Tensor, case: Case, **kw: Any) -> Tensor:
    args: dict[str, Any] = {
        "normalization": case.normalization or "VALID",
        "ignore_label": case.ignore_label,
    }
    args.update(kw)
    return ref_losses.softmax_with_loss(z, t, **args)


def _swl_softmax_twice(z: Tensor, t: Tensor, case: Case) -> Tensor:
    return _swl(reference.softmax(z, axis=1), t, case)


def _swl_normalization_ignored(z: Tensor, t: Tensor, case: Case) -> Tensor:
    return _swl(z, t, case, normalization="VALID")


def _swl_ignored_in_normalizer(z: Tensor, t: Tensor, case: Case) -> Tensor:
    norm = case.normalization or "VALID"
    return _swl(z, t, case, normalization="BATCH_SIZE" if norm == "VALID" else norm)


def _swl_ignore_by_range(z: Tensor, t: Tensor, case: Case) -> Tensor:
    ignore = case.ignore_label
    in_range = ignore is not None and 0 <= ignore < z.shape[1]
    return _swl(z, t, case, ignore_label=None if in_range else ignore)


def _swl_all_ignored_nan(z: Tensor, t: Tensor, case: Case) -> Tensor:
    loss = _swl(z, t, case)
    if (case.normalization or "VALID") != "VALID" or case.ignore_label is None:
        return loss
    valid = (t.detach().trunc() != case.ignore_label).sum().to(z.dtype)
    return loss * (valid / valid)  # PyTorch's mean over no element: 0 / 0


def _swl_labels_rounded(z: Tensor, t: Tensor, case: Case) -> Tensor:
    r = t.detach().round()
    r = torch.where(r == z.shape[1], r - 1, r)
    return _swl(z, r, case)


def _swl_plain(z: Tensor, t: Tensor, case: Case, how: str) -> Tensor:
    """SoftmaxWithLoss by autograd: `how` is "no-clamp" (-log p), "log-softmax" (PyTorch's
    cross entropy) or "clamp" (Caffe's clamped forward, differentiated through the clamp)."""
    lab = t.detach().reshape(-1).trunc().to(torch.int64)
    valid = (
        torch.ones_like(lab, dtype=torch.bool)
        if case.ignore_label is None
        else lab != case.ignore_label
    )
    index = torch.where(valid, lab, torch.zeros_like(lab))[:, None]
    if how == "log-softmax":
        nll = -F.log_softmax(z, dim=1).gather(1, index)
    else:
        p = reference.softmax(z, axis=1).gather(1, index)
        nll = -torch.log(p.clamp_min(ref_losses.FLT_MIN) if how == "clamp" else p)
    per = torch.where(valid[:, None], nll, torch.zeros_like(nll))
    n = lab.numel()
    norm = {"VALID": int(valid.sum()), "FULL": n, "BATCH_SIZE": n, "NONE": 1}[
        case.normalization or "VALID"
    ]
    return per.sum() / max(norm, 1)


def _swl_no_clamp(z: Tensor, t: Tensor, case: Case) -> Tensor:
    return _swl_plain(z, t, case, "no-clamp")


def _swl_log_softmax(z: Tensor, t: Tensor, case: Case) -> Tensor:
    return _swl_plain(z, t, case, "log-softmax")


def _swl_clamp_gradient(z: Tensor, t: Tensor, case: Case) -> Tensor:
    return _swl_plain(z, t, case, "clamp")


class _ExpectationLegacySoftmax(reference.ExpectationHead):
    """nn.Softmax() without dim: the legacy rule picks dim 1 for 2-D input."""

    def forward(self, pool5: Tensor) -> dict[str, Tensor]:
        ip: Tensor = self.get_submodule(self.ip_attr)(pool5.reshape(pool5.shape[0], -1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Implicit dimension choice"
            prob: Tensor = nn.Softmax()(ip)
        pred_age: Tensor = self.pred_age(prob)
        return {self.ip_layer: ip, "prob": prob, "pred_age": pred_age}


_S, _E = "sigmoid_scale", "expectation"
_EUC, _SL1, _SWL = "euclidean", "smooth_l1", "softmax_with_loss"
_LG = ("loss", "gradient")

CATALOGUE: dict[str, Mutant] = {
    **MUTANTS,
    **{
        m.impl.name: m
        for m in (
            Mutant(
                Impl("bias-dropped", module=_sigmoid_module(_SigmoidBiasDropped)),
                _S,
                _EUC,
                "InnerProduct bias blob (blob 1) not applied by the converted layer",
                ("forward", "loss", "gradient"),
            ),
            Mutant(
                Impl("kernel-zeros", module=_expectation_module(_ExpectationKernelZeros)),
                _E,
                _EUC,
                "net surgery forgotten: kernel left at its filler (zeros), every age 0",
                ("fixed", "forward", "loss"),
            ),
            Mutant(
                Impl("kernel-flipped", module=_expectation_module(_ExpectationKernelFlipped)),
                _E,
                _EUC,
                "kernel flipped (K-1..0) as a true convolution would, by a converter",
                ("fixed", "forward", "loss"),
            ),
            Mutant(
                Impl(
                    "softmax-no-max-shift", module=_expectation_module(_ExpectationSoftmaxNoShift)
                ),
                _E,
                _EUC,
                "softmax as exp(z)/sum exp(z), no max subtraction: overflow to NaN",
                ("forward",),
                "only at logits beyond 88",
            ),
            Mutant(
                Impl(
                    "softmax-diagonal-grad",
                    module=_expectation_module(_ExpectationSoftmaxDiagonalGrad),
                ),
                _E,
                _EUC,
                "hand-written softmax backward keeps only g*p, drops the -p (g.p) term",
                ("gradient",),
                "gradient only: forward identical",
            ),
            Mutant(
                Impl("bias-via-data", module=_sigmoid_module(_SigmoidBiasData)),
                _S,
                _EUC,
                "converted layer adds its bias through .data: the bias never trains",
                ("gradient",),
                "gradient only: forward identical",
            ),
            Mutant(
                Impl("sigmoid-grad-from-input", module=_sigmoid_module(_SigmoidWrongGrad)),
                _S,
                _EUC,
                "custom sigmoid backward uses x(1-x) of the input, not y(1-y)",
                ("gradient",),
                "gradient only: forward identical",
            ),
            Mutant(
                Impl("euclidean-no-half", loss=_euclidean_no_half),
                _S,
                _EUC,
                "EuclideanLoss without the 1/2: sum / N",
                _LG,
            ),
            Mutant(
                Impl("euclidean-sum", loss=_euclidean_sum),
                _S,
                _EUC,
                "EuclideanLoss not divided by the batch: sum / 2",
                _LG,
                "only at batch > 1",
            ),
            Mutant(
                Impl("euclidean-halved-grad", loss=_euclidean_halved_grad),
                _S,
                _EUC,
                "Python EuclideanLoss layer: backward diff / 2N, copied from the forward",
                ("gradient",),
                "gradient only: loss identical",
            ),
            Mutant(
                Impl("smoothl1-sigma-as-beta", loss=_smooth_l1_sigma_as_beta),
                _S,
                _SL1,
                "Fast R-CNN sigma passed as PyTorch SmoothL1 beta (should be 1/sigma^2)",
                _LG,
                "only at sigma != 1",
            ),
            Mutant(
                Impl("smoothl1-sigma-ignored", loss=_smooth_l1_sigma_ignored),
                _S,
                _SL1,
                "SmoothL1 sigma (loss_param) dropped by the converter: sigma 1 always",
                _LG,
                "only at sigma != 1",
            ),
            Mutant(
                Impl("swl-softmax-twice", loss=_swl_softmax_twice),
                _E,
                _SWL,
                "net ends in Softmax and the loss applies softmax again",
                _LG,
            ),
            Mutant(
                Impl("swl-normalization-ignored", loss=_swl_normalization_ignored),
                _E,
                _SWL,
                "loss_param normalization (and normalize: false) dropped: VALID always",
                _LG,
                "only at non-default normalization",
            ),
            Mutant(
                Impl("swl-ignored-in-normalizer", loss=_swl_ignored_in_normalizer),
                _E,
                _SWL,
                "VALID normalizer counts ignored positions too (divides by N)",
                _LG,
                "only with ignored labels",
            ),
            Mutant(
                Impl("swl-ignore-by-range", loss=_swl_ignore_by_range),
                _E,
                _SWL,
                "valid mask as label < K: an in-range ignore_label is trained on",
                _LG,
                "only with an in-range ignore_label",
            ),
            Mutant(
                Impl("swl-all-ignored-nan", loss=_swl_all_ignored_nan),
                _E,
                _SWL,
                "PyTorch mean over valid positions: NaN (0/0) where Caffe gives 0",
                _LG,
                "only when every label is ignored",
            ),
            Mutant(
                Impl("swl-no-clamp", loss=_swl_no_clamp),
                _E,
                _SWL,
                "-log(p) without the FLT_MIN clamp: inf where Caffe gives 87.34",
                ("loss",),
                "only at logit spreads beyond ~104",
            ),
            Mutant(
                Impl("swl-log-softmax", loss=_swl_log_softmax),
                _E,
                _SWL,
                "F.cross_entropy (log-softmax, no clamp) for SoftmaxWithLoss",
                ("loss",),
                "only at logit spreads beyond ~87",
            ),
            Mutant(
                Impl("swl-clamp-gradient", loss=_swl_clamp_gradient),
                _E,
                _SWL,
                "autograd through the FLT_MIN clamp: zero gradient where Caffe's is p - 1",
                ("gradient",),
                "gradient only, at logit spreads beyond ~87",
            ),
            Mutant(
                Impl("swl-labels-rounded", loss=_swl_labels_rounded),
                _E,
                _SWL,
                "float labels rounded (int(x + 0.5)) instead of truncated",
                _LG,
                "only at fractional labels",
            ),
        )
    },
}

# Mistakes that cannot change any output of these heads: kept out of the count.
EQUIVALENT: dict[str, tuple[Mutant, str]] = {
    m.impl.name: (m, why)
    for m, why in (
        (
            Mutant(
                Impl("euclidean-per-element", loss=_euclidean_per_element),
                _S,
                _EUC,
                "EuclideanLoss divided by the element count instead of N",
                (),
            ),
            "both heads output one value per example (count == N), so the normalizers agree",
        ),
        (
            Mutant(
                Impl("softmax-no-dim", module=_expectation_module(_ExpectationLegacySoftmax)),
                _E,
                _EUC,
                "nn.Softmax() without dim",
                (),
            ),
            "the legacy implicit-dim rule picks dim 1 for 2-D input: the bins, as Caffe",
        ),
    )
}
