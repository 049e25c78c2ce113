"""Warm processes that fork crossval's child processes with their imports already done.

A validate-port child imports PyTorch and the engine (about 2.5 s), a Caffe worker imports
pycaffe (about 0.6 s), before either can work. A process that starts many of them (a test
session, the pytest plugin, a script calling ``crossval.cli.main``) pays that once: the first
start launches a *warm* process, ``python -m crossval.warmstart FD MODULE...``, which imports
the modules and then, on each request, forks a child that is ready at once. Each set of
modules and environment variables the imports depend on (``KEY_VARIABLES``: a Caffe build's
library path, say) has a warm process of its own.

The forked child is made to look like a fresh ``python -m`` process of the caller: its own
session (so its process group can be killed), the caller's environment and working directory,
standard streams the caller hands over as file descriptors (by default its own, so output
capture follows the caller), and ``sys.path`` led by the working directory and
``$PYTHONPATH``. Its entry point is called with its arguments, followed by the numbers (in the
child) of the other descriptors handed to it; what it raises becomes its exit status, as in
a script.

A warm process ends when its caller's end of their socket closes (the caller exited or was
killed), and each child dies with the warm process (parent-death signal), so nothing outlives
the caller. The warm process reaps its children and reports each exit status, which `Forked`
(the caller's handle, with the subset of ``Popen`` crossval uses) returns as ``Popen`` would:
negative for a signal.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .caffe_side.wire import die_with_parent
from .errors import CrossvalError

# the environment variables a warm process's imports depend on (a warm process each)
KEY_VARIABLES = ("PYTHONPATH", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
MESSAGE_BYTES = 1 << 20
READY_TIMEOUT = 120.0


@dataclass(frozen=True)
class Request:
    """A child to fork: `entry` ("module:function") called with `args`, in the caller's
    environment `env`, directory `cwd` and leading `path` entries."""

    entry: str
    args: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    path: tuple[str, ...]


class Forked:
    """A child forked by the warm process: `pid`, `poll`, `wait` and `kill` as ``Popen``'s."""

    def __init__(self, pid: int, warm: Warm) -> None:
        self.pid = pid
        self._warm = warm
        # the caller's ends of the child's standard streams, when it made them pipes
        self.stdin: IO[bytes] | None = None
        self.stdout: IO[bytes] | None = None

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        return self._warm.status(self.pid)

    def wait(self, timeout: float | None = None) -> int:
        code = self._warm.wait(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def kill_group(self) -> None:
        """SIGKILL the child's process group (it leads its own session: whatever the child
        started goes too) and wait for it."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            self.kill()
        self.wait()


class Warm:
    """The caller's side of one warm process."""

    def __init__(self, preload: tuple[str, ...], env: Mapping[str, str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), *preload],
                pass_fds=(theirs.fileno(),),
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # what its imports print; each child has its own
                start_new_session=True,
            )
        finally:
            theirs.close()
        self.owner = os.getpid()  # a fork of the caller does not share it
        self.preload = preload
        self.sock = ours
        self._lock = threading.Lock()  # one request at a time
        self._changed = threading.Condition()
        self._started: list[int] = []
        self._exits: dict[int, int] = {}
        self._closed = False
        self._ready = False
        self._reader: threading.Thread | None = None

    def _await_ready(self) -> None:
        """Wait for the warm process's imports (started in the background by `__init__`)."""
        if self._ready:
            return
        ready, _, _ = select.select([self.sock], [], [], READY_TIMEOUT)
        first = self.sock.recv(MESSAGE_BYTES) if ready else b""
        if not first or pickle.loads(first)[0] != "ready":
            self.close()
            raise CrossvalError(
                f"crossval's warm process ({', '.join(self.preload)}) did not start "
                f"(exit status {self.proc.poll()}); this is a fault of crossval"
            )
        self._ready = True
        self._reader = threading.Thread(target=self._read, name="crossval-warmstart", daemon=True)
        self._reader.start()

    def alive(self) -> bool:
        return self.owner == os.getpid() and not self._closed and self.proc.poll() is None

    def fork(self, request: Request, fds: tuple[int, ...]) -> Forked:
        """Fork a child running `request`, handing it `fds` (duplicated in the child: its
        standard streams 0, 1, 2 first, then its own, closed in the warm process)."""
        with self._lock:
            self._await_ready()
            socket.send_fds(self.sock, [pickle.dumps(request)], list(fds))
            with self._changed:
                if not self._changed.wait_for(lambda: self._started or self._closed, 30.0):
                    raise CrossvalError("crossval's warm process did not fork a child")
                if not self._started:
                    raise CrossvalError("crossval's warm process ended")
                return Forked(self._started.pop(0), self)

    def status(self, pid: int) -> int | None:
        if self.owner != os.getpid():  # a fork of the caller: not its child to ask about
            return None
        with self._changed:
            return self._exits.get(pid)

    def wait(self, pid: int, timeout: float | None) -> int | None:
        if self.owner != os.getpid():
            raise CrossvalError(f"process {pid} is not a child of this process's warm process")
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits or self._closed, timeout)
            if pid not in self._exits and self._closed:
                # the warm process is gone, and its children with it (parent-death signal)
                self._exits[pid] = -signal.SIGKILL
            return self._exits.get(pid)

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(MESSAGE_BYTES)
            except OSError:
                data = b""
            with self._changed:
                if not data:
                    self._closed = True
                    self._changed.notify_all()
                    return
                kind, pid, *rest = pickle.loads(data)
                if kind == "started":
                    self._started.append(pid)
                elif kind == "exit":
                    self._exits[pid] = rest[0]
                self._changed.notify_all()

    def close(self) -> None:
        """End the warm process (its running children die with it)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        try:
            # still importing: it reads its socket only when done, so it is ended now
            self.proc.wait(timeout=5 if self._ready else 0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# imported by the warm process of validate-port's children (what such a child needs first)
PORT_PRELOAD = ("numpy", "torch", "crossval.portcheck.command", "crossval.worker")

_WARMS: dict[tuple[str, ...], Warm] = {}
_WARM_LOCK = threading.Lock()


def warm(preload: tuple[str, ...] = PORT_PRELOAD, env: Mapping[str, str] | None = None) -> Warm:
    """This process's warm process importing `preload` in the environment `env` (this
    process's, with crossval's source first on PYTHONPATH, by default), started in the
    background on first use. `env` is what the imports depend on: each set of preloads and
    environment has its own."""
    if env is None:
        pkg_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": pkg_root}  # the caller's own entries go to each child
    key = (*preload, "", *sorted(f"{k}={v}" for k, v in env.items() if k in KEY_VARIABLES))
    with _WARM_LOCK:
        found = _WARMS.get(key)
        if found is None or not found.alive():
            if not _WARMS:
                atexit.register(_close)
            found = _WARMS[key] = Warm(preload, env)
        return found


def fork(
    entry: str,
    args: list[str],
    fds: tuple[int, ...],
    env: dict[str, str],
    *,
    streams: tuple[int, int, int] = (0, 1, 2),
    preload: tuple[str, ...] = PORT_PRELOAD,
    warm_env: Mapping[str, str] | None = None,
) -> Forked:
    """Run ``entry(args + numbers)`` ("module:function") in a child forked from this process's
    warm process for `preload` (and `warm_env`, see `warm`), with environment `env`, this
    process's working directory, `streams` as its standard input, output and error, and the
    descriptors `fds` open in the child (`numbers`: theirs there, as strings)."""
    cwd = os.getcwd()
    path = (cwd, *filter(None, env.get("PYTHONPATH", "").split(":")))
    request = Request(entry, tuple(args), env, cwd, path)
    return warm(preload, warm_env).fork(request, (*streams, *fds))


def _forget_in_child() -> None:
    """In a fork of the caller (a conformance case, say): the caller's warm processes are
    not this process's, and a lock a thread of the caller held at the fork stays held."""
    global _WARM_LOCK
    _WARMS.clear()
    _WARM_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def _close() -> None:
    with _WARM_LOCK:
        for found in _WARMS.values():
            if found.owner == os.getpid():
                found.close()
        _WARMS.clear()


