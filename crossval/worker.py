"""Caffe in a long-lived child process.

pycaffe runs in a separate interpreter, so a Caffe CHECK failure, abort or segfault cannot
take the caller down: it becomes a ``CaffeCrash`` carrying Caffe's own log line, and the next
request starts a fresh worker. Requests and replies are pickled over the child's stdin and a
private copy of its stdout; Caffe's log (stderr) goes to a file read only after a crash.
"""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from . import provision
from .errors import CrossvalError

_HEADER = struct.Struct("<Q")


class CaffeCrash(CrossvalError):
    """The Caffe worker died while serving a request; the message carries Caffe's log line."""

    def __init__(self, op: str, how: str, log_lines: list[str]) -> None:
        self.op = op
        self.how = how
        self.log_lines = log_lines
        fatal = [ln for ln in log_lines if ln[:1] == "F" or "Check failed" in ln]
        shown = fatal[-1] if fatal else (log_lines[-1] if log_lines else "(no log output)")
        super().__init__(f"Caffe {how} during {op}: {shown}")


class CaffeError(CrossvalError):
    """A request failed inside the worker with a Python exception (the worker lives on)."""


def write_frame(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> Any:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


class CaffeWorker:
    """A client for one pycaffe worker process; restarts it after a crash."""

    def __init__(self, install: provision.CaffeInstall | None = None) -> None:
        self.install = install or provision.locate()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.restarts = 0

    def _start(self) -> subprocess.Popen[bytes]:
        self._log = tempfile.NamedTemporaryFile(prefix="crossval-caffe-", suffix=".log")
        env = self.install.env()
        pkg_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = env["PYTHONPATH"] + ":" + pkg_root
        env["OMP_NUM_THREADS"] = env.get("CROSSVAL_CAFFE_THREADS", "1")
        env["OPENBLAS_NUM_THREADS"] = env.get("CROSSVAL_CAFFE_THREADS", "1")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "crossval.caffe_side.server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        return self._proc

    def _log_lines(self) -> list[str]:
        if self._log is None:
            return []
        self._log.flush()
        with open(self._log.name, "rb") as f:
            text = f.read().decode(errors="replace")
        return [ln for ln in text.splitlines() if ln.strip()]

    def call(self, op: str, **kwargs: Any) -> Any:
        """Run `op` in the worker and return its result."""
        return self.submit(op, **kwargs)()

    def submit(self, op: str, **kwargs: Any) -> Callable[[], Any]:
        """Send `op` to the worker and return a function that waits for its result, so the
        caller can work meanwhile (the worker runs on the other core). One request at a time:
        collect the result before the next submit."""
        proc = self._proc if self._proc and self._proc.poll() is None else self._start()
        try:
            assert proc.stdin is not None
            write_frame(proc.stdin, (op, kwargs))
        except (BrokenPipeError, OSError):
            return lambda: self._collect(proc, op, failed=True)
        return lambda: self._collect(proc, op)

    def _collect(self, proc: subprocess.Popen[bytes], op: str, failed: bool = False) -> Any:
        assert proc.stdout is not None
        try:
            if failed:
                raise EOFError
            status, payload = read_frame(proc.stdout)
        except (EOFError, BrokenPipeError, OSError):
            rc = proc.wait()
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            lines = self._log_lines()
            self._proc = None
            self.restarts += 1
            raise CaffeCrash(op, how, lines[-20:]) from None
        if status == "ok":
            return payload
        raise CaffeError(f"{op} failed in the Caffe worker: {payload}")

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> CaffeWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


_shared: CaffeWorker | None = None


def shared_worker() -> CaffeWorker:
    """One worker per process, started on first use."""
    global _shared
    if _shared is None:
        _shared = CaffeWorker()
    return _shared


__all__ = ["CaffeCrash", "CaffeError", "CaffeWorker", "shared_worker"]
