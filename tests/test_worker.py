"""Caffe runs in a worker process: its aborts, crashes and hangs never kill or block the
caller, it dies with its parent, and it leaves no temporary files."""

from __future__ import annotations

import dataclasses
import gc
import inspect
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossval import provision
from crossval.caffe_side import requests, server
from crossval.caffe_side.replies import NetDescription, RunReply
from crossval.caffe_side.wire import get_arrays, put_arrays
from crossval.examplegen import Recipe
from crossval.worker import (
    BASE_LIMIT,
    CaffeCrash,
    CaffeError,
    CaffeOps,
    CaffeTimeout,
    CaffeWorker,
    default_limit,
    searching,
    stops_search,
)


def test_check_failure_is_reported_with_caffes_log_line(
    caffe_install: provision.CaffeInstall,
) -> None:
    with CaffeWorker(caffe_install) as worker:
        proto = worker.prototxt(head="sigmoid_scale", features=4, batch=2, loss="euclidean")
        first = worker.ping().pid
        with pytest.raises(CaffeCrash) as info:
            # true_age with 2 values per sample: EuclideanLoss CHECKs count(1) in Reshape.
            worker.run(
                prototxt=proto,
                inputs={
                    "pool5": np.zeros((2, 4), np.float32),
                    "true_age": np.zeros((2, 2), np.float32),
                },
            )
        err = info.value
        assert "killed by signal 6" in str(err)
        assert "Check failed: bottom[0]->count(1) == bottom[1]->count(1)" in str(err)
        assert "euclidean_loss_layer.cpp" in str(err)
        # The next request gets a fresh worker, and the same net works there.
        assert worker.ping().pid != first
        out = worker.run(
            prototxt=proto,
            inputs={"pool5": np.ones((2, 4), np.float32), "true_age": np.zeros((2, 1), np.float32)},
        )
        assert out.blobs["pred_age"].shape == (2, 1)
        assert worker.restarts == 1


@pytest.mark.parametrize("how", ["abort", "segfault"])
def test_crashes_become_errors(caffe_install: provision.CaffeInstall, how: str) -> None:
    with CaffeWorker(caffe_install) as worker:
        with pytest.raises(CaffeCrash, match=r"killed by signal (6|11)"):
            worker.request("crash", how=how)
        assert worker.ping().caffe.startswith(str(caffe_install.python_path))


def test_python_errors_keep_the_worker(caffe_install: provision.CaffeInstall) -> None:
    with CaffeWorker(caffe_install) as worker:
        pid = worker.ping().pid
        proto = worker.prototxt(head="expectation", features=4, bins=3)
        with pytest.raises(CaffeError, match="input blob 'data' is not in the net"):
            worker.run(prototxt=proto, inputs={"data": np.zeros((1, 4), np.float32)})
        with pytest.raises(CaffeError, match="unknown worker op 'nope'"):
            worker.request("nope")
        with pytest.raises(CaffeError, match="unexpected keyword argument 'phse'"):
            worker.request("describe", prototxt=proto, phse="TEST")
        assert worker.ping().pid == pid and worker.restarts == 0


class _Relayed(CaffeOps):
    """A transport that pickles each request and reply on its way, as the conformance
    child's relay does, to a real worker."""

    def __init__(self, worker: CaffeWorker) -> None:
        self.worker = worker

    def request(self, op: str, **kwargs: Any) -> object:
        sent = pickle.loads(pickle.dumps(kwargs))
        return pickle.loads(pickle.dumps(self.worker.request(op, **sent)))


class _Replying(CaffeOps):
    """A transport whose every reply is `reply`."""

    def __init__(self, reply: object) -> None:
        self.reply = reply

    def request(self, op: str, **kwargs: Any) -> object:
        return self.reply


def test_typed_operations_work_through_a_relay(worker: CaffeWorker) -> None:
    relay = _Relayed(worker)
    proto = relay.prototxt("expectation", features=4, bins=3)
    assert proto == worker.prototxt("expectation", features=4, bins=3)
    described = relay.describe(proto)
    assert isinstance(described, NetDescription) and described == worker.describe(proto)
    assert described.inputs == {"pool5": (1, 4)}
    assert [p.shape for p in described.layers[1].params] == [(3, 4), (3,)]
    assert relay.layer_specs(proto) == worker.layer_specs(proto)
    x = np.arange(4, dtype=np.float32)[None]
    run = relay.submit_run(proto, {"pool5": x}, phase="TEST", surgery="pred_age")()
    assert isinstance(run, RunReply) and run.diffs == {} and run.top_diffs == {}
    assert run.blobs["pred_age"].shape == (1, 1)
    assert run.params["pred_age"][0].tobytes() == np.arange(3, dtype=np.float32)[None].tobytes()


