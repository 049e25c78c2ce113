"""Caffe in a long-lived child process.

pycaffe runs in a separate interpreter, so a Caffe CHECK failure, abort or segfault cannot
take the caller down: it becomes a ``CaffeCrash`` carrying Caffe's own log line, and the next
request starts a fresh worker. Requests and replies are pickled over the child's stdin and a
private copy of its stdout; Caffe's log (stderr) goes to a file read only after a crash.

Process hygiene: the worker runs in its own session (its process group is killed as one),
asks the kernel to kill it when its parent dies (``PR_SET_PDEATHSIG``, whatever killed the
parent, SIGKILL included), and writes its temporary files and log only in a private
directory that the parent removes on close, after a crash, and at exit. Every call has a
time limit (``default_limit``, or the worker's ``timeout``); reaching it kills the worker and
raises ``CaffeTimeout``, and the next call starts a fresh one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar, cast

import numpy as np

from . import provision
from .caffe_side.replies import (
    CaffeLayerSpec,
    CheckNetReply,
    Descriptor,
    GeneratedRun,
    GradientCheckReply,
    ManyRunsReply,
    NetDescription,
    NetParams,
    Ping,
    RawTime,
    RunReply,
    SurgeryReply,
    TrainReply,
    run_many_arrays,
    with_arrays,
)
from .caffe_side.wire import Expired, get_arrays, put_arrays, recv_frame, send_frame
from .errors import CrossvalError, raise_if_interrupted
from .examplegen import Recipe

DIR_PREFIX = "crossval-worker-"
PIPE_SIZE = 1 << 20  # bytes; Linux caps it at /proc/sys/fs/pipe-max-size (1 MiB by default)

# Default time limit of one call: generous, so that only a hang reaches it. The base covers
# importing pycaffe and building a net on a loaded 2-core machine (a few seconds when idle);
# a net's cost grows with its definition (each KB of prototxt is a few large layers: the
# full-size VGG-16 is 4.9 KB, 146 s) and with the arrays the call carries (its 138 M weights,
# 276 s: one forward and backward take a few seconds when idle).
BASE_LIMIT = 120.0
LIMIT_PER_PROTOTXT_KB = 30.0
LIMIT_PER_MILLION_ELEMENTS = 2.0
# Calls that repeat the net's work, and how many times (in units of one run).
_REPEATS: dict[str, Callable[[Mapping[str, Any]], float]] = {
    "train": lambda kw: max(1.0, float(kw.get("steps", 1))),
    "gradient_check": lambda kw: 1.0 + len(kw.get("targets", ())) / 10,
    "time_raw": lambda kw: 1.0 + float(kw.get("repeat", 1000)) / 100,
}


def _elements(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return int(value.size)
    if isinstance(value, Mapping):
        return sum(_elements(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_elements(v) for v in value)
    return 0


def default_limit(op: str, kwargs: Mapping[str, Any]) -> float:
    """Seconds allowed for one worker call: BASE_LIMIT, plus the net's size (prototxt text)
    and the request's arrays, times the op's repetitions of the net's work."""
    chars = sum(len(v) for k, v in kwargs.items() if "prototxt" in k and isinstance(v, str))
    size = chars / 1024 * LIMIT_PER_PROTOTXT_KB
    size += _elements(kwargs) / 1e6 * LIMIT_PER_MILLION_ELEMENTS
    repeats = _REPEATS[op](kwargs) if op in _REPEATS else 1.0
    return BASE_LIMIT + size * repeats + (repeats - 1) * BASE_LIMIT / 10


class CaffeCrash(CrossvalError):
    """The Caffe worker died while serving a request; the message carries Caffe's log line."""

    def __init__(self, op: str, how: str, log_lines: list[str]) -> None:
        self.op = op
        self.how = how
        self.log_lines = log_lines
        fatal = [ln for ln in log_lines if ln[:1] == "F" or "Check failed" in ln]
        shown = fatal[-1] if fatal else (log_lines[-1] if log_lines else "(no log output)")
        super().__init__(f"Caffe {how} during {op}: {shown}")


class CaffeTimeout(CaffeCrash):
    """A worker call reached its time limit; the worker was killed (the next call starts a
    fresh one). `where` is the innermost Python frame the worker was in, when it had one
    (a Python layer's forward, for example)."""

    def __init__(self, op: str, limit: float, where: str, log_lines: list[str]) -> None:
        self.limit = limit
        self.where = where
        CrossvalError.__init__(
            self,
            f"Caffe did not return within {limit:.0f} s during {op}"
            + (f" (it was in {where})" if where else "")
            + "; the worker was killed",
        )
        self.op, self.how, self.log_lines = op, f"timed out after {limit:.0f} s", log_lines


