"""`crossval validate-port`: the examples (a hypothesis search, or one replayed example), the
verdict over them, its report, the saved failure and the JSON.

Each example goes through ``engine.PortChecker``: every layer whose bottoms and tops the port
returns is judged on the port's own bottoms by the float64 reference within that layer's
bound, layers between returned blobs as one segment, forward and backward; Caffe's blobs
likewise on Caffe's own. The fault is the first layer, in Caffe's order, that fails.
"""

from __future__ import annotations

import io
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from torch import nn

from .. import outputs
from ..errors import CrossvalError, UsageError
from ..inputs import check_net, read_prototxt, read_replay
from ..net import HEAD_APPENDERS, read_net
from ..worker import CaffeCrash, CaffeWorker, searching, stops_search
from . import plugins
from .engine import ExampleVerdict, Finding, PortChecker, PortExample
from .port import PortFailure, PortGuard, load_port

SHRINK_BELOW = 0.5  # seconds per example: a slower net reports its first failure unshrunk
Arrays = tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]


def port_examples(batch: int) -> st.SearchStrategy[PortExample]:
    """Hard regions: inputs from 1e-3 to 1e3, weights up to 10x their fan-in scale (large and
    saturating activations)."""
    return st.builds(
        PortExample,
        seed=st.integers(0, 2**32 - 1),
        input_scale=st.one_of(st.sampled_from([1.0, 1e-3, 30.0, 1e3]), st.floats(1e-3, 1e3)),
        weight_scale=st.one_of(st.sampled_from([1.0, 0.1, 3.0, 10.0]), st.floats(0.1, 10.0)),
        batch=st.just(batch),
    )


@dataclass
class Run:
    """One example's verdict, the arrays it ran on, and its first port finding."""

    verdict: ExampleVerdict
    arrays: Arrays
    fault: Finding | None

    @property
    def failed(self) -> bool:
        return self.fault is not None or bool(self.verdict.caffe_findings)


def _finding(f: Finding) -> dict[str, Any]:
    return {"layer": f.layer, "kind": f.kind, "side": f.side, "blob": f.key, "text": f.text}


