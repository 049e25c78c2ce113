"""One example through Caffe and the port, and every check: each segment of the net (one
layer where the port returns its bottoms and tops) judged by the float64 reference on the
port's own inputs, forward and backward; the same for Caffe on Caffe's blobs."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from crossval.reference import param_name

from .. import examplegen
from ..caffe_side.replies import RunReply
from ..compare import Comparison, exact
from ..errors import CrossvalError, UsageError
from ..inputs import closest
from ..localize import localize
from ..net import Net, NetLayer, Segment, read_net, segments
from ..tolerances import sampled
from ..tolerances import segments as segtol
from ..tolerances.layers import WIDE
from ..transfer import state_dict_key
from ..worker import CaffeError, CaffeWorker
from . import plugins
from .port import Binding, PortFailure, PortGuard, squeeze

F64 = NDArray[np.float64]
_T = TypeVar("_T")
RANDOM_OPS = ("dropout", "bernoulli", "rand", "normal", "multinomial", "poisson")


@dataclass(frozen=True)
class PortExample:
    """The numbers one example is generated from (``crossval.examplegen``)."""

    seed: int
    input_scale: float = 1.0
    weight_scale: float = 1.0
    batch: int = 2

    def describe(self) -> str:
        return (
            f"batch {self.batch}, seed {self.seed}, input scale {self.input_scale:.3g}, "
            f"weight scale {self.weight_scale:.3g}"
        )


@dataclass
class Finding:
    """Something wrong, pinned to a layer (or segment) of the net."""

    kind: str  # forward, backward, shape, fixed, unmapped, frozen, param-shape, ...
    side: str  # "port" or "caffe"
    layer: str  # the layer's (or segment's) label
    position: int  # index of its first layer in Caffe's order
    text: str
    key: str = ""  # the blob or param key at fault
    local: bool = True

    @property
    def name(self) -> str:
        return self.key

    def __str__(self) -> str:
        where = "layer" if self.local else "segment"
        return f"{where} {self.layer}: {self.text}"


@dataclass
class ExampleVerdict:
    example: PortExample
    comparisons: list[Comparison] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    local_layers: list[str] = field(default_factory=list)  # verified on their own
    segment_layers: list[str] = field(default_factory=list)  # verified inside a segment
    not_returned: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def port_findings(self) -> list[Finding]:
        return [f for f in self.findings if f.side == "port"]

    @property
    def caffe_findings(self) -> list[Finding]:
        return [f for f in self.findings if f.side == "caffe"]


def _f64(a: Any) -> F64:
    if isinstance(a, Tensor):
        return a.detach().to(torch.float64).cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _np(a: Any) -> np.ndarray:
    """The values as numpy, in their own precision (the reference widens what it reads)."""
    if isinstance(a, Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _compared(
    check: str,
    blob: str,
    actual: Any,
    desired: F64,
    bound: F64,
    rule: str,
    case: str,
    positions: NDArray[np.int64] | None,
) -> Comparison:
    """`actual` (the whole array) against `desired`: the whole, or the sampled elements at
    `positions` (flat indices; ``tolerances.sampled``)."""
    whole = np.asarray(actual)
    if positions is None:
        return Comparison(check, blob, whole.reshape(desired.shape), desired, bound, rule, case)
    return Comparison(
        check,
        blob,
        whole.reshape(-1)[positions],
        desired,
        bound,
        rule,
        case,
        positions=positions,
        shape=whole.shape,
    )


@dataclass
class _DiffSum:
    """A bottom diff summed over the segments reading the blob (autograd and Caffe's Split
    both sum them): the reference, its bound, the contributing segments and, when sampled,
    the flat positions of the elements it holds."""

    desired: F64
    bound: F64
    segs: list[tuple[Segment, str]]
    rule: str
    positions: NDArray[np.int64] | None

    def add(self, d: F64, bound: F64, positions: NDArray[np.int64] | None, seg: Any) -> bool:
        """Add one reader's diff; False when it holds other elements than the sum (two
        readers sampled at different positions): the sum is then not known whole."""
        self.segs.append(seg)
        if positions is not None and self.positions is None:  # whole so far: keep the sample
            self.desired = self.desired.reshape(-1)[positions]
            self.bound = self.bound.reshape(-1)[positions]
            self.positions = positions
        elif positions is None and self.positions is not None:
            d, bound = d.reshape(-1)[self.positions], np.asarray(bound).reshape(-1)[self.positions]
        elif positions is not None and self.positions is not None:
            if not np.array_equal(positions, self.positions):
                return False
        self.desired = self.desired + d
        self.bound = self.bound + bound
        return True


def _top_diff_seed(ex: PortExample) -> int:
    """The seed of an example's top diffs (drawn by the Caffe worker and here alike)."""
    return ex.seed ^ 0x5EED