class CaffeError(CrossvalError):
    """A request failed inside the worker with a Python exception (the worker lives on)."""


class SearchStopped(BaseException):
    """Ends a hypothesis search at once with `error`. Hypothesis shrinks a failing example
    (any Exception) by rerunning the test on smaller ones, which after a Caffe crash means a
    fresh worker per step; a BaseException goes through it untouched."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


_F = TypeVar("_F", bound=Callable[..., Any])


def stops_search(*kinds: type[Exception]) -> Callable[[_F], _F]:
    """Decorator for the function under ``@given``: an exception of `kinds` (default
    CaffeCrash) ends the search at once; run the search inside `searching()` to get it back."""
    caught = kinds or (CaffeCrash,)

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except caught as exc:
                raise SearchStopped(exc) from None

        return cast(_F, run)

    return decorate


@contextlib.contextmanager
def searching() -> Iterator[None]:
    """Around a hypothesis search whose test is `stops_search`-decorated: re-raises the
    exception that stopped it, as it was."""
    try:
        yield
    except SearchStopped as stop:
        raise stop.error from None


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL `proc`'s process group (it leads its own session) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    proc.wait()


def _reap(proc: subprocess.Popen[bytes], log: IO[bytes], directory: str) -> None:
    kill_group(proc)
    for stream in (proc.stdin, proc.stdout, log):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    shutil.rmtree(directory, ignore_errors=True)


def private_dir(prefix: str = DIR_PREFIX) -> str:
    """A new private temporary directory named after this process (`<prefix><pid>-...`);
    first removes those of earlier processes that are gone (killed before they could)."""
    sweep_stale(prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")


def sweep_stale(prefix: str = DIR_PREFIX) -> None:
    """Remove this user's `<prefix><pid>-*` directories whose process no longer exists."""
    root = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            m = re.fullmatch(re.escape(prefix) + r"(\d+)-\w+", entry.name)
            if m is None or not entry.is_dir() or entry.stat().st_uid != os.getuid():
                continue
            try:
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:
                shutil.rmtree(entry, ignore_errors=True)
            except PermissionError:
                pass


_R = TypeVar("_R")