# ---- the warm process ------------------------------------------------------------------


_BASE_PATH: list[str] = []


def _serve(sock: socket.socket) -> None:
    children: dict[int, int] = {}  # a pidfd (readable once its child has exited): the pid
    while True:
        ready, _, _ = select.select([sock.fileno(), *children], [], [])
        for fd in ready:
            if fd in children:
                pid = children.pop(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                sock.send(pickle.dumps(("exit", pid, os.waitstatus_to_exitcode(status))))
        if sock.fileno() not in ready:
            continue
        data, fds, _, _ = socket.recv_fds(sock, MESSAGE_BYTES, 16)
        if not data:
            return  # the caller closed its end: its children die with this process
        request: Request = pickle.loads(data)
        pid = os.fork()
        if pid == 0:
            sock.close()
            for fd in children:
                os.close(fd)
            _child(request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        children[os.pidfd_open(pid)] = pid
        sock.send(pickle.dumps(("started", pid)))


def _child(request: Request, fds: list[int]) -> None:
    code = 1
    try:
        os.setsid()
        die_with_parent(0)
        streams, own = fds[:3], fds[3:]
        for number, fd in enumerate(streams):
            os.dup2(fd, number)
            os.close(fd)
        for fd in own:  # the entry's own, named by its last arguments; kept across exec
            os.set_inheritable(fd, True)
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(request.env)
        tempfile.tempdir = None
        os.chdir(request.cwd)
        # as `python -m` in the caller's directory: that first, then $PYTHONPATH, then the
        # interpreter's own entries (not the warm process's directory)
        sys.path[:] = [*request.path, *(p for p in _BASE_PATH if p not in request.path)]
        importlib.invalidate_caches()
        module, function = request.entry.split(":")
        getattr(importlib.import_module(module), function)([*request.args, *map(str, own)])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def main(argv: list[str]) -> None:
    """The warm process: `argv` is its end of the socket and the modules to import. It ends
    when the caller's end closes (the caller exited or was killed), and its children with
    it (their parent-death signal)."""
    sock = socket.socket(fileno=int(argv[0]))
    _BASE_PATH[:] = sys.path[1:]  # sys.path[0] is the directory it was started in
    for name in argv[1:]:
        importlib.import_module(name)
    sock.send(pickle.dumps(("ready", os.getpid())))
    _serve(sock)


if __name__ == "__main__":
    main(sys.argv[1:])