@contextlib.contextmanager
def _threads_each() -> Iterator[None]:
    """PyTorch's threads during an example: the cores Caffe's worker leaves (it runs Caffe on
    one thread, ``worker.CaffeWorker``) shared by the two threads of the example (the port's
    run and checks, Caffe's side's checks; ``_Beside``), at least one each. On two cores,
    one: a PyTorch thread sharing its core with Caffe or with the other side would make
    every parallel region of PyTorch wait for it."""
    before = torch.get_num_threads()
    caffe = os.environ.get("CROSSVAL_CAFFE_THREADS", "1")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    left = (cores or 1) - (int(caffe) if caffe.isdigit() else 1)
    torch.set_num_threads(max(1, min(before, left // 2)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Beside(Generic[_T]):
    """`work` run on a thread of its own (a daemon: an interrupted command is not held up
    by it); ``result()`` waits for it and returns its value or raises its exception."""

    def __init__(self, work: Callable[[], _T]) -> None:
        self._work = work
        self._value: list[_T] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            self._value.append(self._work())
        except BaseException as exc:  # handed to the thread that asks for the result
            self._error = exc

    def result(self) -> _T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value[0]


class _Running:
    """Forward hooks on the port's named submodules: which one is running (for an exception
    raised inside it) and which ran in training mode or drew random numbers."""

    def __init__(self, port: nn.Module) -> None:
        self.stack: list[str] = []
        self.handles = []
        for name, module in port.named_modules():
            if not name:
                continue
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave()))

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.stack.append(name)

        return hook

    def _leave(self) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            if self.stack:
                self.stack.pop()

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _RandomCalls(TorchFunctionMode):
    """Records torch functions that draw random numbers (dropout in training, rand...) and
    batch_norm with batch statistics, with the submodule running them."""

    def __init__(self, running: _Running) -> None:
        super().__init__()
        self.running = running
        self.calls: list[str] = []

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        random = any(r in name for r in RANDOM_OPS) and kwargs.get("training", True) is not False
        if "dropout" in name and len(args) >= 3 and args[2] is False:
            random = False
        if "batch_norm" in name and (kwargs.get("training") or (len(args) > 5 and args[5])):
            random = True
        if random:
            where = self.running.stack[-1] if self.running.stack else "the port's forward"
            self.calls.append(f"{name} in {where}")
        return func(*args, **kwargs)


class PortChecker:
    """Caffe and one port of `prototxt` (params bound through ``transfer.state_dict_key``
    and `mapping`), checked example by example."""

    def __init__(
        self,
        worker: CaffeWorker,
        prototxt: str,
        port: nn.Module,
        mapping: Mapping[str, str] | None = None,
        weights: str = "",
        generate: bool = True,
        *,
        surgery: str = "",
        guard: PortGuard | None = None,
    ) -> None:
        """`surgery`: a layer whose kernel Caffe's side sets to arange(K) (the seed's
        expectation head appended by validate-port's --head); `guard` runs the port's own
        code (see ``port.PortGuard``)."""
        if "force_backward" not in prototxt.split("layer", 1)[0]:
            prototxt = "force_backward: true\n" + prototxt
        self.worker, self.prototxt, self.port = worker, prototxt, port
        self.net: Net = read_net(worker, prototxt, "TEST")
        unknown = plugins.unsupported(lay.spec for lay in self.net.compute_layers)
        if unknown:
            raise UsageError(
                f"the reference has no layer for {', '.join(unknown)}, so crossval cannot judge "
                "the net there; a Python layer of your own needs a plugin that registers its "
                "reference and bounds (--layer-plugin MODULE, see crossval.portcheck.plugins)"
            )
        self.recipe = self.net.recipe()
        self.mapping = dict(mapping or {})
        self.weights, self.generate = weights, generate or not weights
        self.surgery = surgery
        self.guard = guard or PortGuard()
        self.started = 0  # examples begun
        self.current: tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]] | None = None
        try:
            self.base = worker.params(
                prototxt, phase="TEST", weights=weights, surgery=surgery
            ).params
        except CaffeError as exc:
            raise UsageError(str(exc).replace("params failed in the Caffe worker: ", "")) from None
        # the base arrays (alive as long as the checker, so their ids are theirs): which
        # port tensor holds which of them unchanged since it was copied in, and their digest
        self._base_ids = {id(a) for blobs in self.base.values() for a in blobs}
        self._loaded: dict[str, tuple[int, int, int]] = {}
        self._base_digest: tuple[tuple[int, ...], str] | None = None
        self.notes: list[str] = []
        trained = [
            f"{n or 'the port'} ({type(m).__name__})" for n, m in port.named_modules() if m.training
        ]
        port.eval()
        self.notes.append(
            "the port is run in eval() (deploy semantics, Caffe's TEST phase)"
            + (f"; it was made in training mode: {', '.join(trained[:6])}" if trained else "")
        )
        still = [f"{n} ({type(m).__name__})" for n, m in port.named_modules() if m.training]
        if still:
            self.notes.append(f"modules still in training mode after eval(): {', '.join(still)}")
        self.bindings, self.static = self._bind()

    # ---- params -------------------------------------------------------------------------

    def _position(self, layer: str) -> int:
        return next((i for i, lay in enumerate(self.net.layers) if lay.name == layer), 0)

    def _port_finding(
        self, kind: str, lay: NetLayer | None, otherwise: str, text: str, key: str = ""
    ) -> Finding:
        """A finding about the port at layer `lay` (its label and position), or at
        `otherwise` (first in the net) when no layer is known."""
        if lay is None:
            return Finding(kind, "port", otherwise, 0, text, key)
        return Finding(kind, "port", lay.describe(), self._position(lay.name), text, key)

    def _bind(self) -> tuple[list[Binding], list[Finding]]:
        """Every Caffe param to a port tensor. A Caffe param with no port tensor is bad
        usage (exit 2: a mapping is missing); everything else is a finding about the port."""
        params = dict(self.port.named_parameters())
        tensors = dict(self.port.state_dict(keep_vars=True))
        out, findings, missing = [], [], []
        for lay in self.net.compute_layers:
            for p in lay.params:
                try:
                    key = state_dict_key(lay.name, p.index, self.mapping)
                except CrossvalError as exc:
                    missing.append(str(exc))
                    continue
                if key not in tensors and p.lr_mult == 0:
                    self.notes.append(
                        f"Caffe {lay.name}/{p.index} is fixed (lr_mult 0) and the port has no "
                        f"tensor {key!r} for it: its constant is checked through "
                        f"{lay.name}'s values only"
                    )
                    continue
                if key not in tensors:
                    missing.append(
                        f"Caffe param {lay.name}/{p.index} {p.shape} has no port tensor {key!r}"
                    )
                    continue
                b = Binding(
                    lay.name,
                    p.index,
                    key,
                    p.shape,
                    tuple(tensors[key].shape),
                    p.lr_mult,
                    key in params and params[key].requires_grad,
                )
                out.append(b)
                where = (lay.label, self._position(lay.name))
                if not b.fits:
                    findings.append(
                        Finding(
                            "param-shape",
                            "port",
                            *where,
                            f"Caffe param {lay.name}/{p.index} has shape {p.shape}, the port's "
                            f"{key!r} {b.port_shape}",
                            key,
                        )
                    )
                elif p.lr_mult > 0 and not b.trainable:
                    findings.append(
                        Finding(
                            "frozen",
                            "port",
                            *where,
                            f"Caffe param {lay.name}/{p.index} is learnable (lr_mult "
                            f"{p.lr_mult:g}), but the port's {key!r} does not require a "
                            "gradient: the port would never train it",
                            key,
                        )
                    )
                elif p.lr_mult == 0:
                    if b.trainable:
                        findings.append(
                            Finding(
                                "fixed",
                                "port",
                                *where,
                                f"Caffe {lay.name}/{p.index} has lr_mult 0, but the port's "
                                f"{key!r} is a trainable parameter: the port would train a "
                                "constant",
                                key,
                            )
                        )
                    mine = tensors[key].detach().cpu().to(torch.float32).numpy()
                    cmp = exact(
                        "fixed port~caffe",
                        f"{key} vs Caffe {lay.name}/{p.index}",
                        mine.reshape(p.shape),
                        np.asarray(self.base[lay.name][p.index], dtype=np.float32),
                    )
                    if not cmp.passed:
                        findings.append(Finding("fixed", "port", *where, str(cmp), key))
        names = [f"{x.name}/{p.index}" for x in self.net.compute_layers for p in x.params]
        for k in self.mapping:
            if k not in names:
                missing.append(
                    f"--map key {k!r} names no Caffe param (keys are layer/index)"
                    + closest(k, names)
                )
        if missing:
            raise UsageError(
                "weights do not map between Caffe and the port:\n  " + "\n  ".join(missing)
            )
        bound_keys = {b.key for b in out}
        for key, t in params.items():
            if key in bound_keys:
                continue
            owner = key.rsplit(".", 1)[0]
            owned = next((x for x in self.net.compute_layers if param_name(x.name) == owner), None)
            findings.append(
                Finding(
                    "unmapped",
                    "port",
                    owned.describe() if owned else "(no Caffe layer)",
                    self._position(owned.name) if owned else len(self.net.layers),
                    f"the port has parameter {key!r} {tuple(t.shape)}, which no Caffe param "
                    + (f"of {owned.name} maps to" if owned else "maps to"),
                    key,
                )
            )
        return out, findings

    # ---- one example --------------------------------------------------------------------

    def arrays(self, ex: PortExample) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
        return examplegen.generate(
            self.recipe,
            ex.seed,
            ex.input_scale,
            ex.weight_scale,
            ex.batch,
            self.base,
            self.generate,
        )

    def _producer(self, blob: str) -> NetLayer | None:
        writers = self.net.writers(blob)
        return writers[-1] if writers else None

    def _submit_caffe(
        self,
        ex: PortExample,
        arrays: tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]] | None,
    ) -> Callable[[dict[str, list[np.ndarray]] | None], RunReply]:
        """Start Caffe's forward and backward on the example in the worker (the top diffs
        drawn there from the example's seed) and return what waits for it. A generated example
        (`arrays` None) is made by the worker itself (no 550 MB of VGG-16 weights through a
        pipe) while this process makes it too; the waiting function takes the weights this
        process made and checks by digest that Caffe ran with them (None: the reply is only
        drained, after the port failed)."""
        seed = (_top_diff_seed(ex), list(self.net.outputs))
        if arrays is not None:
            inputs, params = arrays
            wait = self.worker.submit_run(
                self.prototxt,
                inputs,
                params,
                phase="TEST",
                backward=True,
                surgery=self.surgery,
                return_params=False,
                all_diffs=True,
                top_diff_seed=seed,
            )
            return lambda _: wait()
        generated = self.worker.submit_run_generated(
            self.prototxt,
            self.recipe,
            ex.seed,
            ex.input_scale,
            ex.weight_scale,
            ex.batch,
            learnable=self.generate,
            phase="TEST",
            weights=self.weights,
            surgery=self.surgery,
            backward=True,
            all_diffs=True,
            top_diff_seed=seed,
        )

        def collect(params: dict[str, list[np.ndarray]] | None) -> RunReply:
            got = generated()
            if params is not None and got.digest != self._digest(params):
                raise CrossvalError(
                    "the Caffe worker generated other weights than the port got (different "
                    "numpy?); rerun with --replay"
                )
            return got

        return collect

    def _digest(self, params: dict[str, list[np.ndarray]]) -> str:
        """``examplegen.digest`` of `params`; made once for the net's given weights (with
        --weights and no --generate every example's params are those arrays, unchanged:
        the engine never writes them)."""
        ids = tuple(id(a) for layer in sorted(params) for a in params[layer])
        if not all(i in self._base_ids for i in ids):
            return examplegen.digest(params)
        if self._base_digest is None or self._base_digest[0] != ids:
            self._base_digest = (ids, examplegen.digest(params))
        return self._base_digest[1]

    def run(
        self,
        ex: PortExample,
        arrays: tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]] | None = None,
    ) -> ExampleVerdict:
        """One example: generated from `ex`, or the given (inputs, params) `arrays`. Caffe
        runs in the worker meanwhile, on the other core."""
        # float64 copies made once per example; the net's given weights (a trained net's,
        # fixed kernels) once per run
        fixed = [a for blobs in self.base.values() for a in blobs]
        with WIDE.active(keep=fixed):
            return self._run(ex, arrays)

    def _run(
        self,
        ex: PortExample,
        arrays: tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]] | None,
    ) -> ExampleVerdict:
        desc = ex.describe() if arrays is None else f"replayed example, batch {ex.batch}"
        self.started += 1
        pending = self._submit_caffe(ex, arrays)
        caffe_side: _Beside[tuple[RunReply, ExampleVerdict]] | None = None
        with _threads_each():
            try:
                inputs, params = self.arrays(ex) if arrays is None else arrays
                self.current = (inputs, params)
                # Caffe's reply is collected and Caffe's side checked on a thread of its own
                # (from the moment Caffe's blobs arrive), while this one runs the port and
                # checks it on the shapes Caffe should give every blob (the declared ones at
                # this batch)
                caffe_side = _Beside(lambda: self._caffe_side(ex, desc, pending, params))
                self.guard.begin_example(self.started, desc, ex, inputs, params)
                batch = next(iter(inputs.values())).shape[0] if inputs else ex.batch
                expected = {b: (batch, *s[1:]) if s else s for b, s in self.net.blobs.items()}
                top_diffs = self._top_diffs(ex, expected)
                verdict = self._port_side(ex, desc, inputs, params, top_diffs, expected)
            except BaseException:
                # the worker takes one request at a time: its reply is collected before the
                # port's own failure, the one to report, goes on up
                with contextlib.suppress(CrossvalError):
                    if caffe_side is None:
                        pending(None)
                    else:
                        caffe_side.result()
                raise
            caffe, checked = caffe_side.result()
        shapes = {b: tuple(np.shape(v)) for b, v in caffe.blobs.items() if b in expected}
        drawn = caffe.top_diffs
        if shapes != {b: expected[b] for b in shapes} or not all(
            k in top_diffs and np.array_equal(drawn[k], top_diffs[k]) for k in drawn
        ):
            # a blob whose shape does not follow the batch: the port again, on Caffe's shapes
            verdict = self._port_side(ex, desc, inputs, params, drawn, shapes)
        verdict.notes.extend(checked.notes)
        verdict.comparisons.extend(checked.comparisons)
        verdict.findings.extend(checked.findings)
        return verdict

    def _caffe_side(
        self,
        ex: PortExample,
        desc: str,
        pending: Callable[[dict[str, list[np.ndarray]] | None], RunReply],
        params: dict[str, list[np.ndarray]],
    ) -> tuple[RunReply, ExampleVerdict]:
        """Caffe's reply, and Caffe's blobs checked (notes, comparisons and findings of
        their own, added after the port's)."""
        caffe = pending(params)
        checked = ExampleVerdict(ex)
        self._check_caffe(checked, caffe, params, desc, ex.seed)
        return caffe, checked

    def _top_diffs(
        self, ex: PortExample, shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, np.ndarray]:
        """The diffs the backward starts from at the net's outputs, drawn from the example's
        seed as the Caffe worker draws them (at Caffe's shapes)."""
        return examplegen.top_diffs(_top_diff_seed(ex), [(o, shapes[o]) for o in self.net.outputs])

    def _port_side(
        self,
        ex: PortExample,
        desc: str,
        inputs: dict[str, np.ndarray],
        params: dict[str, list[np.ndarray]],
        top_diffs: dict[str, np.ndarray],
        shapes: Mapping[str, tuple[int, ...]],
    ) -> ExampleVerdict:
        """The port run on the example and checked, Caffe's blobs having `shapes`."""
        verdict = ExampleVerdict(ex, findings=list(self.static), notes=list(self.notes))
        got = self._run_port(verdict, inputs, params, top_diffs)
        if got is None:
            return verdict
        values, grads, pgrads, _ = got
        self._inputs_kept(verdict, inputs, values)
        shaped = self._shapes(verdict, values, shapes)
        returned = [b for b in self.net.blobs if b in values]
        verdict.not_returned = [
            b for b in self.net.blobs if b not in values and b not in self.net.inputs
        ]
        segs = segments(self.net, returned)
        self._unverified(verdict, segs)
        seen = {k: _np(v) for k, v in values.items() if k in shaped}
        for k, v in inputs.items():  # the net's inputs are the port's, returned or not
            seen.setdefault(k, v)
            grads.setdefault(k, got[3].get(k))
        skipped = self._check_side(
            verdict,
            "port",
            segs,
            seen,
            grads,
            pgrads,
            params,
            top_diffs,
            desc,
            diff_ok=lambda b: True,
            seed=ex.seed,
        )
        for seg in segs:
            if seg.outputs and seg.name not in skipped:
                (verdict.local_layers if seg.local else verdict.segment_layers).extend(
                    lay.name for lay in seg.layers
                )
        return verdict

    def _inputs_kept(
        self,
        verdict: ExampleVerdict,
        inputs: Mapping[str, np.ndarray],
        values: Mapping[str, Tensor],
    ) -> None:
        """An input blob the port returns must be the input it was given, bit for bit (a
        port that changes its input in place breaks every caller that reuses the batch)."""
        for k, given in inputs.items():
            if k not in values:
                continue
            back = values[k].detach().to(torch.float32).cpu().numpy()
            if back.shape == given.shape and np.array_equal(back, given, equal_nan=True):
                continue
            cmp: object = (
                exact("input port~given", k, back.reshape(given.shape), given)
                if back.size == given.size
                else f"shape {back.shape}, given {given.shape}"
            )
            verdict.findings.append(
                Finding(
                    "input",
                    "port",
                    f"input {k}",
                    0,
                    f"the port returned its input {k!r} changed (does it modify its input in "
                    f"place?): {cmp}",
                    k,
                )
            )

    def _unverified(self, verdict: ExampleVerdict, segs: list[Segment]) -> None:
        """Layers after the last blob the port returns are verified by nothing: a finding,
        or a port that drops a net's output would pass on the blobs before it."""
        for seg in segs:
            if seg.outputs or not any(lay.spec.tops for lay in seg.layers):
                continue
            tops = [t for lay in seg.layers for t in lay.spec.tops]
            verdict.findings.append(
                Finding(
                    "unreturned",
                    "port",
                    seg.layers[0].describe() if seg.local else seg.label,
                    self._position(seg.layers[0].name),
                    "not verified: the port returns none of the blobs "
                    f"{', '.join(dict.fromkeys(tops))} (return the net's outputs, and to "
                    "localise every blob, by name)",
                    tops[-1],
                    seg.local,
                )
            )

    def _run_port(
        self,
        verdict: ExampleVerdict,
        inputs: Mapping[str, np.ndarray],
        params: Mapping[str, list[np.ndarray]],
        top_diffs: Mapping[str, np.ndarray],
    ) -> (
        tuple[
            dict[str, Tensor],
            dict[str, F64 | None],
            dict[tuple[str, int], F64 | None],
            dict[str, F64 | None],
        ]
        | None
    ):
        tensors = dict(self.port.state_dict(keep_vars=True))
        with torch.no_grad():
            for b in self.bindings:
                if b.lr_mult == 0 or not b.fits:
                    continue  # a constant is the port's own (checked bit for bit)
                array, t = params[b.layer][b.index], tensors[b.key]
                # the net's given weights, already in this tensor and not written since
                # (same storage, same version): not copied again. Nothing is lost should the
                # port change them unseen: every check computes the reference from `params`.
                held = (id(array), t.data_ptr(), t._version)
                if id(array) in self._base_ids and self._loaded.get(b.key) == held:
                    continue
                t.copy_(torch.from_numpy(array).reshape(b.port_shape).to(t.dtype))
                self._loaded[b.key] = (id(array), t.data_ptr(), t._version)
        for p in self.port.parameters():
            p.grad = None
        xs = {k: torch.from_numpy(v).requires_grad_(True) for k, v in inputs.items()}
        running = _Running(self.port)
        try:
            with self.guard.call("its forward"):
                try:
                    out = self.port(**xs)
                except Exception as exc:
                    self._raised(verdict, exc, running.stack, "forward")
                    return None
            where = self.guard.where("its forward")
            if not isinstance(out, Mapping):
                raise PortFailure(
                    f"the port's forward returned {type(out).__name__}, not a dict from Caffe "
                    f"blob names to tensors, in {where}"
                )
            wrong = [f"{k!r}: {type(v).__name__}" for k, v in out.items() if not torch.is_tensor(v)]
            if wrong:
                raise PortFailure(
                    f"the port's forward returned values that are not tensors ({', '.join(wrong)})"
                    f" in {where}"
                )
            unknown = [n for n in out if n not in self.net.blobs]
            if unknown:
                raise UsageError(
                    f"the port returned blobs {unknown}, which the net does not have "
                    f"(blobs: {', '.join(self.net.blobs)})"
                )
            values: dict[str, Tensor] = dict(out)
            for t in values.values():
                if t.requires_grad and not t.is_leaf:
                    t.retain_grad()
            seeded = [
                (values[o], torch.from_numpy(g).reshape(values[o].shape).to(values[o].dtype))
                for o, g in top_diffs.items()
                if o in values and values[o].requires_grad and values[o].numel() == g.size
            ]
            with self.guard.call("its backward"):
                try:
                    if seeded:
                        torch.autograd.backward([t for t, _ in seeded], [g for _, g in seeded])
                except Exception as exc:
                    self._raised(verdict, exc, [], "backward")
                    return None
            self._determinism(verdict, xs, values, running)
        finally:
            running.close()
        grads: dict[str, F64 | None] = {}
        for k, t in values.items():
            g = xs[k].grad if k in xs else t.grad
            grads[k] = None if g is None else _np(g)
        named = dict(self.port.named_parameters())
        pgrads: dict[tuple[str, int], F64 | None] = {}
        for b in self.bindings:
            if b.lr_mult > 0 and b.key in named and b.fits:
                g = named[b.key].grad
                pgrads[(b.layer, b.index)] = (
                    np.zeros(b.caffe_shape) if g is None else _np(g).reshape(b.caffe_shape)
                )
        xgrads = {k: None if x.grad is None else _np(x.grad) for k, x in xs.items()}
        return values, grads, pgrads, xgrads

    def _raised(self, verdict: ExampleVerdict, exc: Exception, stack: list[str], what: str) -> None:
        module = stack[-1] if stack else ""
        owner = module.split(".")[-1]
        lay = next((x for x in self.net.compute_layers if param_name(x.name) == owner), None)
        where = f" (module {module!r})" if module else ""
        verdict.findings.append(
            self._port_finding(
                "exception",
                lay,
                module or "the port",
                f"the port raised {type(exc).__name__}: {exc} in "
                + self.guard.where(f"its {what}{where}"),
            )
        )

    def _determinism(
        self,
        verdict: ExampleVerdict,
        xs: Mapping[str, Tensor],
        first: Mapping[str, Tensor],
        running: _Running,
    ) -> None:
        """Run the port again on the same inputs: every returned blob must be bit-identical."""
        mode = _RandomCalls(running)
        with torch.no_grad(), mode, self.guard.call("its second forward"):
            try:
                again = self.port(**{k: v.detach() for k, v in xs.items()})
            except Exception as exc:
                self._raised(verdict, exc, running.stack, "second forward")
                return
        if not isinstance(again, Mapping):
            return  # the first forward's result was checked
        for blob in self.net.blobs:
            if blob not in first or blob not in again:
                continue
            a, b = first[blob].detach(), again[blob].detach()
            if (a.shape == b.shape and torch.equal(a, b)) or bool(
                (a.shape == b.shape)
                and torch.equal(a.isnan(), b.isnan())
                and torch.equal(a[~a.isnan()], b[~b.isnan()])
            ):
                continue
            lay = self._producer(blob)
            random = sorted(set(mode.calls))
            training = [
                f"{n} ({type(m).__name__})" for n, m in self.port.named_modules() if m.training
            ]
            verdict.findings.append(
                self._port_finding(
                    "nondeterministic",
                    lay,
                    blob,
                    f"not deterministic: the same example run twice gives another {blob!r} "
                    "(the first blob, in Caffe's order, that differs); "
                    + (f"random: {', '.join(random)}; " if random else "")
                    + (
                        f"in training mode: {', '.join(training)}"
                        if training
                        else "no module is in training mode"
                    ),
                    blob,
                )
            )
            return

    def _shapes(
        self,
        verdict: ExampleVerdict,
        values: Mapping[str, Tensor],
        shapes: Mapping[str, tuple[int, ...]],
    ) -> set[str]:
        """Blobs whose shape matches Caffe's (up to singleton axes); the others are findings
        at the layer that produced them."""
        ok = set()
        for blob, t in values.items():
            want = tuple(shapes[blob])
            got = tuple(t.shape)
            if got == want or (t.numel() == int(np.prod(want)) and squeeze(got) == squeeze(want)):
                ok.add(blob)
                continue
            writers = self.net.writers(blob)  # in place or not, the first one sets the shape
            lay = writers[0] if writers else None
            hint = ""
            if lay is not None and lay.type == "Pooling" and len(got) == len(want) == 4:
                smaller = got[2] < want[2] or got[3] < want[3]
                if smaller and lay.spec.param("pooling_param").get("round_mode", 0) in (0, "CEIL"):
                    hint = "; Caffe rounds pooled sizes up"
            dims = ", ".join(["N", *map(str, got[1:])]) if got else ""
            wdims = ", ".join(["N", *map(str, want[1:])]) if want else ""
            verdict.findings.append(
                self._port_finding(
                    "shape", lay, blob, f"{blob}: ({dims}), Caffe ({wdims}){hint}", blob
                )
            )
        return ok

    def _check_caffe(
        self,
        verdict: ExampleVerdict,
        caffe: RunReply,
        params: Mapping[str, list[np.ndarray]],
        desc: str,
        seed: int,
    ) -> None:
        """Caffe's own blobs against the reference, layer by layer; a blob Caffe rewrites in
        place keeps only its first value's diff, so diffs are compared where they are whole."""
        segs = segments(self.net, list(self.net.blobs))
        whole = [b for b in self.net.blobs if self.net.in_place(b)]
        if whole:
            verdict.notes.append(
                "caffe: diffs not compared at blobs rewritten in place (Caffe keeps only the "
                f"first value's diff): {', '.join(whole)}"
            )
        values = {k: _np(v) for k, v in caffe.blobs.items() if k in self.net.blobs}
        grads: dict[str, F64 | None] = {k: _np(v) for k, v in caffe.diffs.items()}
        pgrads: dict[tuple[str, int], F64 | None] = {
            (lay.name, p.index): _np(caffe.param_diffs[lay.name][p.index])
            for lay in self.net.compute_layers
            for p in lay.params
            if p.lr_mult > 0
        }
        self._check_side(
            verdict,
            "caffe",
            segs,
            values,
            grads,
            pgrads,
            params,
            {},
            desc,
            diff_ok=lambda b: not self.net.in_place(b),
            seed=seed,
        )

    def _check_side(
        self,
        verdict: ExampleVerdict,
        side: str,
        segs: list[Segment],
        values: Mapping[str, F64],
        grads: Mapping[str, F64 | None],
        pgrads: Mapping[tuple[str, int], F64 | None],
        params: Mapping[str, list[np.ndarray]],
        seeded: Mapping[str, np.ndarray],
        desc: str,
        diff_ok: Callable[[str], bool],
        seed: int = 0,
    ) -> set[str]:
        """Check `side`'s values segment by segment; returns the segments not checked (a blob
        of another shape than Caffe's)."""
        actor = "port" if side == "port" else "caffe"
        outputs = set(self.net.outputs)
        # bottom diffs are summed over every segment reading the blob (autograd and Caffe's
        # Split both sum them): desired, bound and the segments that contribute.
        diff_sum: dict[str, _DiffSum] = {}
        # a blob some reader's backward is not checked for: its diff sum is not known whole
        incomplete: set[str] = set()
        misshaped: list[str] = []
        comparisons: list[tuple[Comparison, Segment, str, str]] = []
        for seg in segs:
            label = seg.label if not seg.local else seg.layers[0].describe()
            bad = [b for b in [*seg.inputs, *seg.outputs] if b not in values]
            if bad:
                misshaped.append(seg.name)
                incomplete.update(seg.inputs)
                continue
            specs = [lay.spec for lay in seg.layers]
            seg_params = {
                lay.name: list(params.get(lay.name, [])) for lay in seg.layers if lay.params
            }
            outs = [o for o in seg.outputs if o in values]
            backward = all(diff_ok(b) for b in [*seg.inputs, *outs])
            diffs: dict[str, F64] | None = None
            if backward:
                diffs = {}
                for o in outs:
                    g = seeded.get(o) if o in outputs and side == "port" else grads.get(o)
                    if g is None:
                        backward = False
                        verdict.notes.append(
                            f"{side}: {seg.label} backward not checked: no gradient at {o!r}"
                        )
                        break
                    diffs[o] = np.asarray(g, dtype=np.float64).reshape(values[o].shape)
            seg_inputs = {b: values[b] for b in seg.inputs}
            if sampled.worth_it(specs, {b: v.shape for b, v in seg_inputs.items()}):
                res = sampled.sampled(
                    specs, seg_params, seg_inputs, outs, diffs if backward else None, seed
                )
            else:
                res = segtol.segment(
                    specs, seg_params, seg_inputs, outs, diffs if backward else None
                )
            if not backward:
                incomplete.update(seg.inputs)
            rule = res.rule or f"tolerances.layer {seg.layers[-1].type}"
            for o in outs:
                cmp = _compared(
                    f"forward {actor}~ref64",
                    o,
                    values[o],
                    res.values[o],
                    res.value_bounds[o],
                    rule,
                    desc,
                    res.positions.get(("v", o)),
                )
                comparisons.append((cmp, seg, label, "forward"))
            if not backward:
                continue
            for b, d in res.input_diffs.items():
                pos = res.positions.get(("x", b))
                if b not in diff_sum:
                    diff_sum[b] = _DiffSum(np.zeros(d.shape), np.zeros(d.shape), [], rule, pos)
                if not diff_sum[b].add(d, res.input_diff_bounds[b], pos, (seg, label)):
                    incomplete.add(b)
            for key, d in res.param_diffs.items():
                got = pgrads.get(key)
                if got is None:
                    continue
                cmp = _compared(
                    f"backward {actor}~ref64",
                    f"{key[0]}/{key[1]}",
                    np.asarray(got),
                    d,
                    res.param_diff_bounds[key],
                    rule,
                    desc,
                    res.positions.get(("p", key)),
                )
                comparisons.append((cmp, seg, label, "backward"))
        for b, entry in diff_sum.items():
            desired, bound, segs_in, rule = entry.desired, entry.bound, entry.segs, entry.rule
            if b in incomplete:
                verdict.notes.append(
                    f"{side}: d/d {b} not compared: the backward of some layer reading it is "
                    "not checked, so its summed diff is not known whole"
                )
                continue
            got = grads.get(b)
            if got is None:
                verdict.notes.append(f"{side}: no gradient at {b!r} to compare")
                continue
            cmp = _compared(
                f"backward {actor}~ref64",
                f"d/d {b}",
                np.asarray(got),
                desired,
                bound,
                rule,
                desc,
                entry.positions,
            )
            # a wrong bottom diff belongs to the segments reading the blob: the last of them
            # in Caffe's order is the first to run backward
            seg, _ = segs_in[-1]
            label = " and ".join(lbl for _, lbl in segs_in)
            comparisons.append((cmp, seg, label, "backward"))
        if misshaped:
            verdict.notes.append(
                f"{side}: not checked, a blob they read or write has another shape than "
                f"Caffe's: {', '.join(misshaped)}"
            )
        order = {id(s): i for i, s in enumerate(segs)}
        for cmp, seg, label, kind in sorted(comparisons, key=lambda c: order[id(c[1])]):
            verdict.comparisons.append(cmp)
            if cmp.passed:
                continue
            prefix = "" if side == "port" else "Caffe disagrees with Caffe's semantics: "
            suffix = ""
            writers = self.net.writers(cmp.blob) if kind == "forward" else []
            if side == "port" and len(writers) > 1:
                suffix = (
                    f"; Caffe's blob {cmp.blob!r} holds the output of {writers[-1].label}, "
                    f"the last of the layers writing it in place "
                    f"({', '.join(w.name for w in writers)})"
                )
            verdict.findings.append(
                Finding(
                    kind,
                    side,
                    label,
                    self._position(seg.layers[0].name),
                    prefix + str(cmp) + suffix,
                    cmp.blob,
                    seg.local,
                )
            )
        return set(misshaped)

    # ---- localisation -------------------------------------------------------------------

    def fault(self, verdict: ExampleVerdict) -> Finding | None:
        """The first port finding: an exception or a nondeterministic blob first, then
        ``crossval.localize`` over the segments (fixed params, then the first layer in
        Caffe's order whose forward fails, then backward)."""
        found = verdict.port_findings
        for kind in ("exception", "nondeterministic"):
            hit = [f for f in found if f.kind == kind]
            if hit:
                return min(hit, key=lambda f: f.position)
        if not found:
            return None
        structural = [
            f
            for f in found
            if f.kind in ("input", "shape", "param-shape", "unmapped", "frozen", "fixed")
        ]
        numeric = [f for f in found if f not in structural]
        first_struct = min(structural, key=lambda f: f.position) if structural else None
        first_num: Finding | None = None
        if numeric:
            _, keys = localize(self.net.compute_layers, numeric, diff_key=lambda b: f"d/d {b}")
            first_num = next((f for f in numeric if f.key in keys), numeric[0])
        if first_struct and (first_num is None or first_struct.position <= first_num.position):
            return first_struct
        return first_num