@dataclass
class Report:
    """validate-port's verdict: "match", "mismatch" (a finding about the port or about Caffe
    on this net) or "crash" (the port raised, crashed, exited or hung in its own code)."""

    net: str
    port: str
    examples_run: int = 0
    verdict: str = "match"
    fault: dict[str, Any] | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)
    caffe_findings: list[dict[str, Any]] = field(default_factory=list)
    local_layers: list[str] = field(default_factory=list)
    segment_layers: list[str] = field(default_factory=list)
    not_returned: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    comparisons: int = 0
    worst: list[dict[str, Any]] = field(default_factory=list)
    saved: str = ""
    replay: str = ""
    shrink_runs: int = 0
    crash: str = ""

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == "match" else 1

    def _kept(self) -> list[str]:
        if self.saved:
            saved = f"the failing example is saved to {self.saved}; replay with:"
            return [saved, f"  {self.replay}"]
        if self.examples_run and self.verdict != "match":
            return ["(give --save-failure DIR to keep that example for --replay)"]
        return []

    def text(self) -> str:
        if self.verdict == "crash":
            at = f"example {self.examples_run}" if self.examples_run else "the start"
            lines = [f"validate-port {self.port} against {self.net}: stopped at {at}"]
            lines.append("PORT FAILURE: " + self.crash)
            if self.fault is not None and self.fault["layer"] != "the port":
                lines.append(f"  at layer {self.fault['layer']}")
            return "\n".join(lines + self._kept())
        ran = f"{self.examples_run} examples"
        if self.shrink_runs:
            ran += f" (failed at example {self.examples_run}; {self.shrink_runs} more to shrink it)"
        head = f"validate-port {self.port} against {self.net}: {ran}"
        lines = [f"{head}, {self.comparisons} comparisons"]
        lines += self.notes
        lines.append(
            f"verified layer by layer: {', '.join(self.local_layers) or 'none'}; only inside "
            f"a segment: {', '.join(self.segment_layers) or 'none'}; blobs the port did not "
            f"return: {', '.join(self.not_returned) or 'none'}"
        )
        if self.verdict == "match":
            lines.append("MATCH: every layer within its bound, forward and backward")
            for w in self.worst[:5]:
                lines.append(f"  {w['check']} {w['blob']}: largest err/bound {w['ratio']:.3g}")
            return "\n".join(lines)
        lines.append("MISMATCH")
        if self.fault is not None:
            lines.append(f"first failing layer: {self.fault['layer']}")
            lines.append(f"  {self.fault['kind']}: {self.fault['text']}")
            others = [f for f in self.findings if f != self.fault and f["side"] == "port"]
            if others:
                lines.append(f"other findings in that example ({len(others)}):")
                lines += [f"  {f['layer']}: {f['text']}" for f in others[:8]]
        for f in self.caffe_findings[:8]:
            lines.append(f"CAFFE at layer {f['layer']}: {f['text']}")
        return "\n".join(lines + self._kept())

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def validate(
    worker: CaffeWorker,
    net: Path,
    port_spec: str | Callable[[], nn.Module],
    *,
    weights: Path | None = None,
    mapping: Mapping[str, str] | None = None,
    head: str | None = None,
    bins: int | None = None,
    examples_n: int = 25,
    seed: int = 0,
    batch: int | None = None,
    save_failure: Path | outputs.Directory | None = None,
    replay: Path | None = None,
    argv: list[str] | None = None,
    generate: bool = False,
    guard: PortGuard | None = None,
    layer_plugins: Sequence[str] = (),
) -> Report:
    """Run the validation and return the report. A Caffe crash or timeout on an example is
    raised with that example named (and saved with `save_failure`)."""
    guard = guard or PortGuard()
    plugins.load(layer_plugins)
    text = read_prototxt(net)
    replayed = read_replay(replay) if replay is not None else None
    check_net(worker, text, net, weights=weights, need_input=True)
    surgery = ""
    if head is not None:
        if head not in HEAD_APPENDERS or bins is None:
            raise UsageError(f"--head {head} needs --bins K (heads: {', '.join(HEAD_APPENDERS)})")
        text = HEAD_APPENDERS[head](text, read_net(worker, text), bins)
        surgery = "pred_age"
    name = port_spec if isinstance(port_spec, str) else getattr(port_spec, "__name__", "port")
    try:
        port = load_port(port_spec, guard)
    except PortFailure as exc:
        return Report(str(net), name, verdict="crash", crash=str(exc))
    checker = PortChecker(
        worker,
        text,
        port,
        mapping,
        str(weights) if weights else "",
        weights is None or generate,
        surgery=surgery,
        guard=guard,
    )
    first_input = next(iter(checker.net.inputs.values()), (1,))
    n = batch or max(first_input[0], 2)  # batch > 1: bugs along the batch axis show
    report = Report(str(net), name)
    try:
        if replayed is not None:
            b = next(iter(replayed[0].values())).shape[0]
            runs = [_run(checker, PortExample(seed, batch=b), replayed)]
        else:
            runs = _search(checker, examples_n, seed, n)
    except (PortFailure, CaffeCrash) as exc:
        kept = ""
        if checker.current is not None and save_failure is not None:
            report.saved, report.replay = save(checker.current, seed, save_failure, argv or [])
            kept = f"; the example is saved to {report.saved}; replay with: {report.replay}"
        elif replay is not None:
            report.saved, report.replay = str(replay), _command(argv or [])
            kept = f"; the example is {replay}"
        if isinstance(exc, PortFailure):
            report.verdict, report.crash = "crash", str(exc)
            report.examples_run = checker.started
            return report
        at = f"while running example {checker.started} ({guard.desc})"
        failed = CrossvalError(f"{exc} {at}{kept}")
        failed.exit_code = exc.exit_code
        raise failed from None
    _summarise(report, runs)
    if report.verdict != "match" and save_failure is not None:
        minimal = next(r for r in reversed(runs) if r.failed)  # hypothesis replays it last
        ex_seed = minimal.verdict.example.seed
        report.saved, report.replay = save(minimal.arrays, ex_seed, save_failure, argv or [])
    elif report.verdict != "match" and replay is not None:
        report.saved, report.replay = str(replay), _command(argv or [])
    return report


def check_port(
    worker: CaffeWorker,
    prototxt: str,
    port: nn.Module,
    examples: Iterable[PortExample],
    *,
    mapping: Mapping[str, str] | None = None,
    weights: str = "",
    generate: bool = True,
) -> Report:
    """`examples` through the engine, in process (no search, no isolation), until the first
    that fails; the report as validate-port makes it. With `weights` (a caffemodel) and
    `generate` false, the learnable params are the caffemodel's."""
    checker = PortChecker(worker, prototxt, port, mapping, weights, generate)
    runs: list[Run] = []
    for ex in examples:
        runs.append(_run(checker, ex))
        if runs[-1].failed:
            break
    report = Report("net", "port")
    _summarise(report, runs)
    return report


def generated(n: int, seed: int = 0, batch: int = 2) -> list[PortExample]:
    """`n` examples: the first at scale 1, then inputs from 1e-3 to 1e3 and weights from 0.1
    to 10 times their fan-in scale (log-uniform), the ranges of `port_examples`."""
    rng = np.random.default_rng(seed)
    out = [PortExample(seed, 1.0, 1.0, batch)]
    for _ in range(n - 1):
        out.append(
            PortExample(
                int(rng.integers(0, 2**32 - 1)),
                float(10 ** rng.uniform(-3, 3)),
                float(10 ** rng.uniform(-1, 1)),
                batch,
            )
        )
    return out


def _run(checker: PortChecker, ex: PortExample, arrays: Arrays | None = None) -> Run:
    verdict = checker.run(ex, arrays)
    assert checker.current is not None
    return Run(verdict, checker.current, checker.fault(verdict))