class CaffeOps:
    """The worker's operations, typed: one method per ``op_<name>`` of
    ``crossval.caffe_side.server.Ops``, with its keyword arguments and its reply (a dataclass
    of ``crossval.caffe_side.replies``). Built on the transport a subclass provides:
    `request` (and `submit_request`, which may start the op and return a function that waits
    for its reply)."""

    def request(self, op: str, **kwargs: Any) -> object:
        """The transport: run `op` in the worker and return its reply, as it came."""
        raise NotImplementedError

    def submit_request(self, op: str, **kwargs: Any) -> Callable[[], object]:
        """The transport: start `op` and return a function that waits for its reply (here
        the op runs at once; `CaffeWorker` runs it while the caller works)."""
        reply = self.request(op, **kwargs)
        return lambda: reply

    def _submit(self, op: str, kind: type[_R], **kwargs: Any) -> Callable[[], _R]:
        pending = self.submit_request(op, **kwargs)
        return lambda: _expect(op, pending(), kind)

    def ping(self) -> Ping:
        """Where the worker's pycaffe comes from, and its process id."""
        return _expect("ping", self.request("ping"), Ping)

    def prototxt(self, head: str, **options: object) -> str:
        """The prototxt text of a net the worker builds (``crossval.caffe_side.nets.BUILDERS``:
        a head or a zoo net) with the builder's `options`."""
        return _expect("prototxt", self.request("prototxt", head=head, **options), str)

    def describe(self, prototxt: str, phase: str = "TEST", surgery: str = "") -> NetDescription:
        """The built net's layers, blob shapes and inputs (``Ops.op_describe``)."""
        reply = self.request("describe", prototxt=prototxt, phase=phase, surgery=surgery)
        return _expect("describe", reply, NetDescription)

    def layer_specs(self, prototxt: str, phase: str = "TEST") -> list[CaffeLayerSpec]:
        """Each layer `phase` keeps, as Caffe parses it (``Ops.op_layer_specs``)."""
        reply = self.request("layer_specs", prototxt=prototxt, phase=phase)
        return _expect_list("layer_specs", reply, CaffeLayerSpec)

    def layer_types(self, prototxt: str, phase: str | None = None) -> list[str]:
        """The type of each layer (only those `phase` keeps, when given), parsed only."""
        reply = self.request("layer_types", prototxt=prototxt, phase=phase)
        return _expect_list("layer_types", reply, str)

    def params(
        self, prototxt: str, phase: str = "TEST", weights: str = "", surgery: str = ""
    ) -> NetParams:
        """Every param blob of the net (from `weights`, or as Caffe fills it in)."""
        reply = self.request(
            "params", prototxt=prototxt, phase=phase, weights=weights, surgery=surgery
        )
        return _expect("params", reply, NetParams)

    def submit_run(
        self,
        prototxt: str,
        inputs: Mapping[str, np.ndarray],
        params: Mapping[str, list[np.ndarray]] | None = None,
        phase: str = "TRAIN",
        backward: bool = False,
        weights: str = "",
        surgery: str = "",
        return_params: bool = True,
        all_diffs: bool = False,
        top_diffs: Mapping[str, np.ndarray] | None = None,
        top_diff_seed: tuple[int, list[str]] | None = None,
    ) -> Callable[[], RunReply]:
        """`run` started in the worker; call the result to wait for its reply."""
        return self._submit(
            "run",
            RunReply,
            prototxt=prototxt,
            inputs=dict(inputs),
            params=None if params is None else dict(params),
            phase=phase,
            backward=backward,
            weights=weights,
            surgery=surgery,
            return_params=return_params,
            all_diffs=all_diffs,
            top_diffs=None if top_diffs is None else dict(top_diffs),
            top_diff_seed=top_diff_seed,
        )

    def run(
        self,
        prototxt: str,
        inputs: Mapping[str, np.ndarray],
        params: Mapping[str, list[np.ndarray]] | None = None,
        phase: str = "TRAIN",
        backward: bool = False,
        weights: str = "",
        surgery: str = "",
        return_params: bool = True,
        all_diffs: bool = False,
        top_diffs: Mapping[str, np.ndarray] | None = None,
        top_diff_seed: tuple[int, list[str]] | None = None,
    ) -> RunReply:
        """Set `params` and `inputs`, forward (and backward), and return every blob, the
        diffs and the params (``Ops.op_run``)."""
        return self.submit_run(
            prototxt,
            inputs,
            params,
            phase,
            backward,
            weights,
            surgery,
            return_params,
            all_diffs,
            top_diffs,
            top_diff_seed,
        )()

    def submit_run_generated(
        self,
        prototxt: str,
        recipe: Recipe,
        seed: int,
        input_scale: float,
        weight_scale: float,
        batch: int,
        learnable: bool,
        phase: str = "TEST",
        weights: str = "",
        surgery: str = "",
        backward: bool = False,
        all_diffs: bool = False,
        top_diff_seed: tuple[int, list[str]] | None = None,
    ) -> Callable[[], GeneratedRun]:
        """`run` on an example the worker generates (``crossval.examplegen``; `recipe` is its
        recipe), started in the worker; the reply carries the digest of the params used."""
        return self._submit(
            "run_generated",
            GeneratedRun,
            prototxt=prototxt,
            recipe=recipe,
            seed=seed,
            input_scale=input_scale,
            weight_scale=weight_scale,
            batch=batch,
            learnable=learnable,
            phase=phase,
            weights=weights,
            surgery=surgery,
            backward=backward,
            all_diffs=all_diffs,
            top_diff_seed=top_diff_seed,
        )

    def gradient_check(
        self,
        prototxt: str,
        inputs: Mapping[str, np.ndarray],
        params: Mapping[str, list[np.ndarray]],
        targets: list[tuple[str, str, int]],
        step: float = 1e-2,
        threshold: float = 1e-3,
        surgery: str = "",
        kink: tuple[str, str, float] | None = None,
        slacks: list[float] | None = None,
    ) -> GradientCheckReply:
        """Caffe's GradientChecker on chosen elements (``Ops.op_gradient_check``)."""
        reply = self.request(
            "gradient_check",
            prototxt=prototxt,
            inputs=dict(inputs),
            params=dict(params),
            targets=targets,
            step=step,
            threshold=threshold,
            surgery=surgery,
            kink=kink,
            slacks=slacks,
        )
        return _expect("gradient_check", reply, GradientCheckReply)

    def time_raw(
        self,
        prototxt: str,
        inputs: Mapping[str, np.ndarray],
        params: Mapping[str, list[np.ndarray]],
        repeat: int = 1000,
        surgery: str = "",
    ) -> RawTime:
        """Seconds per forward and backward inside the worker, no IPC (best of 5)."""
        reply = self.request(
            "time_raw",
            prototxt=prototxt,
            inputs=dict(inputs),
            params=dict(params),
            repeat=repeat,
            surgery=surgery,
        )
        return _expect("time_raw", reply, RawTime)

    def train(
        self,
        solver_prototxt: str,
        steps: int,
        batches: list[dict[str, np.ndarray]],
        weights: str = "",
    ) -> TrainReply:
        """Caffe's solver (from its prototxt file) for `steps` iterations from `weights`."""
        reply = self.request(
            "train", solver_prototxt=solver_prototxt, steps=steps, batches=batches, weights=weights
        )
        return _expect("train", reply, TrainReply)

    def save(
        self, prototxt: str, params: Mapping[str, list[np.ndarray]], out: str, phase: str = "TEST"
    ) -> str:
        """Write a caffemodel holding `params` to `out` (returned)."""
        reply = self.request("save", prototxt=prototxt, params=dict(params), out=out, phase=phase)
        return _expect("save", reply, str)

    def surgery(
        self,
        prototxt: str,
        phase: str = "TRAIN",
        layer: str = "pred_age",
        weights: str = "",
        out: str = "",
        params: Mapping[str, list[np.ndarray]] | None = None,
    ) -> SurgeryReply | None:
        """The net surgery on a fresh net (after setting `params`); with `out`, the net
        saved as a caffemodel. None when `layer` is ''."""
        reply = self.request(
            "surgery",
            prototxt=prototxt,
            phase=phase,
            layer=layer,
            weights=weights,
            out=out,
            params=None if params is None else dict(params),
        )
        return None if reply is None else _expect("surgery", reply, SurgeryReply)

    def check_net(self, prototxt: str, phase: str = "TEST", weights: str = "") -> CheckNetReply:
        """What ``crossval.inputs.check_net`` needs to know of the net (and its weights)."""
        reply = self.request("check_net", prototxt=prototxt, phase=phase, weights=weights)
        return _expect("check_net", reply, CheckNetReply)


