"""Each conformance case in a process of its own, forked from crossval.

The child (a fork: torch and crossval are already loaded, so a case starts in milliseconds,
and whatever state the converter leaves behind dies with it) leads a session of its own,
dies with crossval (``PR_SET_PDEATHSIG``), has its stdout and stderr on a pipe that crossval
drains (a converter printing megabytes only costs the reading), imports the converter,
converts the case's net and runs the case's examples through validate-port's engine. It
has no Caffe of its own: its Caffe calls go to crossval's worker over a pipe, so a case
killed at any moment leaves Caffe untouched. Before each call into the converter's code
(its import, ``convert``, the module's forward and backward) it tells crossval which; the
case's time limit counts only that time. A child that dies (a signal, ``os._exit``) or
overruns the limit is killed with its process group, and the case is reported as a crash or
a timeout naming the call.
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from ..caffe_side.wire import Expired, die_with_parent, recv_frame, write_frame
from ..compare import exact
from ..errors import CrossvalError, UsageError
from ..portcheck.engine import ExampleVerdict, PortChecker
from ..portcheck.port import PortFailure, PortGuard, importable_from_cwd, squeeze
from ..transfer import state_dict_key
from ..worker import CaffeCrash, CaffeError, CaffeWorker
from . import MAPPING_ATTR, Unsupported, reference
from .cases import Case

VERDICTS = ("pass", "fail", "crash", "unsupported", "timeout", "error")
TAIL = 2000  # bytes of the child's output kept for the report


@dataclass
class Outcome:
    """One case's verdict; `detail` is one line (the first failing comparison, localised,
    or the exception), `layer` the layer it names."""

    verdict: str
    detail: str = ""
    layer: str = ""
    examples: int = 0
    comparisons: int = 0
    worst: float = 0.0
    seconds: float = 0.0
    converter_seconds: float = 0.0
    output_bytes: int = 0
    notes: list[str] = field(default_factory=list)


class ConverterUsage(CrossvalError):
    """The converter named by --converter cannot be imported or is not callable (exit 2)."""


def one_line(text: str, limit: int = 400) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# ---- the child ---------------------------------------------------------------------------


class _Relay(CaffeWorker):
    """The child's Caffe: each request is sent to crossval's worker and its reply awaited
    (the typed operations of ``CaffeOps`` run on this transport; the reply crosses both
    pipes as the worker built it)."""

    def __init__(self, send: Callable[[Any], None], recv: Callable[[], Any]) -> None:
        self._send, self._recv = send, recv
        self.timeout = None
        self.restarts = 0

    def request(self, op: str, **kwargs: Any) -> object:
        self._send(("caffe", op, kwargs))
        reply = self._recv()
        if reply[0] == "ok":
            return reply[1]
        kind, message, code = reply[1:]
        failed: CrossvalError = CaffeError(message) if kind == "error" else CrossvalError(message)
        failed.exit_code = code
        raise failed

    def submit_request(self, op: str, **kwargs: Any) -> Callable[[], object]:
        result = self.request(op, **kwargs)
        return lambda: result

    def close(self) -> None:
        pass


class _Telling(PortGuard):
    """Tells crossval about each call into the converter's code."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        super().__init__()
        self.send = send

    @contextlib.contextmanager
    def call(self, what: str) -> Iterator[None]:
        self.send(("port", self.where(what)))
        try:
            with super().call(what):
                yield
        finally:
            self.send(("done",))