def test_a_reply_of_another_type_is_refused_naming_the_op() -> None:
    described = NetDescription(layers=[], blobs={}, inputs={}, force_backward=False)
    assert _Replying(described).describe("net") is described
    with pytest.raises(CaffeError, match="replied a dict to describe, not a NetDescription"):
        _Replying({"layers": []}).describe("net")
    with pytest.raises(CaffeError, match="replied a list to layer_types, not a list of str"):
        _Replying(["Input", 3]).layer_types("net")
    with pytest.raises(CaffeError, match="replied a NetDescription to run, not a RunReply"):
        _Replying(described).submit_run("net", {})()
    assert _Replying(None).surgery("net") is None
    with pytest.raises(CaffeError, match="replied a int to surgery, not a SurgeryReply or None"):
        _Replying(3).surgery("net")


def test_each_request_class_makes_its_method_and_its_worker_op() -> None:
    """One class per op says its arguments and its reply: the worker's `op_<op>` takes that
    class and returns that reply, and the client's `<op>` (and `submit_<op>`) take its
    fields, with their defaults, in its order."""
    served = {name[3:] for name in vars(server.Ops) if name.startswith("op_")}
    assert served == set(requests.BY_OP)
    for op, kind in requests.BY_OP.items():
        hints = typing.get_type_hints(getattr(server.Ops, "op_" + op))
        assert hints["req"] is kind and hints["return"] == kind.reply, op
        fields = list(inspect.signature(kind).parameters.values())
        for name in (op, "submit_" + op):
            method = getattr(CaffeOps, name, None)
            if method is None or op == "prototxt":  # prototxt takes its options as keywords
                continue
            assert list(inspect.signature(method).parameters.values())[1:] == fields, name
            assert method.__doc__.endswith(inspect.cleandoc(kind.__doc__)), name
    typed = {op for op in requests.BY_OP if hasattr(CaffeOps, op)}
    # crash is for tests (sent untyped); run_many is worker.submit_run_many
    assert set(requests.BY_OP) - typed == {"crash", "run_many"}


def test_a_request_crosses_as_its_fields() -> None:
    x = np.zeros((1, 4), np.float32)
    recipe = Recipe(inputs=[("data", (1, 4), 0)], params=[])
    sent = requests.RunGeneratedRequest("net", recipe, 1, 1.0, 1.0, 2, True).kwargs()
    assert sent["recipe"] is recipe and sent["phase"] == "TEST" and len(sent) == 13
    run = requests.RunRequest("net", types.MappingProxyType({"data": x}), phase="TEST")
    sent = run.kwargs()
    assert type(sent["inputs"]) is dict and sent["inputs"]["data"] is x
    assert requests.RunRequest(**sent) == dataclasses.replace(run, inputs={"data": x})


def test_nets_are_reused_across_batch_sizes(caffe_install: provision.CaffeInstall) -> None:
    with CaffeWorker(caffe_install) as worker:
        proto = worker.prototxt(head="expectation", features=5, bins=7)
        worker.surgery(prototxt=proto)  # a fresh net: the cached one is untouched
        for n in (1, 3, 64, 2):
            x = np.random.default_rng(n).standard_normal((n, 5)).astype(np.float32)
            out = worker.run(prototxt=proto, inputs={"pool5": x}, surgery="pred_age")
            assert out.blobs["pred_age"].shape == (n, 1)
            assert (
                out.params["pred_age"][0].tobytes()
                == np.arange(7, dtype=np.float32)[None].tobytes()
            )


# ---- run_many's arrays through shared memory ---------------------------------------------


