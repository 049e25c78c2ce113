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

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from . import tolerances as tol
from . import transfer
from .compare import Comparison, exact
from .heads import HEADS, LOSSES, Case, Head
from .worker import CaffeWorker

# The heads are tiny: intra-op threads only add latency (and torch's thread pool on 2 cores
# makes small ops 100x slower).
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

    def by_check(self, check: str) -> list[Comparison]:
        return [c for c in self.comparisons if c.check.startswith(check)]


@dataclass
class TorchRun:
    blobs: dict[str, np.ndarray]
    loss: float
    grads: dict[str, np.ndarray]  # d loss / d (pool5, learnable params, intermediate blobs)


def run_torch(head: Head, module: nn.Module, case: Case, dtype: torch.dtype) -> TorchRun:
    """Forward and backward of the reference `module` on `case` in `dtype`."""
    x = torch.from_numpy(case.x).to(dtype).requires_grad_(True)
    target = torch.from_numpy(case.target).to(dtype)
    blobs = module(x)
    for t in blobs.values():
        t.retain_grad()
    loss_row = LOSSES[case.loss]
    consumed = blobs[head.ip_layer(case)] if loss_row.consumes == "logits" else blobs["pred_age"]
    loss = loss_row.reference(consumed, target, case)
    loss.backward()  # type: ignore[no-untyped-call]
    grads: dict[str, np.ndarray] = {"pool5": _np(x.grad)}
    for name, t in blobs.items():
        grads[name] = _np(t.grad) if t.grad is not None else np.zeros(tuple(t.shape))
    params = dict(module.named_parameters())
    for key in head.learnable(case):
        grads[key] = _np(params[key].grad)
    return TorchRun({k: _np(v) for k, v in blobs.items()}, float(loss.detach()), grads)


def _np(t: torch.Tensor | None) -> np.ndarray:
    assert t is not None
    return t.detach().cpu().numpy()


class Harness:
    """Runs cases; caches prototxts and Caffe param layouts per net shape."""

    def __init__(self, worker: CaffeWorker) -> None:
        self.worker = worker
        self._protos: dict[tuple[Any, ...], str] = {}
        self._layouts: dict[str, dict[str, list[tuple[int, ...]]]] = {}

    def prototxt(self, head: Head, case: Case, train: bool = True) -> str:
        args = head.prototxt_args(case, train)
        key = tuple(sorted(args.items()))
        proto = self._protos.get(key)
        if proto is None:
            proto = self.worker.call("prototxt", batch=1, **args)
            self._protos[key] = proto
        return proto

    def layout(self, proto: str) -> dict[str, list[tuple[int, ...]]]:
        lay = self._layouts.get(proto)
        if lay is None:
            got = self.worker.call("params", prototxt=proto, phase="TRAIN")
            lay = {k: [tuple(a.shape) for a in v] for k, v in got["params"].items()}
            self._layouts[proto] = lay
        return lay

    def run_caffe(self, head: Head, case: Case, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        proto = self.prototxt(head, case)
        params = transfer.state_dict_to_caffe(state, self.layout(proto))
        label_blob = "label" if LOSSES[case.loss].consumes == "logits" else "true_age"
        result: dict[str, Any] = self.worker.call(
            "run",
            prototxt=proto,
            inputs={"pool5": case.x, label_blob: case.target},
            params=params,
            backward=True,
        )
        result["sent"] = params
        return result

    def run_case(self, case: Case, module: nn.Module | None = None) -> CaseResult:
        """All comparisons for `case`. `module` replaces the float32 reference (a port)."""
        head = HEADS[case.head]
        desc = case.describe()
        ref32 = module if module is not None else head.reference(case, torch.float32)
        ref64 = head.reference(case, torch.float64)
        caffe = self.run_caffe(head, case, head.reference(case, torch.float32).state_dict())
        t32 = run_torch(head, ref32, case, torch.float32)
        t64 = run_torch(head, ref64, case, torch.float64)
        out = CaseResult(case)
        add = out.comparisons.append

        # Copies: weights in and out of Caffe, and the fixed blob, bit for bit.
        for layer, blobs in caffe["sent"].items():
            for i, value in enumerate(blobs):
                add(exact("transfer", f"{layer}/{i}", caffe["params"][layer][i], value, desc))
        fixed = head.fixed_layer
        add(exact("fixed", f"{fixed}/0", caffe["params"][fixed][0], head.fixed_value(case), desc))

        ref = dict(t64.blobs)
        ref["pool5"] = case.x.astype(np.float64)
        for key in head.learnable(case):
            ref[key] = case.weights[key].astype(np.float64)
        fwd = head.forward_bounds(ref, case)

        def triple(
            kind: str, name: str, c_val: Any, t_val: Any, r_val: Any, bound: Any, rule: str
        ) -> None:
            add(Comparison(f"{kind} caffe~ref64", name, c_val, r_val, bound, rule, desc))
            add(Comparison(f"{kind} torch~ref64", name, t_val, r_val, bound, rule, desc))
            add(Comparison(f"{kind} torch~caffe", name, t_val, c_val, tol.cross(bound), rule, desc))

        for blob in head.blobs(case):
            triple(
                "forward",
                blob,
                caffe["blobs"][blob],
                t32.blobs[blob],
                ref[blob],
                fwd[blob],
                "tolerances." + _rule_of(head, blob, case),
            )

        loss_row = LOSSES[case.loss]
        consumed = head.ip_layer(case) if loss_row.consumes == "logits" else "pred_age"
        target = case.target.astype(np.float64)
        prob = ref.get("prob")
        e_loss = loss_row.value_bound(ref[consumed], target, case, fwd[consumed], prob)
        triple(
            "loss",
            "loss",
            np.array(caffe["blobs"]["loss"]).reshape(()),
            np.array(t32.loss),
            np.array(t64.loss),
            np.array(e_loss),
            f"tolerances.{case.loss}_loss"
            if case.loss != "softmax_with_loss"
            else "tolerances.softmax_with_loss",
        )

        e_lg = loss_row.grad_bound(ref[consumed], target, case, fwd[consumed], prob)
        bwd = head.backward_bounds(ref, t64.grads, case, fwd, e_lg)
        caffe_grads = {"pool5": caffe["diffs"]["pool5"]}
        ip = head.ip_layer(case)
        for i, key in enumerate(head.learnable(case)):
            caffe_grads[key] = caffe["param_diffs"][ip][i]
        for name, bound in bwd.items():
            triple(
                "gradient",
                f"d loss/d {name}",
                caffe_grads[name],
                t32.grads[name],
                t64.grads[name],
                bound,
                "tolerances.inner_product_grad <- backward chain",
            )
        return out


def _rule_of(head: Head, blob: str, case: Case) -> str:
    if blob == head.ip_layer(case):
        return "inner_product"
    if blob == "pred01":
        return "sigmoid"
    if blob == "prob":
        return "softmax"
    return "scale" if head.name == "sigmoid_scale" else "dot_fixed"