def load_converter(spec: str) -> Callable[..., Any]:
    """Import `MODULE:CALLABLE` from the current directory or the import path."""
    if ":" not in spec:
        raise ConverterUsage(f"--converter {spec!r}: expected MODULE:CALLABLE, e.g. myconv:convert")
    mod_name, _, attr = spec.partition(":")
    with importable_from_cwd():
        try:
            module = importlib.import_module(mod_name)
        except ImportError as exc:
            raise ConverterUsage(
                f"--converter {spec!r}: cannot import {mod_name!r}: {exc}"
            ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConverterUsage(f"--converter {spec!r}: {mod_name} has no callable {attr!r}")
    return fn  # type: ignore[no-any-return]


def _mapping(module: nn.Module) -> dict[str, str]:
    given = getattr(module, MAPPING_ATTR, None)
    if callable(given):
        given = given()
    if given is None:
        return {}
    if not isinstance(given, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in given.items()
    ):
        raise PortFailure(
            f"the module's {MAPPING_ATTR} is {type(given).__name__}, not a dict "
            '{"layer/index": "state_dict key"}'
        )
    return dict(given)


def _loaded(module: nn.Module, mapping: Mapping[str, str], case: Case) -> str:
    """'' when every caffemodel param the module holds (under its key) is the caffemodel's
    value bit for bit; otherwise the first difference, one line. A missing key is left to
    the engine's binding (which names it)."""
    tensors = module.state_dict(keep_vars=True)
    for layer, blobs in case.weights.items():
        for i, want in enumerate(blobs):
            try:
                key = state_dict_key(layer, i, mapping)
            except CrossvalError:
                continue
            if key not in tensors:
                continue
            got = tensors[key].detach().cpu().to(torch.float32).numpy()
            if squeeze(got.shape) != squeeze(want.shape):
                continue  # the engine reports the shape
            cmp = exact(
                "loaded~caffemodel", f"{key} vs Caffe {layer}/{i}", got.reshape(want.shape), want
            )
            if not cmp.passed:
                return (
                    f"the converted module does not hold the caffemodel's {layer}/{i}: "
                    + one_line(str(cmp), 300)
                )
    return ""


def _judge(checker: PortChecker, case: Case, outcome: Outcome) -> None:
    """The case's examples through the engine, until the first that fails."""
    worst = 0.0
    for ex, arrays in case.examples:
        verdict: ExampleVerdict = checker.run(ex, arrays)
        outcome.examples += 1
        outcome.comparisons += len(verdict.comparisons)
        worst = max([worst, *(c.ratio for c in verdict.comparisons)])
        fault = checker.fault(verdict)
        if fault is not None:
            outcome.verdict = "crash" if fault.kind == "exception" else "fail"
            outcome.layer = fault.layer
            outcome.detail = one_line(f"{fault.kind} at {fault.layer}: {fault.text}")
            return
        if verdict.caffe_findings:
            f = verdict.caffe_findings[0]
            outcome.verdict = "error"
            outcome.layer = f.layer
            outcome.detail = one_line(f"Caffe disagrees with the reference at {f.layer}: {f.text}")
            return
        if not verdict.comparisons:
            outcome.verdict = "fail"
            outcome.detail = "nothing compared: the module returned none of the net's blobs"
            return
    outcome.verdict = "pass"
    outcome.worst = worst


def _child_case(
    case: Case,
    spec: str,
    net: Path,
    weights: Path,
    send: Callable[[Any], None],
    recv: Callable[[], Any],
) -> Outcome:
    relay = _Relay(send, recv)
    reference.use_worker(relay)
    guard = _Telling(send)
    out = Outcome("pass")
    try:
        with guard.call("its import"):
            convert = load_converter(spec)
    except ConverterUsage as exc:
        return Outcome("usage", str(exc))
    except PortFailure as exc:
        return Outcome("crash", one_line(str(exc)))
    send(("port", "its convert()"))
    try:
        module = convert(str(net), str(weights))
    except (Unsupported, NotImplementedError) as exc:
        return Outcome("unsupported", one_line(f"{type(exc).__name__}: {exc}"))
    except Exception as exc:
        return Outcome("crash", one_line(f"convert() raised {type(exc).__name__}: {exc}"))
    finally:
        send(("done",))
    if not isinstance(module, nn.Module):
        return Outcome(
            "crash", f"convert() returned {type(module).__name__}, not a torch.nn.Module"
        )
    try:
        mapping = _mapping(module)
        loaded = _loaded(module, mapping, case)
        if loaded:
            return Outcome("fail", loaded, "caffemodel")
        checker = PortChecker(
            relay, case.prototxt, module, mapping, str(weights), case.generate, guard=guard
        )
        _judge(checker, case, out)
    except PortFailure as exc:
        out.verdict, out.detail = "crash", one_line(str(exc))
    except UsageError as exc:
        # the module's params do not map onto Caffe's: a finding about the converter
        out.verdict, out.detail = "fail", one_line(str(exc))
    except CrossvalError as exc:
        out.verdict, out.detail = "error", one_line(str(exc))
    return out


def _child(
    case: Case, spec: str, net: Path, weights: Path, fds: tuple[int, int, int], parent: int
) -> int:
    frames_w, replies_r, output_w = fds
    die_with_parent(parent)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(output_w, 1)
    os.dup2(output_w, 2)
    # Python-level output too (the caller's sys.stdout may be a capture, not fd 1), and a
    # fatal error's traceback (faulthandler may hold another descriptor)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    faulthandler.enable(file=sys.stderr)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    torch.set_num_threads(1)  # forked after the parent's OpenMP pool: one thread only
    frames: IO[bytes] = os.fdopen(frames_w, "wb")

    def send(obj: Any) -> None:
        write_frame(frames, obj)

    def recv() -> Any:
        return recv_frame(replies_r, None)

    try:
        outcome = _child_case(case, spec, net, weights, send, recv)
        send(("result", outcome))
    except BaseException:
        send(("internal", traceback.format_exc()))
    frames.close()
    return 0


# ---- the parent --------------------------------------------------------------------------


def run_case(
    worker: CaffeWorker, case: Case, spec: str, net: Path, weights: Path, timeout: float
) -> Outcome:
    """Run `case` in a forked child; `timeout` seconds of the converter's code at most."""
    start = time.monotonic()
    frames_r, frames_w = os.pipe()
    replies_r, replies_w = os.pipe()
    output_r, output_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 70
        try:
            os.setsid()
            for fd in (frames_r, replies_w, output_r):
                os.close(fd)
            code = _child(case, spec, net, weights, (frames_w, replies_r, output_w), parent)
        finally:
            os._exit(code)
    for fd in (frames_w, replies_r, output_w):
        os.close(fd)
    try:
        outcome = _supervise(worker, pid, frames_r, replies_w, output_r, timeout)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # the child and whatever the converter started
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        for fd in (frames_r, replies_w, output_r):
            with contextlib.suppress(OSError):
                os.close(fd)
    outcome.seconds = time.monotonic() - start
    return outcome


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGKILL:
            name += ", killed from outside; out of memory?"
        return f"crashed ({name})"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _supervise(
    worker: CaffeWorker, pid: int, frames: int, replies: int, output: int, timeout: float
) -> Outcome:
    running: tuple[str, float] | None = None  # the converter call running, since when
    used = 0.0  # seconds in the converter's code so far
    tail = b""
    printed = 0
    output_open = True
    reply_stream = os.fdopen(replies, "wb", closefd=False)

    def finish(out: Outcome) -> Outcome:
        out.converter_seconds = used
        out.output_bytes = printed
        if printed and out.verdict in ("crash", "timeout"):
            text = tail.decode(errors="replace").strip().splitlines()
            if text:
                out.notes.append(f"its last output line: {one_line(text[-1], 200)}")
        return out

    while True:
        deadline = None if running is None else running[1] + (timeout - used)
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        watch = [frames] + ([output] if output_open else [])
        ready, _, _ = select.select(watch, [], [], wait)
        if output in ready:
            chunk = os.read(output, 1 << 16)
            if chunk:
                printed += len(chunk)
                tail = (tail + chunk)[-TAIL:]
            else:
                output_open = False
        if frames not in ready:
            if deadline is not None and time.monotonic() >= deadline:
                assert running is not None
                used = timeout
                return finish(
                    Outcome(
                        "timeout",
                        f"the converter's code ran over the case's limit of {timeout:g} s "
                        f"in {running[0]}",
                    )
                )
            continue
        try:
            frame = recv_frame(frames, time.monotonic() + 60)
        except (EOFError, OSError, Expired):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 0)
            try:
                _, status = os.waitpid(pid, 0)
                how = _how(status)
            except ChildProcessError:
                how = "ended"
            where = running[0] if running is not None else "crossval's checks of the case"
            if running is not None:
                used += time.monotonic() - running[1]
            return finish(Outcome("crash", f"the case's process {how} in {where}"))
        kind = frame[0]
        if kind == "port":
            running = (frame[1], time.monotonic())
        elif kind == "done":
            if running is not None:
                used += time.monotonic() - running[1]
            running = None
        elif kind == "caffe":
            _serve(worker, reply_stream, frame[1], frame[2])
        elif kind == "result":
            result: Outcome = frame[1]
            if result.verdict == "usage":
                raise ConverterUsage(result.detail)
            return finish(result)
        else:  # "internal": crossval's own code failed on the case (a bug of crossval)
            last = (frame[1].strip().splitlines() or [""])[-1]
            out = Outcome("error", one_line(f"crossval failed on this case: {last}"))
            out.notes.append(frame[1])
            return finish(out)


def _serve(worker: CaffeWorker, replies: IO[bytes], op: str, kwargs: dict[str, Any]) -> None:
    """One Caffe call for the child; a child gone meanwhile is seen at its next frame."""
    try:
        reply: tuple[object, ...] = ("ok", worker.request(op, **kwargs))
    except CaffeError as exc:
        reply = ("raise", "error", str(exc), exc.exit_code)
    except CaffeCrash as exc:
        reply = ("raise", "crash", str(exc), exc.exit_code)
    with contextlib.suppress(OSError):
        write_frame(replies, reply)


def probe(spec: str) -> None:
    """Import the converter in a throwaway child: ConverterUsage when it cannot be
    imported or is not callable (its import crashing is left to the cases)."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.setsid()
            os.close(r)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            message = ""
            try:
                load_converter(spec)
            except ConverterUsage as exc:
                message = str(exc)
            except BaseException:
                message = ""
            os.write(w, message.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([r], [], [], 120)
            if not ready:
                break
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    message = b"".join(chunks).decode(errors="replace")
    if message:
        raise ConverterUsage(message)


__all__ = [
    "VERDICTS",
    "ConverterUsage",
    "Outcome",
    "load_converter",
    "one_line",
    "probe",
    "run_case",
]