def test_arrays_round_trip_through_a_memory_file() -> None:
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((3, 4, 5)).astype(np.float32),
        rng.standard_normal((6, 4))[:, ::2],  # not contiguous: written as C order
        np.array(7.5),  # 0-d
        np.zeros((2, 0, 3), dtype=np.float32),  # empty
        np.array([np.nan, -0.0, np.inf, 1e-45], dtype=np.float32),
        np.arange(5, dtype=np.int64),
    ]
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    try:
        descs, end = put_arrays(fd, arrays, 100)
        assert descs[0][0] == 100 and end == 100 + sum(a.nbytes for a in arrays)
        back = get_arrays(fd, descs)
        for a, b in zip(arrays, back, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert np.ascontiguousarray(a).tobytes() == b.tobytes()
        # What the file holds is read, not what was meant: a byte changed in the file shows.
        os.pwrite(fd, b"\xff", descs[0][0])
        assert get_arrays(fd, descs[:1])[0].tobytes() != arrays[0].tobytes()
    finally:
        os.close(fd)


def test_run_many_is_the_same_through_shared_memory_and_the_pipe(
    worker: CaffeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bit for bit, every array of the reply (the params sent, a NaN with a payload among
    them, come back as Caffe read them either way)."""
    from crossval import worker as worker_module

    proto = worker.prototxt(head="expectation", features=5, bins=7, loss="euclidean")
    rng = np.random.default_rng(3)
    inputs = {
        "pool5": rng.standard_normal((4, 2, 5)).astype(np.float32),
        "true_age": rng.uniform(0, 6, (4, 2, 1)).astype(np.float32),
    }
    w = rng.standard_normal((4, 7, 5)).astype(np.float32)
    w.view(np.uint32)[1, 0, 0] = 0x7FA00000  # a NaN with a payload
    params = {"fc7": [w, rng.standard_normal((4, 7)).astype(np.float32)]}
    shared = worker_module.submit_run_many(worker, proto, inputs, params, "pred_age")()
    assert worker_module._SHARED.get(worker) is not None, "run_many did not use the memory file"
    monkeypatch.setattr(worker_module, "_shared_file", lambda w: None)
    piped = worker_module.submit_run_many(worker, proto, inputs, params, "pred_age")()
    for field in ("blobs", "diffs", "params", "param_diffs"):
        a, b = getattr(shared, field), getattr(piped, field)
        assert a.keys() == b.keys(), field
        for k in a:
            pairs = zip(a[k], b[k], strict=True) if isinstance(a[k], list) else [(a[k], b[k])]
            for x, y in pairs:
                assert x.shape == y.shape and x.tobytes() == y.tobytes(), (field, k)
    assert shared.cases == 4 and shared.blobs["pred_age"].shape == (4, 2, 1)
    assert shared.params["fc7"][0].view(np.uint32)[1, 0, 0] == 0x7FA00000


# ---- process hygiene and time limits ---------------------------------------------------


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an unreaped child of init counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$TMPDIR of this test alone, so leftovers are this test's own."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("crossval"))


@pytest.mark.parametrize("busy", [False, True])
def test_worker_dies_when_its_parent_is_sigkilled(
    caffe_install: provision.CaffeInstall, private_tmp: Path, busy: bool
) -> None:
    # The parent starts a worker, reports its pid, and (busy) leaves it hanging in a call.
    script = (
        "import sys, time\n"
        "from crossval.worker import CaffeWorker\n"
        "w = CaffeWorker()\n"
        "print(w.ping().pid, w.directory, flush=True)\n"
        + ("w.submit_request('crash', how='hang')\n" if busy else "")
        + "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert parent.stdout is not None
        pid_text, directory = parent.stdout.readline().split()
        worker_pid = int(pid_text)
        assert _alive(worker_pid) and Path(directory).is_dir()
        time.sleep(0.3)  # the busy request reaches the worker
        parent.kill()
        parent.wait()
        assert _wait_gone(worker_pid, 5.0), f"worker {worker_pid} outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    # A SIGKILLed parent cannot clean up: the next worker started anywhere removes its directory.
    assert Path(directory).exists()
    with CaffeWorker(caffe_install) as worker:
        worker.ping()
        assert not Path(directory).exists()


def test_no_temporary_files_after_an_abort_and_after_close(
    caffe_install: provision.CaffeInstall, private_tmp: Path
) -> None:
    with CaffeWorker(caffe_install) as worker:
        proto = worker.prototxt(head="sigmoid_scale", features=4, batch=2, loss="euclidean")
        first = Path(worker.directory)
        assert first.parent == private_tmp and (first / "caffe.log").is_file()
        # Caffe aborts while building the net, with its temporary prototxt written.
        with pytest.raises(CaffeCrash, match="Check failed"):
            worker.run(
                prototxt=proto,
                inputs={
                    "pool5": np.zeros((2, 4), np.float32),
                    "true_age": np.zeros((2, 2), np.float32),
                },
            )
        assert _leftovers(private_tmp) == []
        with pytest.raises(CaffeCrash, match="killed by signal 6"):
            worker.request("crash", how="abort")
        assert _leftovers(private_tmp) == []
        worker.ping()
        assert _leftovers(private_tmp) == [Path(worker.directory).name]
        # Killed from outside while idle: the next call replaces it and its directory.
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert _wait_gone(pid, 5.0)
        assert worker.ping().pid != pid
        assert _leftovers(private_tmp) == [Path(worker.directory).name]
    assert _leftovers(private_tmp) == []


HANGING_LAYER = """
import time

import caffe


class Hang(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        while True:
            time.sleep(3600)

    def backward(self, top, propagate_down, bottom):
        pass
"""

HANGING_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "stuck" type: "Python" bottom: "data" top: "out"
        python_param { module: "hanging_layer" layer: "Hang" } }
"""


def test_a_call_over_its_limit_is_killed_and_the_next_call_works(
    caffe_install: provision.CaffeInstall,
    private_tmp: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "hanging_layer.py").write_text(HANGING_LAYER)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}")
    with CaffeWorker(caffe_install, timeout=3.0) as worker:
        pid = worker.ping().pid
        start = time.monotonic()
        with pytest.raises(CaffeTimeout) as info:
            worker.run(prototxt=HANGING_NET, inputs={"data": np.ones((2, 3), np.float32)})
        took = time.monotonic() - start
        assert 3.0 <= took < 6.0, took
        message = str(info.value)
        assert "did not return within 3 s during run" in message
        assert "forward (hanging_layer.py:" in message
        assert not _alive(pid) and _leftovers(private_tmp) == []
        assert worker.ping().pid != pid and worker.restarts == 1
        # The built-in hang (no Python layer) is stopped the same way.
        with pytest.raises(CaffeTimeout, match="during crash"):
            worker.request("crash", how="hang")
        assert worker.layer_types(HANGING_NET) == ["Input", "Python"]


def test_default_limits_grow_with_the_net_and_its_work() -> None:
    small = default_limit("run", {"prototxt": "x" * 1000})
    big = default_limit("run", {"prototxt": "x" * 8000, "inputs": {"a": np.zeros((10, 10**5))}})
    train = default_limit("train", {"solver_prototxt": "x" * 1000, "steps": 50})
    assert BASE_LIMIT < small < big and small < train
    # an argument left out counts at its default
    timed = {"prototxt": "x" * 1000, "inputs": {}, "params": {}}
    assert default_limit("time_raw", timed) == default_limit("time_raw", {**timed, "repeat": 1000})
    assert default_limit("time_raw", timed) > default_limit("time_raw", {**timed, "repeat": 10})


def test_a_crash_ends_a_hypothesis_search_at_once(caffe_install: provision.CaffeInstall) -> None:
    tried: list[int] = []
    with CaffeWorker(caffe_install) as worker:

        @settings(max_examples=50, database=None, derandomize=True, deadline=None)
        @given(x=st.integers(0, 100))
        @stops_search()
        def prop(x: int) -> None:
            tried.append(x)
            worker.request("crash", how="abort") if x > 5 else worker.ping()

        with pytest.raises(CaffeCrash, match="killed by signal 6"), searching():
            prop()
        # Hypothesis would otherwise shrink x through a fresh worker per step.
        assert worker.restarts == 1 and tried[-1] > 5 and sum(x > 5 for x in tried) == 1


def test_a_fork_dropping_the_worker_leaves_it_alone(
    caffe_install: provision.CaffeInstall, private_tmp: Path
) -> None:
    """A fork of the process (as a conformance case is) that garbage-collects its copy of
    the worker object neither kills the parent's worker nor removes its directory."""
    worker = CaffeWorker(caffe_install)
    pid = worker.ping().pid
    directory = Path(worker.directory)
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        code = 0
        try:
            del worker
            gc.collect()
        except BaseException:
            code = 1
        os._exit(code)
    assert os.waitpid(child, 0)[1] == 0
    try:
        assert _alive(pid) and directory.is_dir()
        assert worker.ping().pid == pid
    finally:
        worker.close()
    assert not directory.exists()


def test_relative_paths_are_the_callers(
    caffe_install: provision.CaffeInstall, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker started in one directory reads and writes a relative path as the caller,
    now in another directory, means it."""
    with CaffeWorker(caffe_install) as worker:
        proto = worker.prototxt(head="sigmoid_scale", features=4, batch=2, loss="euclidean")
        params = worker.params(proto).params
        monkeypatch.chdir(tmp_path)
        assert worker.save(proto, params, "here.caffemodel") == str(tmp_path / "here.caffemodel")
        again = worker.params(proto, weights="here.caffemodel").params
        assert {k: [a.tobytes() for a in v] for k, v in again.items()} == {
            k: [a.tobytes() for a in v] for k, v in params.items()
        }