def _expect(op: str, reply: object, kind: type[_R]) -> _R:
    if not isinstance(reply, kind):
        raise CaffeError(
            f"the Caffe worker replied a {type(reply).__name__} to {op}, not a {kind.__name__}"
        )
    return reply


def _expect_list(op: str, reply: object, kind: type[_R]) -> list[_R]:
    if not isinstance(reply, list) or not all(isinstance(r, kind) for r in reply):
        raise CaffeError(
            f"the Caffe worker replied a {type(reply).__name__} to {op}, "
            f"not a list of {kind.__name__}"
        )
    return reply


class CaffeWorker(CaffeOps):
    """A client for one pycaffe worker process; restarts it after a crash or a timeout.

    `timeout` (seconds) replaces `default_limit` for every call when given. The kernel kills
    the worker when the thread that started it ends (PR_SET_PDEATHSIG follows the thread):
    start it from a thread that outlives it, such as the main thread."""

    def __init__(
        self, install: provision.CaffeInstall | None = None, timeout: float | None = None
    ) -> None:
        self.install = install or provision.locate()
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._dir = ""
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._pending = False
        self.restarts = 0

    @property
    def directory(self) -> str:
        """The running worker's private temporary directory ('' when none runs)."""
        return self._dir

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> subprocess.Popen[bytes]:
        self._dir = private_dir()
        self._log = open(os.path.join(self._dir, "caffe.log"), "w+b")
        env = self.install.env()
        pkg_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = env["PYTHONPATH"] + ":" + pkg_root
        env["OMP_NUM_THREADS"] = env.get("CROSSVAL_CAFFE_THREADS", "1")
        env["OPENBLAS_NUM_THREADS"] = env.get("CROSSVAL_CAFFE_THREADS", "1")
        env["TMPDIR"] = self._dir
        env["CROSSVAL_WORKER_PARENT"] = str(os.getpid())
        proc = subprocess.Popen(
            [sys.executable, "-m", "crossval.caffe_side.server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            bufsize=0,
            start_new_session=True,
        )
        assert proc.stdin is not None
        os.set_blocking(proc.stdin.fileno(), False)
        assert proc.stdout is not None
        for pipe in (proc.stdin, proc.stdout):
            # Larger pipes: a batch of cases (megabytes each way) passes in fewer wakeups.
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self._proc = proc
        self._finalizer = weakref.finalize(self, _reap, proc, self._log, self._dir)
        return proc

    def _log_lines(self) -> list[str]:
        if self._log is None:
            return []
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode(errors="replace")
        return [ln for ln in text.splitlines() if ln.strip()]

    def limit(self, op: str, kwargs: Mapping[str, Any]) -> float:
        """Seconds allowed for `op` with `kwargs`."""
        return self.timeout if self.timeout is not None else default_limit(op, kwargs)

    def request(self, op: str, **kwargs: Any) -> object:
        """Run `op` in the worker and return its reply (the transport under `CaffeOps`'s
        typed methods)."""
        return self.submit_request(op, **kwargs)()

    def submit_request(self, op: str, **kwargs: Any) -> Callable[[], object]:
        """Send `op` to the worker and return a function that waits for its result, so the
        caller can work meanwhile (the worker runs on the other core). One request at a time:
        collect the result before the next submit. The time limit runs from here."""
        raise_if_interrupted()
        if self._proc is not None and self._proc.poll() is not None:
            self._retire()  # died between calls (killed from outside)
        proc = self._proc or self._start()
        limit = self.limit(op, kwargs)
        deadline = time.monotonic() + limit
        assert proc.stdin is not None
        self._pending = True
        try:
            send_frame(proc.stdin.fileno(), (op, kwargs), deadline)
        except Expired:
            return lambda: self._timed_out(proc, op, limit)
        except OSError:
            return lambda: self._collect(proc, op, deadline, limit, failed=True)
        return lambda: self._collect(proc, op, deadline, limit)

    def _collect(
        self,
        proc: subprocess.Popen[bytes],
        op: str,
        deadline: float,
        limit: float,
        failed: bool = False,
    ) -> object:
        assert proc.stdout is not None
        try:
            if failed:
                raise EOFError
            status, payload = recv_frame(proc.stdout.fileno(), deadline)
        except Expired:
            self._timed_out(proc, op, limit)
        except (EOFError, OSError, pickle.UnpicklingError):
            rc = proc.wait()
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            lines = self._log_lines()
            self._retire()
            raise CaffeCrash(op, how, lines[-20:]) from None
        finally:
            self._pending = False
        if status == "ok":
            return payload
        raise CaffeError(f"{op} failed in the Caffe worker: {payload}")

    def _timed_out(self, proc: subprocess.Popen[bytes], op: str, limit: float) -> NoReturn:
        self._pending = False
        where = ""
        if proc.poll() is None and self._log is not None:
            # The worker's faulthandler dumps its Python stack on SIGUSR1 (see server.main).
            size = os.fstat(self._log.fileno()).st_size
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1)
            end = time.monotonic() + 1.0
            while time.monotonic() < end and os.fstat(self._log.fileno()).st_size == size:
                time.sleep(0.02)
            time.sleep(0.05)
            where = innermost_frame(self._log_lines())
        kill_group(proc)
        lines = self._log_lines()
        self._retire()
        raise CaffeTimeout(op, limit, where, lines[-20:])

    def _retire(self) -> None:
        """Forget the dead worker and remove its directory."""
        if self._finalizer is not None:
            self._finalizer()
        self._finalizer = None
        self._proc, self._log, self._dir = None, None, ""
        self.restarts += 1

    def close(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None and not self._pending:
            assert proc.stdin is not None
            with contextlib.suppress(OSError):
                proc.stdin.close()  # an idle worker exits at the end of its requests
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if self._finalizer is not None:
            self._finalizer()  # kills what is left (a busy worker) and removes the directory
        self._finalizer = None
        self._proc, self._log, self._dir = None, None, ""
        self._pending = False

    def __enter__(self) -> CaffeWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def innermost_frame(log_lines: list[str]) -> str:
    """The innermost frame of the last Python stack dump (faulthandler's format) in the log:
    `function (file:line)`, '' when there is none."""
    for i in range(len(log_lines) - 1, -1, -1):
        if "most recent call first" in log_lines[i]:
            for line in log_lines[i + 1 :]:
                m = re.match(r'\s*File "([^"]+)", line (\d+) in (\S+)', line)
                if m:
                    return f"{m.group(3)} ({Path(m.group(1)).name}:{m.group(2)})"
            return ""
    return ""


@dataclasses.dataclass(frozen=True)
class ManyRuns:
    """The reply of the worker's ``run_many`` op: many independent cases run back to back on
    one net, every array with a leading case axis (case m at index m)."""

    blobs: dict[str, np.ndarray]  # every blob of the net after the case's forward pass
    diffs: dict[str, np.ndarray]  # the input blobs' diffs after its backward pass
    params: dict[str, list[np.ndarray]]  # every param blob, read back after the case ran
    param_diffs: dict[str, list[np.ndarray]]

    @property
    def cases(self) -> int:
        return len(next(iter(self.blobs.values())))


# run_many's arrays (megabytes a batch each way) pass through a memory file (memfd) that the
# worker opens through /proc, instead of being pickled through the pipe: one copy in and one
# out on each side, where pickling, framing, the pipe and unpickling made six and woke both
# processes for every 1 MiB. The pipe carries the request and the reply with each array's
# (offset, dtype, shape) in the file. One file per CaffeWorker, reused by every call (one
# request at a time: the worker writes its reply after the request's arrays).
_SHARED: weakref.WeakKeyDictionary[CaffeWorker, int] = weakref.WeakKeyDictionary()


def _shared_file(worker: CaffeWorker) -> int | None:
    """The descriptor of `worker`'s memory file (made on first use); None where there is no
    memfd (run_many then pickles its arrays through the pipe)."""
    fd = _SHARED.get(worker)
    if fd is None and hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd"):
        fd = os.memfd_create("crossval-run-many", os.MFD_CLOEXEC)
        _SHARED[worker] = fd
        weakref.finalize(worker, os.close, fd)
    return fd


def shared_path(fd: int) -> str:
    """The path through which another process of this user opens this process's `fd`."""
    return f"/proc/{os.getpid()}/fd/{fd}"


def submit_run_many(
    worker: CaffeWorker,
    prototxt: str,
    inputs: Mapping[str, np.ndarray],
    params: Mapping[str, list[np.ndarray]],
    surgery: str = "",
) -> Callable[[], ManyRuns]:
    """Forward and backward of many cases in the worker (``Ops.op_run_many``): case m with
    ``inputs[name][m]`` and ``params[layer][i][m]``. Returns a function that waits for the
    result (the worker runs while the caller works).

    The params sent are read back and compared bit for bit in the worker, which returns only
    the cases whose read-back differs: the result's params are the values sent (as float32,
    Caffe's type) with those cases' read-back values put in."""
    fd = _shared_file(worker)
    if fd is None:
        pending = worker.submit_request(
            "run_many",
            prototxt=prototxt,
            inputs=dict(inputs),
            params={k: list(v) for k, v in params.items()},
            surgery=surgery,
        )
    else:
        names = list(inputs)
        flat = [(layer, len(blobs)) for layer, blobs in params.items()]
        arrays = [inputs[n] for n in names] + [b for blobs in params.values() for b in blobs]
        descs, end = put_arrays(fd, arrays, 0)
        sent: dict[str, list[Descriptor]] = {}
        i = len(names)
        for layer, count in flat:
            sent[layer] = descs[i : i + count]
            i += count
        pending = worker.submit_request(
            "run_many",
            prototxt=prototxt,
            inputs=dict(zip(names, descs[: len(names)], strict=True)),
            params=sent,
            surgery=surgery,
            shared=(shared_path(fd), end),
        )

    def wait() -> ManyRuns:
        got = _expect("run_many", pending(), ManyRunsReply)
        if fd is None:
            reply = cast(ManyRunsReply[np.ndarray], got)
        else:
            # the arrays are in the shared file, their descriptors in the reply
            descs = cast(ManyRunsReply[Descriptor], got)
            reply = with_arrays(descs, get_arrays(fd, run_many_arrays(descs)))
        back = {k: [np.asarray(v, dtype=np.float32).copy() for v in vs] for k, vs in params.items()}
        for layer, i, case, value in reply.sent_back:
            back[layer][i][case] = value
        return ManyRuns(reply.blobs, reply.diffs, {**reply.params, **back}, reply.param_diffs)

    return wait


__all__ = [
    "CaffeCrash",
    "CaffeError",
    "CaffeOps",
    "CaffeTimeout",
    "CaffeWorker",
    "ManyRuns",
    "SearchStopped",
    "default_limit",
    "innermost_frame",
    "searching",
    "stops_search",
    "submit_run_many",
]
