"""A warm process that forks `crossval validate-port`'s isolated children.

A validation child imports PyTorch and the engine (about 2.5 s) before it can run a port. A
process that runs many validations (a test session, a campaign, a long CLI run) pays that
once: the first validation starts a *warm* process, ``python -m crossval.warmstart FD PID``,
which imports those modules and then, on each request, forks a child that is ready at once.

The forked child is made to look like a fresh ``python -m`` process of the caller: its own
session (so its process group can be killed), the caller's current environment, working
directory, standard streams (received as file descriptors, so output capture follows the
caller), and ``sys.path`` led by the working directory and ``$PYTHONPATH``. Its entry point
is called with its arguments, followed by the numbers (in the child) of the descriptors handed
to it; what it raises becomes its exit status, as in a script.

The warm process dies with its caller (parent-death signal), and each child with the warm
process, so no process outlives the caller; the warm process reaps its children and reports
each exit status, which `Forked` (the caller's handle, with the subset of ``Popen`` the
supervisor uses) returns as ``Popen`` would: negative for a signal.
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
from dataclasses import dataclass
from pathlib import Path

from .caffe_side.wire import die_with_parent
from .errors import CrossvalError

# imported by the warm process before it forks (what a validation child needs first)
PRELOAD = ("numpy", "torch", "crossval.portcheck.command", "crossval.worker")
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

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def kill_group(self) -> None:
        """SIGKILL the child's process group (it leads its own session) and wait for it."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            self.kill()
        self.wait()


class Warm:
    """The caller's side of one warm process."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = pkg_root  # the caller's own entries go to each child
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "crossval.warmstart",
                    str(theirs.fileno()),
                    str(os.getpid()),
                ],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            theirs.close()
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
                "crossval's warm process for validation children did not start "
                f"(exit status {self.proc.poll()}); this is a fault of crossval"
            )
        self._ready = True
        self._reader = threading.Thread(target=self._read, name="crossval-warmstart", daemon=True)
        self._reader.start()

    def alive(self) -> bool:
        return not self._closed and self.proc.poll() is None

    def fork(self, request: Request, fds: tuple[int, ...]) -> Forked:
        """Fork a child running `request`, handing it `fds` (duplicated in the child: the
        standard streams 0, 1, 2 first, then the child's own, closed in the warm process)."""
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
        with self._changed:
            return self._exits.get(pid)

    def wait(self, pid: int, timeout: float | None) -> int | None:
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
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


_WARM: Warm | None = None
_WARM_LOCK = threading.Lock()


def warm() -> Warm:
    """This process's warm process, started (in the background) on first use."""
    global _WARM
    with _WARM_LOCK:
        if _WARM is None or not _WARM.alive():
            if _WARM is None:
                atexit.register(_close)
            _WARM = Warm()
        return _WARM


def fork(entry: str, args: list[str], fds: tuple[int, ...], env: dict[str, str]) -> Forked:
    """Run ``entry(args + numbers)`` ("module:function") in a child forked from this process's
    warm process, with environment `env`, this process's working directory and standard
    streams, and the descriptors `fds` open in the child (`numbers`: theirs there, as
    strings)."""
    cwd = os.getcwd()
    path = (cwd, *filter(None, env.get("PYTHONPATH", "").split(":")))
    return warm().fork(Request(entry, tuple(args), env, cwd, path), (0, 1, 2, *fds))


def _close() -> None:
    global _WARM
    with _WARM_LOCK:
        if _WARM is not None:
            _WARM.close()
            _WARM = None


# ---- the warm process ------------------------------------------------------------------


def _serve(sock: socket.socket) -> None:
    children: set[int] = set()
    while True:
        ready, _, _ = select.select([sock], [], [], 0.02 if children else None)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                sock.send(pickle.dumps(("exit", pid, os.waitstatus_to_exitcode(status))))
        if not ready:
            continue
        data, fds, _, _ = socket.recv_fds(sock, MESSAGE_BYTES, 16)
        if not data:
            return  # the caller closed its end: its children die with this process
        request: Request = pickle.loads(data)
        pid = os.fork()
        if pid == 0:
            sock.close()
            _child(request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        children.add(pid)
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


_BASE_PATH: list[str] = []


def main(argv: list[str]) -> None:
    fd, parent = int(argv[0]), int(argv[1])
    _BASE_PATH[:] = sys.path[1:]  # sys.path[0] is the directory it was started in
    die_with_parent(parent)
    sock = socket.socket(fileno=fd)
    for name in PRELOAD:
        importlib.import_module(name)
    sock.send(pickle.dumps(("ready", os.getpid())))
    _serve(sock)


if __name__ == "__main__":
    main(sys.argv[1:])
