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
import inspect
import os
import pickle
import re
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Concatenate, NoReturn, ParamSpec, TypeVar, cast

import numpy as np

from . import provision, warmstart
from .caffe_side import requests
from .caffe_side.replies import (
    Descriptor,
    GeneratedRun,
    ManyRunsReply,
    run_many_arrays,
    with_arrays,
)
from .caffe_side.wire import Expired, get_arrays, put_arrays, recv_frame, send_frame
from .errors import CrossvalError, raise_if_interrupted

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
# Calls that repeat the net's work, and how many times (in units of one run), from the
# request's arguments (those not given at their defaults).
_REPEATS: dict[str, Callable[[Mapping[str, Any]], float]] = {
    requests.TrainRequest.op: lambda kw: max(1.0, float(kw.get("steps", 1))),
    requests.GradientCheckRequest.op: lambda kw: 1.0 + len(kw.get("targets", ())) / 10,
    requests.TimeRawRequest.op: lambda kw: 1.0 + float(kw["repeat"]) / 100,
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
    repeats = (
        _REPEATS[op]({**requests.defaults(requests.BY_OP[op]), **kwargs}) if op in _REPEATS else 1.0
    )
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


# the request fields that name files (``crossval.caffe_side.requests``)
PATH_FIELDS = ("weights", "out", "solver_prototxt")

# imported by the Caffe workers' warm process
SERVER_PRELOAD = ("numpy", "caffe", "crossval.caffe_side.server")


def _reap(proc: warmstart.Forked, log: IO[bytes], directory: str, owner: int) -> None:
    """Kill the worker and remove its directory, in the process that started it only: a
    fork of that process (a conformance case, say) inherits the worker object, and its
    garbage collector must not take the parent's worker and files down."""
    if os.getpid() != owner:
        return
    proc.kill_group()
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
_P = ParamSpec("_P")


def _typed(request: Callable[_P, requests.Request[_R]]) -> Callable[Concatenate[CaffeOps, _P], _R]:
    """The typed method of `request`'s op: it takes the request's arguments (mypy checks
    them against the request class) and returns its reply."""

    def method(self: CaffeOps, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return self.perform(request(*args, **kwargs))

    return _named(method, request, submitted=False)


def _submitting(
    request: Callable[_P, requests.Request[_R]],
) -> Callable[Concatenate[CaffeOps, _P], Callable[[], _R]]:
    """The `submit_` method of `request`'s op: it starts the op in the worker and returns a
    function that waits for its reply."""

    def method(self: CaffeOps, /, *args: _P.args, **kwargs: _P.kwargs) -> Callable[[], _R]:
        return self.start(request(*args, **kwargs))

    return _named(method, request, submitted=True)


_M = TypeVar("_M", bound=Callable[..., Any])


def _named(method: _M, request: Callable[..., requests.Request[Any]], submitted: bool) -> _M:
    """`method` named, documented and signed after the request class `request` (for
    ``help()`` and ``inspect.signature``)."""
    kind = cast(type[requests.Request[Any]], request)
    doc = inspect.cleandoc(kind.__doc__ or "")
    reply: object = kind.reply
    if submitted:
        method.__name__ = f"submit_{kind.op}"
        doc = f"`{kind.op}` started in the worker; call the result to wait for its reply.\n\n{doc}"
        reply = Callable[[], kind.reply]
    else:
        method.__name__ = kind.op
    method.__qualname__ = f"CaffeOps.{method.__name__}"
    method.__doc__ = doc
    fields = inspect.signature(kind).parameters.values()
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    method.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [self_param, *fields], return_annotation=reply
    )
    return method


class CaffeOps:
    """The worker's operations, typed: one method per request class of
    ``crossval.caffe_side.requests`` (``run`` for ``RunRequest``...), taking its fields as
    arguments and returning its reply (a dataclass of ``crossval.caffe_side.replies``);
    ``submit_<op>`` starts the op and returns a function that waits for the reply.
    `perform` and `start` take a request object. Built on the transport a subclass
    provides: `request` (and `submit_request`, which may start the op and return a function
    that waits for its reply)."""

    def request(self, op: str, **kwargs: Any) -> object:
        """The transport: run `op` in the worker and return its reply, as it came."""
        raise NotImplementedError

    def submit_request(self, op: str, **kwargs: Any) -> Callable[[], object]:
        """The transport: start `op` and return a function that waits for its reply (here
        the op runs at once; `CaffeWorker` runs it while the caller works)."""
        reply = self.request(op, **kwargs)
        return lambda: reply

    def perform(self, request: requests.Request[_R]) -> _R:
        """Run `request` in the worker and return its reply."""
        return _expect(request, self.request(request.op, **request.kwargs()))

    def start(self, request: requests.Request[_R]) -> Callable[[], _R]:
        """Start `request` in the worker; call the result to wait for its reply."""
        pending = self.submit_request(request.op, **request.kwargs())
        return lambda: _expect(request, pending())

    def prototxt(self, head: str, **options: object) -> str:
        """``PrototxtRequest``'s op, the builder's `options` given as keywords."""
        return self.perform(requests.PrototxtRequest(head, options))

    ping = _typed(requests.PingRequest)
    describe = _typed(requests.DescribeRequest)
    layer_specs = _typed(requests.LayerSpecsRequest)
    layer_types = _typed(requests.LayerTypesRequest)
    params = _typed(requests.ParamsRequest)
    run = _typed(requests.RunRequest)
    submit_run = _submitting(requests.RunRequest)
    run_generated = _typed(requests.RunGeneratedRequest)
    submit_run_generated = _submitting(requests.RunGeneratedRequest)
    gradient_check = _typed(requests.GradientCheckRequest)
    time_raw = _typed(requests.TimeRawRequest)
    train = _typed(requests.TrainRequest)
    save = _typed(requests.SaveRequest)
    surgery = _typed(requests.SurgeryRequest)
    check_net = _typed(requests.CheckNetRequest)


if TYPE_CHECKING:  # read by mypy, never run (warn_unused_ignores: each line must be refused)

    def _call_sites_are_checked(ops: CaffeOps, x: np.ndarray) -> None:
        """The typed methods check their callers' keywords, types and use of the reply."""
        ops.run("net", {"data": x}, phse="TEST")  # type: ignore[call-arg]
        ops.submit_run("net", {"data": x}, backward="yes")  # type: ignore[arg-type]
        ops.describe(prototxt=3)  # type: ignore[arg-type]
        _: GeneratedRun = ops.run("net", {"data": x})  # type: ignore[assignment]


def _expect(request: requests.Request[_R], reply: object) -> _R:
    """`reply`, when it is of `request`'s reply type; otherwise CaffeError saying what came."""
    if not requests.conforms(reply, request.reply):
        raise CaffeError(
            f"the Caffe worker replied a {type(reply).__name__} to {request.op}, "
            f"not {requests.described(request.reply)}"
        )
    return cast(_R, reply)


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
        self._proc: warmstart.Forked | None = None
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

    def _start(self) -> warmstart.Forked:
        self._dir = private_dir()
        self._log = open(os.path.join(self._dir, "caffe.log"), "w+b")
        env = self.install.env()
        pkg_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = env["PYTHONPATH"] + ":" + pkg_root
        env["OMP_NUM_THREADS"] = env.get("CROSSVAL_CAFFE_THREADS", "1")
        env["OPENBLAS_NUM_THREADS"] = env.get("CROSSVAL_CAFFE_THREADS", "1")
        env["TMPDIR"] = self._dir
        # forked from a warm process that has imported pycaffe in the environment the
        # imports depend on (the build's path and thread counts: crossval.warmstart)
        # (the caller's own PYTHONPATH entries, a test's modules say, reach the worker through
        # its environment: one warm process serves every caller of this build)
        warm_env = {k: v for k, v in env.items() if k not in ("TMPDIR", "CROSSVAL_WORKER_PARENT")}
        warm_env["PYTHONPATH"] = f"{self.install.python_path}:{pkg_root}"
        child_in, requests_end = os.pipe()
        replies_end, child_out = os.pipe()
        try:
            proc = warmstart.fork(
                "crossval.caffe_side.server:forked_main",
                [],
                (),
                env,
                streams=(child_in, child_out, self._log.fileno()),
                preload=SERVER_PRELOAD,
                warm_env=warm_env,
            )
        except BaseException:
            for fd in (requests_end, replies_end):
                os.close(fd)
            raise
        finally:
            for fd in (child_in, child_out):
                os.close(fd)
        proc.stdin = os.fdopen(requests_end, "wb", buffering=0)
        proc.stdout = os.fdopen(replies_end, "rb", buffering=0)
        assert proc.stdin is not None
        os.set_blocking(proc.stdin.fileno(), False)
        assert proc.stdout is not None
        for pipe in (proc.stdin, proc.stdout):
            # Larger pipes: a batch of cases (megabytes each way) passes in fewer wakeups.
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self._proc = proc
        self._finalizer = weakref.finalize(self, _reap, proc, self._log, self._dir, os.getpid())
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
        # a file named relative to the caller's directory, which a long-lived worker may
        # not share (it keeps the directory it was started in)
        kwargs = {
            k: os.path.abspath(v) if k in PATH_FIELDS and isinstance(v, str) and v else v
            for k, v in kwargs.items()
        }
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
        proc: warmstart.Forked,
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

    def _timed_out(self, proc: warmstart.Forked, op: str, limit: float) -> NoReturn:
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
        proc.kill_group()
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
        request = requests.RunManyRequest(
            prototxt, inputs, {k: list(v) for k, v in params.items()}, surgery
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
        request = requests.RunManyRequest(
            prototxt,
            dict(zip(names, descs[: len(names)], strict=True)),
            sent,
            surgery,
            shared=(shared_path(fd), end),
        )
    pending = worker.start(request)

    def wait() -> ManyRuns:
        got = pending()
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
