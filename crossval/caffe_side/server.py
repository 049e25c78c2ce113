"""The Caffe worker's main loop: ``python -m crossval.caffe_side.server``.

Reads pickled ``(op, kwargs)`` requests on stdin (the fields of a request of
``crossval.caffe_side.requests``) and writes ``("ok", reply)`` or ``("error", text)`` on a
private copy of stdout. Nets are cached by prototxt and reused
across requests (only the batch axis is reshaped), never rebuilt per example.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, cast

import numpy as np

from crossval.caffe_side import requests
from crossval.caffe_side.replies import (
    CaffeLayerSpec,
    CheckNetReply,
    Descriptor,
    GeneratedRun,
    GradientCheckReply,
    GradientCheckResult,
    LayerDescription,
    ManyRunsReply,
    Message,
    NetDescription,
    NetParams,
    ParamDescription,
    ParamMults,
    Params,
    Ping,
    RawTime,
    RunReply,
    SurgeryReply,
    TrainReply,
    run_many_arrays,
    with_arrays,
)
from crossval.caffe_side.wire import (
    die_with_parent,
    get_arrays,
    put_arrays,
    read_frame,
    write_frame,
)


def forked_main(argv: list[str]) -> None:
    """The worker's entry, in a child forked from a warm process that has imported pycaffe
    (``crossval.warmstart``; it dies with that process, which dies with crossval): its
    standard input carries the requests, its standard output the replies, its standard
    error is the log."""
    main()


def main() -> None:
    die_with_parent(int(os.environ.get("CROSSVAL_WORKER_PARENT", "0")))
    # On SIGUSR1 (sent when a call reaches its time limit) the Python stack goes to the log,
    # so the error can say where the worker was (a Python layer's forward, say).
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything Caffe or a layer prints goes to the log, not the protocol
    requests = sys.stdin.buffer
    import caffe

    caffe.set_mode_cpu()
    ops = Ops(caffe)
    while True:
        try:
            op, kwargs = read_frame(requests)
        except EOFError:
            return
        try:
            write_frame(replies, ("ok", ops.serve(op, kwargs)))
        except Exception as exc:  # reported to the caller; the worker lives on
            write_frame(replies, ("error", f"{type(exc).__name__}: {exc}"))


def message_dict(msg: Any) -> Message:
    """Every field of a protobuf message, unset ones at their declared defaults; enums by name."""
    out: Message = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        # protobuf 6+ drops FieldDescriptor.label for is_repeated
        repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED
        if f.message_type is not None:
            out[f.name] = [message_dict(v) for v in value] if repeated else message_dict(value)
        elif f.enum_type is not None:
            names = f.enum_type.values_by_number
            out[f.name] = [names[v].name for v in value] if repeated else names[value].name
        else:
            out[f.name] = list(value) if repeated else value
    return out


def learned_lr(layer_type: str, given: list[float], i: int) -> float:
    """The lr_mult Caffe gives param blob `i` of a layer (`given`: the prototxt's): 1 when
    unset; always 0 for BatchNorm, whose LayerSetUp masks its statistics from the solvers."""
    if layer_type == "BatchNorm":
        return 0.0
    return float(given[i]) if i < len(given) else 1.0


# Layer types whose parameter message is not named after the type.
_OWN_PARAMS = {
    "Deconvolution": ("convolution_param",),
    "SoftmaxWithLoss": ("softmax_param", "loss_param"),
    "SigmoidCrossEntropyLoss": ("loss_param",),
    "EuclideanLoss": ("loss_param",),
}


def layer_spec(lp: Any) -> CaffeLayerSpec:
    """One LayerParameter as `Ops.op_layer_specs` replies it."""
    own = _OWN_PARAMS.get(lp.type, ())
    squashed = lp.type.lower()
    params: dict[str, Message] = {}
    for f in lp.DESCRIPTOR.fields:
        if not f.name.endswith("_param") or f.message_type is None:
            continue
        mine = f.name in own or f.name[: -len("_param")].replace("_", "") == squashed
        if mine or lp.HasField(f.name):
            params[f.name] = message_dict(getattr(lp, f.name))
    return CaffeLayerSpec(
        name=lp.name,
        type=lp.type,
        bottoms=list(lp.bottom),
        tops=list(lp.top),
        loss_weight=list(lp.loss_weight),
        param=[ParamMults(p.lr_mult, p.decay_mult) for p in lp.param],
        propagate_down=list(lp.propagate_down),
        include=[message_dict(r) for r in lp.include],
        exclude=[message_dict(r) for r in lp.exclude],
        params=params,
        # proto2 presence, which the defaults above hide: Caffe branches on has_ignore_label,
        # has_normalization, has_concat_dim, has_use_global_stats...
        set_fields={name: [fd.name for fd, _ in getattr(lp, name).ListFields()] for name in params},
    )


class Ops:
    """The worker's operations: `op_<op>` serves the request of ``crossval.caffe_side.requests``
    whose op is `<op>` (the typed method `<op>` of ``crossval.worker.CaffeOps`` sends it),
    and returns its reply. What each does, and its arguments, are said by its request
    class."""

    MAX_NETS = 64

    def __init__(self, caffe: Any) -> None:
        self.caffe = caffe
        self.nets: OrderedDict[tuple[str, str, str, str], Any] = OrderedDict()
        self.shared_files: dict[str, int] = {}  # the parent's shared memory files (run_many)

    def serve(self, op: str, kwargs: dict[str, Any]) -> object:
        """The reply to the request `op` with fields `kwargs`, as it came over the pipe."""
        kind = requests.BY_OP.get(op)
        if kind is None:
            raise ValueError(f"unknown worker op {op!r}")
        return getattr(self, "op_" + op)(kind(**kwargs))

    # -- nets ------------------------------------------------------------------------------

    def net(self, prototxt: str, phase: str = "TEST", weights: str = "", surgery: str = "") -> Any:
        """A cached net; with `surgery`, that layer's kernel is set to arange(K) on creation."""
        key = (prototxt, phase, weights, surgery)
        net = self.nets.get(key)
        if net is None:
            net = self.load(prototxt, phase, weights)
            if surgery:
                self._surgery(net, surgery)
            self.nets[key] = net
            if len(self.nets) > self.MAX_NETS:
                self.nets.popitem(last=False)
        else:
            self.nets.move_to_end(key)
        return net

    def load(self, prototxt: str, phase: str = "TEST", weights: str = "") -> Any:
        """A new caffe.Net (not cached) from prototxt text and optional weights."""
        import tempfile

        self.validate(prototxt, weights)
        with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
            f.write(prototxt)
        try:
            ph = getattr(self.caffe, phase)
            return self.caffe.Net(f.name, weights, ph) if weights else self.caffe.Net(f.name, ph)
        finally:
            os.unlink(f.name)

    @staticmethod
    def validate(prototxt: str, weights: str = "") -> None:
        """Parse the net (and weights) in Python first: Caffe would abort on a bad file."""
        from caffe.proto import caffe_pb2

        from crossval.caffe_side.upgrade import parse_net

        if prototxt:
            parse_net(prototxt)
        if weights:
            try:
                with open(weights, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise ValueError(f"cannot read weights {weights}: {exc.strerror}") from None
            model = caffe_pb2.NetParameter()
            try:
                model.ParseFromString(data)
            except Exception as exc:  # DecodeError, and RuntimeError on some runtimes
                raise ValueError(
                    f"{weights} is not a caffemodel (truncated or another format; "
                    f"{len(data)} bytes): {exc}"
                ) from None
            if not model.layer and not model.layers:
                raise ValueError(f"{weights} holds no layers: not a caffemodel")

    def op_describe(self, req: requests.DescribeRequest) -> NetDescription:
        from crossval.caffe_side.upgrade import filter_net, parse_net

        spec = parse_net(req.prototxt)
        mults = {
            lp.name: [(p.lr_mult, p.decay_mult) for p in lp.param]
            for lp in filter_net(spec, req.phase)
        }
        net = self.net(req.prototxt, req.phase, "", req.surgery)
        layers = []
        for name, layer in zip(net._layer_names, net.layers, strict=True):
            given = mults.get(name, [])
            params = []
            for i, blob in enumerate(layer.blobs):
                dm = float(given[i][1]) if i < len(given) else 1.0
                lr = learned_lr(layer.type, [g[0] for g in given], i)
                params.append(ParamDescription(tuple(blob.data.shape), lr, dm))
            layers.append(
                LayerDescription(
                    name=name,
                    type=layer.type,
                    bottoms=list(net.bottom_names[name]),
                    tops=list(net.top_names[name]),
                    params=params,
                )
            )
        inputs = {
            top: tuple(net.blobs[top].data.shape)
            for lay in layers
            if lay.type == "Input"
            for top in lay.tops
        }
        return NetDescription(
            layers=layers,
            blobs={name: tuple(b.data.shape) for name, b in net.blobs.items()},
            inputs=inputs,
            force_backward=bool(spec.force_backward),
        )

    def op_layer_specs(self, req: requests.LayerSpecsRequest) -> list[CaffeLayerSpec]:
        from crossval.caffe_side.upgrade import filter_net, parse_net

        return [layer_spec(lp) for lp in filter_net(parse_net(req.prototxt), req.phase)]

    def op_layer_types(self, req: requests.LayerTypesRequest) -> list[str]:
        from crossval.caffe_side.upgrade import filter_net, parse_net

        spec = parse_net(req.prototxt)
        layers = filter_net(spec, req.phase) if req.phase else spec.layer
        return [str(lp.type) for lp in layers]

    def op_ping(self, req: requests.PingRequest) -> Ping:
        return Ping(caffe=os.path.dirname(self.caffe.__file__), pid=os.getpid())

    def op_prototxt(self, req: requests.PrototxtRequest) -> str:
        from crossval.caffe_side import nets

        return str(nets.BUILDERS[req.head](**req.options))

    def op_params(self, req: requests.ParamsRequest) -> NetParams:
        net = self.net(req.prototxt, req.phase, req.weights, req.surgery)
        types = {name: layer.type for name, layer in zip(net._layer_names, net.layers, strict=True)}
        return NetParams(
            params={name: [b.data.copy() for b in blobs] for name, blobs in net.params.items()},
            types={name: types[name] for name in net.params},
        )

    def op_run(self, req: requests.RunRequest) -> RunReply:
        net = self.net(req.prototxt, req.phase, req.weights, req.surgery)
        inputs = req.inputs
        reshaped = False
        for name, value in inputs.items():
            if name not in net.blobs:
                raise KeyError(
                    f"input blob {name!r} is not in the net (blobs: {', '.join(net.blobs)})"
                )
            blob = net.blobs[name]
            if blob.data.shape != value.shape:
                blob.reshape(*value.shape)
                reshaped = True
        if reshaped:
            net.reshape()
        for name, value in inputs.items():
            net.blobs[name].data[...] = value
        for layer, blobs in (req.params or {}).items():
            if layer not in net.params:
                raise KeyError(f"layer {layer!r} has no params in the net")
            for i, value in enumerate(blobs):
                target = net.params[layer][i].data
                if target.shape != value.shape:
                    raise ValueError(
                        f"{layer}/{i}: Caffe shape {target.shape}, given {value.shape}"
                    )
                target[...] = value
        net.forward()
        after = {name: b.data.copy() for name, b in net.blobs.items()}
        drawn: dict[str, np.ndarray] = {}
        top_diffs = req.top_diffs
        if req.top_diff_seed is not None:
            from crossval import examplegen

            seed, names = req.top_diff_seed
            top_diffs = drawn = examplegen.top_diffs(
                seed, [(name, tuple(net.blobs[name].data.shape)) for name in names]
            )
        kept: Params = {}
        if req.return_params:
            kept = {name: [b.data.copy() for b in bl] for name, bl in net.params.items()}
        diffs: dict[str, np.ndarray] = {}
        param_diffs: Params = {}
        if req.backward:
            # pycaffe's backward accumulates param diffs (gemm with beta 1): clear them first.
            for blobs in net.params.values():
                for b in blobs:
                    b.diff[...] = 0
            for name, value in (top_diffs or {}).items():
                if name not in net.blobs:
                    raise KeyError(f"top diff for {name!r}: no such blob in the net")
                net.blobs[name].diff[...] = value
            net.backward()
            wanted = net.blobs if req.all_diffs else inputs
            diffs = {name: net.blobs[name].diff.copy() for name in wanted}
            param_diffs = {name: [b.diff.copy() for b in bl] for name, bl in net.params.items()}
        return RunReply(after, diffs, kept, param_diffs, drawn)

    def _shared(self, path: str) -> int:
        """This worker's descriptor of the parent's shared memory file at `path` (opened once;
        again should the path name another file)."""
        fd = self.shared_files.get(path)
        if fd is not None:
            same = os.fstat(fd)
            now = os.stat(path)
            if (same.st_dev, same.st_ino) == (now.st_dev, now.st_ino):
                return fd
            os.close(fd)
        fd = self.shared_files[path] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        return fd

    def op_run_many(
        self, req: requests.RunManyRequest
    ) -> ManyRunsReply[np.ndarray] | ManyRunsReply[Descriptor]:
        if req.shared is None:
            arrays = cast(Mapping[str, np.ndarray], req.inputs)
            return self._run_many(req, arrays, cast(Params, req.params))
        fd = self._shared(req.shared[0])
        descs = cast(Mapping[str, Descriptor], req.inputs)
        param_descs = cast(dict[str, list[Descriptor]], req.params)
        got = iter(get_arrays(fd, [*descs.values(), *(d for v in param_descs.values() for d in v)]))
        arrays = {n: next(got) for n in descs}
        values = {k: [next(got) for _ in v] for k, v in param_descs.items()}
        out = self._run_many(req, arrays, values)
        return with_arrays(out, put_arrays(fd, run_many_arrays(out), req.shared[1])[0])

    def _run_many(
        self,
        req: requests.RunManyRequest,
        inputs: Mapping[str, np.ndarray],
        params: Mapping[str, list[np.ndarray]],
    ) -> ManyRunsReply[np.ndarray]:
        """`op_run_many` on the arrays of `req`'s `inputs` and `params` (read from the shared
        file when they came as descriptors)."""
        net = self.net(req.prototxt, req.phase, "", req.surgery)
        cases = {len(v) for v in inputs.values()}
        cases |= {len(b) for blobs in params.values() for b in blobs}
        if len(cases) != 1:
            raise ValueError(f"inputs and params disagree on the number of cases: {sorted(cases)}")
        (count,) = cases
        reshaped = False
        for name, value in inputs.items():
            if name not in net.blobs:
                raise KeyError(
                    f"input blob {name!r} is not in the net (blobs: {', '.join(net.blobs)})"
                )
            if net.blobs[name].data.shape != value.shape[1:]:
                net.blobs[name].reshape(*value.shape[1:])
                reshaped = True
        if reshaped:
            net.reshape()
        for layer, blobs in params.items():
            if layer not in net.params:
                raise KeyError(f"layer {layer!r} has no params in the net")
            for i, value in enumerate(blobs):
                shape = net.params[layer][i].data.shape
                if shape != value.shape[1:]:
                    raise ValueError(f"{layer}/{i}: Caffe shape {shape}, given {value.shape[1:]}")
        # Views onto the net's memory, taken once (no reshape happens below).
        data = {name: b.data for name, b in net.blobs.items()}
        in_diffs = {name: net.blobs[name].diff for name in inputs}
        p_data = {name: [b.data for b in bl] for name, bl in net.params.items()}
        p_diffs = {name: [b.diff for b in bl] for name, bl in net.params.items()}
        out_blobs = {name: np.empty((count, *v.shape), v.dtype) for name, v in data.items()}
        out_diffs = {name: np.empty((count, *v.shape), v.dtype) for name, v in in_diffs.items()}
        out_params = {
            n: [np.empty((count, *v.shape), v.dtype) for v in bl]
            for n, bl in p_data.items()
            if n not in params
        }
        sent_back: list[tuple[str, int, int, np.ndarray]] = []
        out_pdiffs = {
            n: [np.empty((count, *v.shape), v.dtype) for v in bl] for n, bl in p_diffs.items()
        }
        last = len(net.layers) - 1
        for m in range(count):
            for name, value in inputs.items():
                data[name][...] = value[m]
            for layer, blobs in params.items():
                for i, value in enumerate(blobs):
                    p_data[layer][i][...] = value[m]
            net._forward(0, last)
            # pycaffe's backward accumulates param diffs (gemm with beta 1): clear them first.
            for diffs in p_diffs.values():
                for d in diffs:
                    d[...] = 0
            net._backward(last, 0)
            for name, v in data.items():
                out_blobs[name][m] = v
            for name, v in in_diffs.items():
                out_diffs[name][m] = v
            for name, bl in p_data.items():
                for i, v in enumerate(bl):
                    if name not in params:
                        out_params[name][i][m] = v
                    elif v.tobytes() != params[name][i][m].tobytes():
                        sent_back.append((name, i, m, v.copy()))
            for name, bl in p_diffs.items():
                for i, v in enumerate(bl):
                    out_pdiffs[name][i][m] = v
        return ManyRunsReply(out_blobs, out_diffs, out_params, out_pdiffs, sent_back)

    def op_gradient_check(self, req: requests.GradientCheckRequest) -> GradientCheckReply:
        kink, step, slacks = req.kink, req.step, req.slacks
        net = self.op_run(
            requests.RunRequest(
                req.prototxt, req.inputs, req.params, backward=True, surgery=req.surgery
            )
        )
        live = self.net(req.prototxt, "TRAIN", "", req.surgery)

        def value_of(kind: str, name: str) -> Any:
            if kind == "blob":
                return live.blobs[name].data
            layer, i = name.rsplit("/", 1)
            return live.params[layer][int(i)].data

        def side(kind: str, name: str, idx: int, delta: float) -> tuple[float, np.ndarray]:
            arr = value_of(kind, name).reshape(-1)
            old = arr[idx]
            arr[idx] = np.float32(old + delta)
            live.forward()
            loss = float(live.blobs["loss"].data.reshape(-1)[0])
            resid = np.zeros(0)
            if kink is not None:
                resid = live.blobs[kink[0]].data.reshape(-1) - live.blobs[kink[1]].data.reshape(-1)
            arr[idx] = old
            return loss, resid

        results: list[GradientCheckResult] = []
        for t, (kind, name, idx) in enumerate(req.targets):
            slack = slacks[t] if slacks else 0.0
            if kind == "blob":
                computed = float(net.diffs[name].reshape(-1)[idx])
            else:
                layer, i = name.rsplit("/", 1)
                computed = float(net.param_diffs[layer][int(i)].reshape(-1)[idx])
            pos, r_pos = side(kind, name, idx, step)
            neg, r_neg = side(kind, name, idx, -step)
            if kink is not None and np.any((np.abs(r_pos) < kink[2]) != (np.abs(r_neg) < kink[2])):
                results.append(GradientCheckResult(kind, name, idx, computed, float("nan"), "kink"))
                continue
            estimated = (pos - neg) / (2 * step)
            scale = max(abs(computed), abs(estimated), 1.0)
            ok = abs(computed - estimated) <= req.threshold * scale + slack
            verdict = "ok" if ok else "FAIL"
            results.append(GradientCheckResult(kind, name, idx, computed, estimated, verdict))
        live.forward()
        return GradientCheckReply(results)

    def op_time_raw(self, req: requests.TimeRawRequest) -> RawTime:
        import time

        self.op_run(
            requests.RunRequest(
                req.prototxt, req.inputs, req.params, backward=True, surgery=req.surgery
            )
        )
        net = self.net(req.prototxt, "TRAIN", "", req.surgery)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(req.repeat):
                net.forward()
                net.backward()
            best = min(best, (time.perf_counter() - t0) / req.repeat)
        return RawTime(forward_backward=best)

    def op_train(self, req: requests.TrainRequest) -> TrainReply:
        solver = self.caffe.get_solver(req.solver_prototxt)
        net = solver.net
        if req.weights:
            self.validate("", req.weights)
            net.copy_from(req.weights)

        def snapshot() -> Params:
            return {name: [b.data.copy() for b in bl] for name, bl in net.params.items()}

        initial = snapshot()
        losses: list[float] = []
        params: list[Params] = []
        for t in range(req.steps):
            batch = req.batches[t % len(req.batches)]
            for name, value in batch.items():
                if net.blobs[name].data.shape != value.shape:
                    raise ValueError(
                        f"batch {t}: {name} has shape {value.shape}, the net "
                        f"{net.blobs[name].data.shape}"
                    )
                net.blobs[name].data[...] = value
            solver.step(1)
            losses.append(float(net.blobs["loss"].data.reshape(-1)[0]))
            params.append(snapshot())
        return TrainReply(initial=initial, losses=losses, params=params, iter=int(solver.iter))

    def op_run_generated(self, req: requests.RunGeneratedRequest) -> GeneratedRun:
        from crossval import examplegen

        inputs, params = examplegen.generate(
            req.recipe, req.seed, req.input_scale, req.weight_scale, req.batch, None, req.learnable
        )
        out = self.op_run(
            requests.RunRequest(
                req.prototxt,
                inputs,
                params,
                phase=req.phase,
                backward=req.backward,
                weights=req.weights,
                surgery=req.surgery,
                return_params=False,
                all_diffs=req.all_diffs,
                top_diff_seed=req.top_diff_seed,
            )
        )
        net = self.net(req.prototxt, req.phase, req.weights, req.surgery)
        used = {name: [b.data for b in bl] for name, bl in net.params.items()}
        return GeneratedRun(
            blobs=out.blobs,
            diffs=out.diffs,
            param_diffs=out.param_diffs,
            top_diffs=out.top_diffs,
            digest=examplegen.digest(used),
        )

    def op_save(self, req: requests.SaveRequest) -> str:
        net = self.net(req.prototxt, req.phase)
        for layer, blobs in req.params.items():
            for i, value in enumerate(blobs):
                net.params[layer][i].data[...] = value
        net.save(req.out)
        return req.out

    def op_surgery(self, req: requests.SurgeryRequest) -> SurgeryReply | None:
        net = self.load(req.prototxt, req.phase, req.weights)
        for name, blobs in (req.params or {}).items():
            for i, value in enumerate(blobs):
                net.params[name][i].data[...] = value
        result = self._surgery(net, req.layer) if req.layer else None
        if req.out:
            net.save(req.out)
        return result

    @staticmethod
    def _surgery(net: Any, layer: str) -> SurgeryReply:
        """Set `layer`'s kernel to arange(K), K read from the net (its bottom's channels)."""
        names = list(net._layer_names)
        if layer not in names:
            raise LookupError(f"the net has no layer {layer!r} to set (layers: {', '.join(names)})")
        lay = net.layers[names.index(layer)]
        if lay.type != "Convolution":
            raise ValueError(
                f"layer {layer!r} is a {lay.type}, not the Convolution the surgery sets"
            )
        if len(lay.blobs) != 1:
            raise ValueError(
                f"layer {layer!r} has {len(lay.blobs)} param blobs; the surgery "
                "expects one kernel and no bias (bias_term: false)"
            )
        bottom = net.bottom_names[layer][0]
        k = int(np.prod(net.blobs[bottom].data.shape[1:]))
        kernel = lay.blobs[0].data
        if kernel.shape != (1, k):
            raise ValueError(
                f"layer {layer!r} has a kernel of shape {kernel.shape}; the "
                f"surgery needs (1, {k}) (num_output 1 over the {k} bins of "
                f"{bottom!r}, no kernel_size)"
            )
        kernel[...] = np.arange(k, dtype=np.float32)
        return SurgeryReply(bins=k, kernel=kernel.copy(), bottom=bottom)

    def op_check_net(self, req: requests.CheckNetRequest) -> CheckNetReply:
        from caffe.proto import caffe_pb2

        from crossval.caffe_side.upgrade import filter_net, parse_net

        prototxt, phase, weights = req.prototxt, req.phase, req.weights
        spec = parse_net(prototxt)  # V1 nets and input headers upgraded, as Caffe does
        kept = filter_net(spec, phase)
        layers = [(lp.name, lp.type) for lp in kept]
        inputs: dict[str, list[int]] = {}
        for lp in kept:
            if lp.type == "Input":
                shapes = list(lp.input_param.shape)
                for i, top in enumerate(lp.top):
                    shape = shapes[i] if i < len(shapes) else (shapes[0] if shapes else None)
                    inputs[top] = [int(d) for d in shape.dim] if shape is not None else []
        for i, name in enumerate(spec.input):
            if len(spec.input_shape) > i:
                inputs[name] = [int(d) for d in spec.input_shape[i].dim]
            else:
                inputs[name] = [int(d) for d in spec.input_dim[4 * i : 4 * i + 4]]
        written = set(inputs)
        unread: list[tuple[str, str]] = []  # (layer, bottom) no earlier layer writes
        for lp in kept:
            unread += [(lp.name, b) for b in lp.bottom if b not in written]
            written.update(lp.top)
        out = CheckNetReply(layers=layers, inputs=inputs, unwritten_bottoms=unread)
        names = [n for n, _ in layers]
        sound = all(s and min(s) > 0 for s in inputs.values()) and len(set(names)) == len(names)
        sound = sound and not unread
        if layers and sound:
            net = self.net(prototxt, phase)  # a blob of size 0 aborts here: Check failed: data_
        if weights and layers and sound:
            self.validate(prototxt, weights)
            model = caffe_pb2.NetParameter()
            with open(weights, "rb") as f:
                model.ParseFromString(f.read())

            def shape(b: Any) -> list[int]:
                if b.HasField("shape"):
                    return [int(d) for d in b.shape.dim]
                return [int(b.num), int(b.channels), int(b.height), int(b.width)]

            for lp in [*model.layer, *model.layers]:
                if len(lp.blobs):
                    out.model[lp.name] = [shape(b) for b in lp.blobs]
            mults = {lp.name: [p.lr_mult for p in lp.param] for lp in spec.layer}
            for name, layer in zip(net._layer_names, net.layers, strict=True):
                given = mults.get(name, [])
                blobs = [
                    (list(b.data.shape), learned_lr(layer.type, given, i))
                    for i, b in enumerate(layer.blobs)
                ]
                if blobs:
                    out.params[name] = blobs
        return out

    def op_crash(self, req: requests.CrashRequest) -> None:
        how = req.how
        if how == "abort":
            os.abort()
        if how == "segfault":
            import ctypes

            ctypes.string_at(0)
        if how == "hang":
            import time

            while True:
                time.sleep(3600)
        raise ValueError(f"unknown crash {how!r}")


if __name__ == "__main__":
    main()
