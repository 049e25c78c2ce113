"""`crossval validate-port` with the port where it cannot take crossval down.

The parent (the CLI) runs a child in a session of its own, forked from its warm process
(``crossval.warmstart``: PyTorch already imported), with a private directory DIR (the job in,
the example being run out) and the write end FD of a pipe. That child runs
``portcheck.command.validate``: the user's port (import, factory, forward, backward) and its
own Caffe worker. Before each call into the port's code it tells the parent, over the pipe FD, which
call and which example (whose arrays it first writes to DIR/example.npz), and after it that
the call returned; at the end it sends the Report or the error.

The parent waits on the pipe, with the port call's time limit while one runs. When the child
dies by a signal, exits without sending its result, or overruns the limit, the parent kills
its process group (the Caffe worker dies with it: parent-death signal), reports the port's
failure with the example as a finding, saves that example for --replay, and removes DIR.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from . import errors, warmstart
from .caffe_side.wire import Expired, recv_frame, write_frame
from .errors import CrossvalError
from .worker import default_limit, private_dir

if TYPE_CHECKING:
    from .portcheck.command import Report
    from .portcheck.engine import PortExample

PREFIX = "crossval-port-"
EXAMPLE_FILE = "example.npz"


@dataclass
class Job:
    """What the child runs: `command.validate(worker, net, port, **options)`, the worker
    with `timeout`, each port call limited to `timeout` (default: `default_limit`)."""

    net: Path
    port: str
    options: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None


@dataclass
class _PortCall:
    where: str
    index: int
    example: PortExample | None
    limit: float


def _how(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        if -rc == signal.SIGKILL:  # not sent by crossval: the OOM killer's signal
            name += ", killed from outside; out of memory?"
        return f"crashed ({name})"
    return f"exited with status {rc}"


def validate_isolated(
    net: Path, port: str, *, timeout: float | None = None, **options: Any
) -> Report:
    """`command.validate` on `net` and `port` in a child process (options as there, the
    worker made in the child with `timeout`). A port that crashes, exits or hangs gives a
    Report with verdict "crash"; the child's CrossvalErrors are raised here as they were."""
    directory = private_dir(PREFIX)
    read_end, write_end = os.pipe()
    proc: warmstart.Forked | None = None
    finished = False
    previous = signal.getsignal(signal.SIGTERM)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    try:
        if main_thread:  # SIGTERM cleans up as Ctrl-C does
            signal.signal(signal.SIGTERM, interrupt)
        with open(os.path.join(directory, "job.pkl"), "wb") as f:
            pickle.dump(Job(net, port, options, timeout), f)
        env = dict(os.environ)
        env["TMPDIR"] = directory  # the child's Caffe worker makes its directory in here
        warmstart.warm()  # its imports (torch) while this process makes its own
        from .portcheck import command  # noqa: F401

        proc = warmstart.fork("crossval.isolation:forked_main", [directory], (write_end,), env)
        os.close(write_end)
        write_end = -1
        report = _supervise(proc, read_end, directory, net, port, options)
        finished = True
        return report
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5 if finished else 0)  # after its result, let it exit
            proc.kill_group()
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(directory, ignore_errors=True)


def _supervise(
    proc: warmstart.Forked,
    fd: int,
    directory: str,
    net: Path,
    port: str,
    options: dict[str, Any],
) -> Report:
    running: _PortCall | None = None
    last = 0
    while True:
        deadline = time.monotonic() + running.limit if running is not None else None
        try:
            frame = recv_frame(fd, deadline)
        except Expired:
            assert running is not None
            proc.kill_group()
            return _crashed(
                f"the port did not return within {running.limit:.0f} s in {running.where}",
                running,
                directory,
                net,
                port,
                options,
            )
        except (EOFError, pickle.UnpicklingError):
            try:
                how = _how(proc.wait(timeout=30))
            except subprocess.TimeoutExpired:  # alive, but it closed its end of the pipe
                proc.kill_group()
                how = "closed crossval's pipe"
            if running is not None:
                return _crashed(
                    f"the port {how} in {running.where}", running, directory, net, port, options
                )
            failed = CrossvalError(
                f"the validation process {how} outside the port's code"
                + (f" (after example {last})" if last else "")
                + "; this is a fault of crossval, not of the port"
            )
            failed.exit_code = getattr(errors, "EXIT_INTERNAL", 3)
            raise failed from None
        kind = frame[0]
        if kind == "port":
            running = _PortCall(*frame[1:])
            last = running.index
        elif kind == "done":
            running = None
        elif kind == "result":
            result: Report = frame[1]
            return result
        elif kind == "error":
            failed = CrossvalError(frame[1])
            failed.exit_code = frame[2]
            raise failed
        else:  # "internal": an unexpected exception in the child, with its traceback
            raise RuntimeError("the validation process failed:\n" + frame[1])


