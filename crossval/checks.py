"""The cross-framework checks: one case through real Caffe, the float32 PyTorch reference and
the float64 reference, compared blob by blob and gradient by gradient.

For every blob, the loss, and the gradients with respect to ``pool5`` and each learnable
param, three comparisons are made:

- ``caffe~ref64``: Caffe (float32) against the float64 reference, within ``bound``;
- ``torch~ref64``: the float32 PyTorch reference against float64, within ``bound``;
- ``torch~caffe``: the two float32 implementations, within ``2 * bound``.

Weights go into Caffe through ``transfer`` and are read back: that is a bit-exact check, and
so is the fixed blob (99 or arange(K)) against the value the head prescribes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from . import transfer
from .caffe_side.replies import Params, RunReply
from .compare import Comparison, exact, three_way
from .heads import HEADS, LOSSES, Case, Head, label_blob
from .tolerances import finite_difference as fd_tol
from .tolerances.finite_difference import CAFFE_FD_STEP, CAFFE_FD_THRESHOLD
from .worker import CaffeWorker


@dataclass(frozen=True)
class CaffeRun:
    """A head's case run in Caffe: the worker's reply and, beside it, the learnable params
    sent (transferred from the case's weights), which the reply's params are checked
    against."""

    reply: RunReply
    sent: Params


def single_threaded() -> None:
    """Runs start here (the CLI, and every `Harness`): the heads are tiny, intra-op threads
    only add latency (torch's thread pool on 2 cores makes small ops 100x slower). Not done at
    import, so importing crossval leaves the process's torch settings alone."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@dataclass
class CaseResult:
    case: Case
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]

    @property
    def passed(self) -> bool:
        return not self.failures

    def first_failure(self) -> Comparison | None:
        fails = self.failures
        return fails[0] if fails else None


ModuleFactory = Callable[[Case, torch.dtype], nn.Module]
LossFn = Callable[[torch.Tensor, torch.Tensor, Case], torch.Tensor]


@dataclass(frozen=True)
class Impl:
    """A PyTorch implementation of a head and its loss: the reference, a port, or a mutant."""

    name: str
    module: ModuleFactory | None = None  # None: the head's reference
    loss: LossFn | None = None  # None: the loss table's reference

    def build(self, head: Head, case: Case, dtype: torch.dtype) -> nn.Module:
        if self.module is None:
            return head.reference(case, dtype)
        return head.load(self.module(case, torch.float32), case, dtype)

    def loss_fn(self, case: Case) -> LossFn:
        return self.loss if self.loss is not None else LOSSES[case.loss].reference


REFERENCE = Impl("reference")


@dataclass
class TorchRun:
    blobs: dict[str, np.ndarray]
    loss: float
    grads: dict[str, np.ndarray]  # d loss / d (pool5, learnable params, intermediate blobs)
    state: dict[str, np.ndarray]


def run_torch(
    head: Head, impl: Impl, case: Case, dtype: torch.dtype, module: nn.Module | None = None
) -> TorchRun:
    """Forward and backward of `impl` on `case` in `dtype` (on `module` if given, which must
    already hold the case's weights)."""
    module = impl.build(head, case, dtype) if module is None else module
    x = torch.from_numpy(case.x).to(dtype).requires_grad_(True)
    target = torch.from_numpy(case.target).to(dtype)
    blobs = module(x)
    for t in blobs.values():
        if t.requires_grad:
            t.retain_grad()
    consumed = blobs[head.consumed(case)]
    loss = impl.loss_fn(case)(consumed, target, case)
    loss.backward()  # type: ignore[no-untyped-call]
    grads: dict[str, np.ndarray] = {"pool5": _np(x.grad)}
    for name, t in blobs.items():
        grads[name] = _np(t.grad) if t.grad is not None else np.zeros(tuple(t.shape))
    params = dict(module.named_parameters())
    for key in head.learnable(case):
        p = params.get(key)
        grads[key] = (
            _np(p.grad)
            if p is not None and p.grad is not None
            else np.zeros(case.weights[key].shape)
        )
    state = {k: _np(v) for k, v in module.state_dict().items()}
    return TorchRun({k: _np(v) for k, v in blobs.items()}, float(loss.detach()), grads, state)


def _np(t: torch.Tensor | None) -> np.ndarray:
    assert t is not None
    return t.detach().cpu().numpy()


class Harness:
    """Runs cases; caches prototxts, Caffe param layouts and surgery per net."""

    def __init__(self, worker: CaffeWorker) -> None:
        single_threaded()
        self.worker = worker
        self._protos: dict[tuple[Any, ...], str] = {}
        self._layouts: dict[str, dict[str, list[tuple[int, ...]]]] = {}
        self._modules: dict[tuple[Any, ...], nn.Module] = {}

    def module(self, impl: Impl, head: Head, case: Case, dtype: torch.dtype) -> nn.Module:
        """`impl`'s module for this net shape, built once, holding the case's weights."""
        key = (impl, head.name, case.features, case.bins, case.scale, case.ip_name, dtype)
        module = self._modules.get(key)
        if module is None:
            if len(self._modules) > 256:
                self._modules.clear()
            module = impl.build(head, case, dtype)
            self._modules[key] = module
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name in head.learnable(case):
                params[name].copy_(torch.from_numpy(case.weights[name]))
        for p in params.values():
            p.grad = None
        return module

    def prototxt(self, head: Head, case: Case, train: bool = True) -> str:
        """The head's train net for `case` (batch 1; the worker reshapes per example),
        loaded once in the worker with its fixed kernel set by net surgery."""
        args = head.prototxt_args(case, train)
        key = tuple(sorted(args.items()))
        proto = self._protos.get(key)
        if proto is None:
            proto = self.worker.prototxt(batch=1, **args)
            got = self.worker.params(proto, phase="TRAIN", surgery=head.surgery)
            self._layouts[proto] = {k: [tuple(a.shape) for a in v] for k, v in got.params.items()}
            self._protos[key] = proto
        return proto

    def run_caffe(self, head: Head, case: Case) -> CaffeRun:
        """Caffe forward+backward with the case's learnable weights transferred in; the fixed
        blob keeps what Caffe itself put there (Scale filler, or the surgery)."""
        return self.submit_caffe(head, case)()

    def submit_caffe(
        self, head: Head, case: Case, all_diffs: bool = False
    ) -> Callable[[], CaffeRun]:
        """`run_caffe` started in the worker; call the result to wait for it. With
        `all_diffs`, the diff of every blob comes back (not just the inputs')."""
        proto = self.prototxt(head, case)
        ip = head.ip_layer(case)
        learnable = {k: torch.from_numpy(case.weights[k]) for k in head.learnable(case)}
        params = transfer.state_dict_to_caffe(learnable, {ip: self._layouts[proto][ip]})
        label = label_blob(case)
        pending = self.worker.submit_run(
            prototxt=proto,
            inputs={"pool5": case.x, label: case.target},
            params=params,
            backward=True,
            surgery=head.surgery,
            all_diffs=all_diffs,
        )

        return lambda: CaffeRun(pending(), params)

    def run_case(
        self, case: Case, *, port: Impl | None = None, reference: Impl | None = None
    ) -> CaseResult:
        """All comparisons for `case`.

        `port` replaces the float32 PyTorch side (a port under test); `reference` replaces
        the reference itself, float64 and float32 (to show the checks catch a wrong one).
        """
        head = HEADS[case.head]
        desc = case.describe()
        ref_impl = reference or REFERENCE
        pending = self.submit_caffe(head, case)  # Caffe runs while PyTorch does
        impl32 = port or ref_impl
        t32 = run_torch(
            head, impl32, case, torch.float32, self.module(impl32, head, case, torch.float32)
        )
        t64 = run_torch(
            head, ref_impl, case, torch.float64, self.module(ref_impl, head, case, torch.float64)
        )
        run = pending()
        caffe = run.reply
        out = CaseResult(case)
        add = out.comparisons.append

        # Copies, bit for bit: weights into Caffe and back, and the fixed blob on both sides.
        for layer, blobs in run.sent.items():
            for i, value in enumerate(blobs):
                add(exact("transfer", f"{layer}/{i}", caffe.params[layer][i], value, desc))
        fixed, want = head.fixed_layer, head.fixed_value(case)
        add(exact("fixed caffe", f"{fixed}/0", caffe.params[fixed][0], want, desc))
        key = transfer.state_dict_key(fixed, 0)
        if key in t32.state:
            add(exact("fixed torch", key, t32.state[key].astype(np.float32), want, desc))

        b = head.bounds(case, t64.blobs, t64.grads)

        def triple(
            kind: str, name: str, c_val: Any, t_val: Any, r_val: Any, bound: Any, rule: str
        ) -> None:
            out.comparisons += three_way(kind, name, c_val, t_val, r_val, bound, rule, desc)

        for blob in head.blobs(case):
            triple(
                "forward",
                blob,
                caffe.blobs[blob],
                t32.blobs[blob],
                b.ref[blob],
                b.forward[blob],
                b.forward_rules[blob],
            )
        triple(
            "loss",
            "loss",
            np.array(caffe.blobs["loss"]).reshape(()),
            np.array(t32.loss),
            np.array(t64.loss),
            np.array(b.loss),
            "tolerances." + b.loss_rule,
        )
        caffe_grads = {"pool5": caffe.diffs["pool5"]}
        ip = head.ip_layer(case)
        for i, k in enumerate(head.learnable(case)):
            caffe_grads[k] = caffe.param_diffs[ip][i]
        for name in head.gradient_keys(case):
            triple(
                "gradient",
                f"d loss/d {name}",
                caffe_grads[name],
                t32.grads[name],
                t64.grads[name],
                b.backward[name],
                f"tolerances.{b.loss_rule}_grad -> backward chain",
            )
        return out


# ---- finite differences ---------------------------------------------------------------------

# Caffe's own GradientChecker settings and crossval's slack: tolerances.finite_difference.


@dataclass
class FiniteDifference:
    """One element's analytic gradient against its central difference."""

    where: str
    computed: float
    estimated: float
    verdict: str  # "ok", "FAIL", or "kink" (skipped: the step crosses a non-smooth point)
    slack: float = 0.0

    def __str__(self) -> str:
        return (
            f"finite difference {self.where}: backward gives {self.computed:.7g}, central "
            f"difference {self.estimated:.7g} ({self.verdict}; allowed "
            f"{CAFFE_FD_THRESHOLD:g} * max(|a|, |n|, 1) + {self.slack:.3g})"
        )


def caffe_gradient_check(
    harness: Harness, case: Case, samples: int = 6, seed: int = 0
) -> list[FiniteDifference]:
    """Caffe's GradientChecker (float32, step 1e-2, threshold 1e-3 relative to
    max(|analytic|, |numeric|, 1)) on `samples` elements each of pool5 and the IP weight and
    bias, run inside the worker."""
    head = HEADS[case.head]
    proto = harness.prototxt(head, case)
    ip = head.ip_layer(case)
    keys = head.learnable(case)
    learnable = {k: torch.from_numpy(case.weights[k]) for k in keys}
    params = transfer.state_dict_to_caffe(learnable, {ip: harness._layouts[proto][ip]})
    rng = np.random.default_rng(seed)
    targets: list[tuple[str, str, int]] = []
    for kind, name, size in (
        ("blob", "pool5", case.x.size),
        ("param", f"{ip}/0", case.weights[keys[0]].size),
        ("param", f"{ip}/1", case.weights[keys[1]].size),
    ):
        for idx in rng.choice(size, size=min(samples, size), replace=False):
            targets.append((kind, name, int(idx)))
    label = label_blob(case)
    kink = LOSSES[case.loss].kink(case)
    # Each element's slack on top of Caffe's threshold: see tolerances.finite_difference.
    e_l = loss_bound(case)
    truncation = _reference_truncation(case, targets, CAFFE_FD_STEP)
    slacks = fd_tol.slacks(e_l, truncation, CAFFE_FD_STEP)
    got = harness.worker.gradient_check(
        slacks=slacks,
        prototxt=proto,
        inputs={"pool5": case.x, label: case.target},
        params=params,
        targets=targets,
        step=CAFFE_FD_STEP,
        threshold=CAFFE_FD_THRESHOLD,
        surgery=head.surgery,
        kink=kink,
    )
    return [
        FiniteDifference(f"d loss/d {r.name}[{r.index}]", r.computed, r.estimated, r.verdict, slack)
        for r, slack in zip(got.results, slacks, strict=True)
    ]


def _objective64(case: Case) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor]]:
    """The float64 reference loss as a function of (pool5, W, b), and those three tensors."""
    head = HEADS[case.head]
    module = head.reference(case, torch.float64)
    keys = head.learnable(case)
    target = torch.from_numpy(case.target).double()
    row = LOSSES[case.loss]

    def objective(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        blobs = torch.func.functional_call(module, {keys[0]: w, keys[1]: b}, (x,))
        consumed = blobs[head.consumed(case)]
        return row.reference(consumed, target, case)

    args = [torch.from_numpy(case.x).double()]
    args += [torch.from_numpy(case.weights[k]).double() for k in keys]
    return objective, args


def _reference_truncation(
    case: Case, targets: list[tuple[str, str, int]], step: float
) -> list[float]:
    """|central difference - analytic gradient| of the float64 reference, per target."""
    objective, args = _objective64(case)
    leaves = [a.clone().requires_grad_(True) for a in args]
    objective(*leaves).backward()  # type: ignore[no-untyped-call]
    out = []
    with torch.no_grad():
        for _, name, idx in targets:
            pos = 0 if name == "pool5" else (1 if name.endswith("/0") else 2)
            grad = leaves[pos].grad
            assert grad is not None
            values = []
            for delta in (step, -step):
                moved = [a.clone() for a in args]
                moved[pos].view(-1)[idx] += delta
                values.append(float(objective(*moved)))
            fd = (values[0] - values[1]) / (2 * step)
            out.append(abs(fd - float(grad.reshape(-1)[idx])))
    return out


def torch_gradcheck(case: Case) -> bool:
    """torch.autograd.gradcheck of the float64 reference head + loss, with respect to the
    features and the learnable params (raises GradcheckError naming the input on failure)."""
    objective, args = _objective64(case)
    leaves = tuple(a.requires_grad_(True) for a in args)
    return bool(torch.autograd.gradcheck(objective, leaves, fast_mode=True))


def loss_bound(case: Case) -> float:
    """The float32 error bound of the case's loss value (tolerance table, float64 reference)."""
    head = HEADS[case.head]
    t64 = run_torch(head, REFERENCE, case, torch.float64)
    ref = head.reference_values(case, t64.blobs)
    fwd = head.forward_bounds(ref, case)
    row = LOSSES[case.loss]
    consumed = head.consumed(case)
    return row.value_bound(
        ref[consumed], case.target.astype(np.float64), case, fwd[consumed], ref.get("prob")
    )