def _summarise(report: Report, runs: list[Run]) -> None:
    """The verdict over `runs`: the first failing example ends the examples counted; the
    last failing one (hypothesis replays its shrunk example last) is the one shown."""
    first_bad = next((i for i, r in enumerate(runs) if r.failed), None)
    report.examples_run = len(runs) if first_bad is None else first_bad + 1
    report.shrink_runs = 0 if first_bad is None else len(runs) - first_bad - 1
    local: dict[str, None] = {}
    inside: dict[str, None] = {}
    missing: dict[str, None] = {}
    for r in runs:
        v = r.verdict
        local.update(dict.fromkeys(v.local_layers))
        inside.update(dict.fromkeys(v.segment_layers))
        missing.update(dict.fromkeys(v.not_returned))
        report.notes += [x for x in v.notes if x not in report.notes]
        report.comparisons += len(v.comparisons)
    report.local_layers = list(local)
    report.segment_layers = [x for x in inside if x not in local]
    report.not_returned = list(missing)
    if first_bad is None:
        by: dict[tuple[str, str], float] = {}
        for r in runs:
            for c in r.verdict.comparisons:
                by[(c.check, c.blob)] = max(by.get((c.check, c.blob), 0.0), c.ratio)
        report.worst = [
            {"check": k[0], "blob": k[1], "ratio": v}
            for k, v in sorted(by.items(), key=lambda kv: -kv[1])
        ]
        if report.comparisons == 0:  # nothing compared is no pass
            report.verdict = "mismatch"
            report.fault = {
                "layer": "the port",
                "kind": "nothing compared",
                "side": "port",
                "blob": "",
                "text": "no blob of the net was compared; the port returned none of them",
            }
        return
    minimal = next(r for r in reversed(runs) if r.failed)
    v = minimal.verdict
    report.verdict = "mismatch"
    report.findings = [_finding(f) for f in v.findings]
    report.caffe_findings = [_finding(f) for f in v.caffe_findings]
    if minimal.fault is not None:
        report.fault = _finding(minimal.fault)
        if minimal.fault.kind == "exception":
            report.verdict = "crash"
            report.crash = minimal.fault.text
            report.examples_run = checker_index(runs, minimal)


def checker_index(runs: list[Run], run: Run) -> int:
    """The example number (from 1) of `run` among `runs`."""
    return next(i for i, r in enumerate(runs) if r is run) + 1


def _search(checker: PortChecker, n: int, seed: int, batch: int) -> list[Run]:
    """A first example at scale 1, then the hypothesis search; shrinking only where an example
    is cheap (under SHRINK_BELOW seconds), so a full-size net reports its first failure
    instead of minutes of shrinking."""
    start = time.perf_counter()
    runs = [_run(checker, PortExample(seed, 1.0, 1.0, batch))]
    if runs[0].failed or n == 1:
        return runs
    cheap = time.perf_counter() - start < SHRINK_BELOW
    phases = list(Phase) if cheap else [p for p in Phase if p != Phase.shrink]

    @settings(
        max_examples=n - 1,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
        phases=phases,
    )
    @given(ex=port_examples(batch))
    @stops_search(PortFailure, CaffeCrash)  # reported at once, never shrunk through restarts
    def prop(ex: PortExample) -> None:
        r = _run(checker, ex)
        runs.append(r)
        assert not r.failed

    from hypothesis import seed as hseed

    try:
        with searching():
            hseed(seed)(prop)()
    except AssertionError:
        pass
    return runs


def _command(argv: list[str], replay: str = "") -> str:
    """The command that reruns `argv` on one saved example (without the options that search,
    save or write)."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--save-failure", "--json", "--examples", "--seed", "--replay"):
            skip = True
            continue
        keep.append(a)
    if replay:
        keep += ["--replay", replay]
    return "crossval " + " ".join(shlex.quote(a) for a in keep)


def save(
    arrays: Arrays, seed: int, directory: Path | outputs.Directory, argv: list[str]
) -> tuple[str, str]:
    """Save the example's arrays into `directory` (under the output policy) and return the
    path and the replay command; should the write fail, the copy outputs kept elsewhere is
    the one to replay (a warning says so)."""
    if not isinstance(directory, outputs.Directory):
        directory = outputs.directory(directory, "--save-failure")
    inputs, params = arrays
    packed: dict[str, NDArray[Any]] = {f"input/{k}": v for k, v in inputs.items()}
    for layer, blobs in params.items():
        for i, v in enumerate(blobs):
            packed[f"param/{layer}/{i}"] = v
    buf = io.BytesIO()
    np.savez(buf, **packed)  # type: ignore[arg-type]
    try:
        path = outputs.write_bytes(directory.file(f"failure-seed{seed}.npz"), buf.getvalue())
    except outputs.OutputError as exc:
        if not exc.kept:
            raise
        print(f"crossval: warning: {exc}", file=sys.stderr)
        path = Path(exc.kept)
    return str(path), _command(argv, str(path))


def write_json(report: Report, out: outputs.Target) -> None:
    outputs.write_text(out, json.dumps(report.as_json(), indent=2, default=str))