def _crashed(
    message: str,
    call: _PortCall,
    directory: str,
    net: Path,
    port: str,
    options: dict[str, Any],
) -> Report:
    import numpy as np

    from .portcheck.command import Report, save

    report = Report(str(net), port, verdict="crash", crash=message, examples_run=call.index)
    saved = Path(directory) / EXAMPLE_FILE
    replay = options.get("replay")
    save_to = options.get("save_failure")
    if call.index == 0:
        return report
    if not saved.is_file():
        report.crash += " (that example could not be kept: no space in $TMPDIR?)"
        return report
    if save_to is not None:
        with np.load(saved) as data:
            inputs = {k[len("input/") :]: data[k] for k in data.files if k.startswith("input/")}
            params: dict[str, list[np.ndarray]] = {}
            for k in sorted(data.files):
                if k.startswith("param/"):
                    layer, i = k[len("param/") :].rsplit("/", 1)
                    params.setdefault(layer, []).insert(int(i), data[k])
        seed = call.example.seed if call.example is not None else options.get("seed", 0)
        report.saved, report.replay = save(
            (inputs, params), seed, save_to, options.get("argv") or []
        )
    elif replay is not None:
        report.saved = str(replay)
        report.replay = "crossval " + " ".join(options.get("argv") or [])
    return report


# ---- the child -------------------------------------------------------------------------


def _child(directory: str, fd: int) -> None:
    import numpy as np

    from .portcheck.command import validate
    from .portcheck.port import PortGuard
    from .worker import CaffeWorker

    pipe: IO[bytes] = os.fdopen(fd, "wb")
    with open(os.path.join(directory, "job.pkl"), "rb") as f:
        job: Job = pickle.load(f)
    net_chars = len(job.net.read_bytes()) if job.net.is_file() else 0

    class Reporting(PortGuard):
        """Tells the parent about every port call, and keeps the example being run."""

        def __init__(self) -> None:
            super().__init__()
            self.example: PortExample | None = None
            self.limit = job.timeout or default_limit("port", {"prototxt": "x" * net_chars})
            self.writing: threading.Thread | None = None

        def begin_example(
            self,
            index: int,
            desc: str,
            ex: PortExample | None,
            inputs: dict[str, np.ndarray],
            params: dict[str, list[np.ndarray]],
        ) -> None:
            super().begin_example(index, desc, ex, inputs, params)
            self.example = ex
            arrays: dict[str, Any] = {f"input/{k}": v for k, v in inputs.items()}
            for layer, blobs in params.items():
                for i, v in enumerate(blobs):
                    arrays[f"param/{layer}/{i}"] = v

            final = os.path.join(directory, EXAMPLE_FILE)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(final)  # never the previous example's by mistake

            def write() -> None:
                tmp = os.path.join(directory, "example.partial.npz")
                try:
                    np.savez(tmp, **arrays)
                    os.replace(tmp, final)
                except Exception:  # a full disk: the crash report says it has no example
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)

            # Written while Caffe runs the example (550 MB for a full-size VGG-16 takes
            # seconds); complete before any of the port's code runs on it.
            self.writing = threading.Thread(target=write)
            self.writing.start()
            if job.timeout is None:
                size = {"prototxt": "x" * net_chars, "inputs": inputs, "params": params}
                self.limit = default_limit("port", size)

        @contextlib.contextmanager
        def call(self, what: str) -> Iterator[None]:
            if self.writing is not None:
                self.writing.join()
                self.writing = None
            write_frame(pipe, ("port", self.where(what), self.index, self.example, self.limit))
            try:
                with super().call(what):
                    yield
            finally:
                write_frame(pipe, ("done",))

    try:
        with CaffeWorker(timeout=job.timeout) as worker:
            report = validate(worker, job.net, job.port, guard=Reporting(), **job.options)
        write_frame(pipe, ("result", report))
    except CrossvalError as exc:
        write_frame(pipe, ("error", str(exc), exc.exit_code))
    except BaseException:
        write_frame(pipe, ("internal", traceback.format_exc()))
    pipe.close()


def forked_main(argv: list[str]) -> None:
    """The child's entry (forked by ``crossval.warmstart``): `argv` is its directory and the
    number of its end of the pipe."""
    # Should the port exhaust memory, the kernel's OOM killer takes this process first.
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    _child(argv[0], int(argv[1]))
