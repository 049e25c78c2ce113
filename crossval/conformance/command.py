"""`crossval conformance --converter MODULE:CALLABLE`: the converter over the case grid
(``cases``), each case isolated (``isolate``), as a table with one row per case and a
summary per layer type, the same as JSON, and each case that does not pass kept with its
replay command. Exit 0 only when every case passes (and one ran at least)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import outputs
from ..errors import EXIT_FINDING, EXIT_INTERNAL, EXIT_PASS, CrossvalError
from ..worker import CaffeWorker
from . import cases as grid
from .isolate import VERDICTS, Outcome, probe, run_case
from .options import PROFILES, Profile

PASS = "pass"


@dataclass
class Row:
    id: str
    type: str
    params: str
    outcome: Outcome
    kept: str = ""
    case: grid.Case | None = field(default=None, repr=False)  # what ran (not in the JSON)


@dataclass
class Conformance:
    """The run: its rows in the grid's order, and how long it took."""

    converter: str
    profile: str
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0
    date: str = ""

    @property
    def passed(self) -> int:
        return sum(r.outcome.verdict == PASS for r in self.rows)

    @property
    def exit_code(self) -> int:
        if any(r.outcome.verdict == "error" for r in self.rows):
            return EXIT_INTERNAL
        if not self.rows or self.passed < len(self.rows):
            return EXIT_FINDING
        return EXIT_PASS

    def summary(self) -> list[dict[str, Any]]:
        """Per layer type (in the grid's order): cases and how many got each verdict."""
        by: dict[str, dict[str, Any]] = {}
        for r in self.rows:
            entry = by.setdefault(
                r.type, {"type": r.type, "cases": 0, **dict.fromkeys(VERDICTS, 0)}
            )
            entry["cases"] += 1
            entry[r.outcome.verdict] += 1
        return list(by.values())

    def score(self) -> str:
        n = len(self.rows)
        share = 100.0 * self.passed / n if n else 0.0
        return f"{self.passed} of {n} cases pass ({share:.1f} %)"

    def case_table(self) -> str:
        lines = ["| case | parameters | verdict | detail |", "|---|---|---|---|"]
        for r in self.rows:
            o = r.outcome
            detail = o.detail if o.verdict != PASS else f"largest err/bound {o.worst:.3g}"
            lines.append(f"| {r.id} | {_cell(r.params)} | {o.verdict} | {_cell(detail)} |")
        return "\n".join(lines)

    def summary_table(self) -> str:
        shown = [
            v for v in VERDICTS if v != "error" or any(r.outcome.verdict == v for r in self.rows)
        ]
        lines = [
            "| layer type | cases | " + " | ".join(shown) + " |",
            "|---|---|" + "---|" * len(shown),
        ]
        for s in self.summary():
            lines.append(
                f"| {s['type']} | {s['cases']} | " + " | ".join(str(s[v]) for v in shown) + " |"
            )
        return "\n".join(lines)

    def text(self) -> str:
        head = (
            f"crossval conformance {self.converter} (profile {self.profile}, {self.date}): "
            f"{len(self.rows)} cases in {self.seconds:.0f} s"
        )
        parts = [head, "", self.case_table(), "", self.summary_table(), "", self.score()]
        kept = [r for r in self.rows if r.kept]
        if kept:
            parts.append(
                f"cases that do not pass kept in {Path(kept[0].kept).parent} (replay.txt in each)"
            )
        if not self.rows:
            parts.append("no case ran: nothing was checked")
        return "\n".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {
            "converter": self.converter,
            "profile": self.profile,
            "date": self.date,
            "seconds": round(self.seconds, 1),
            "cases": [
                {
                    "id": r.id,
                    "type": r.type,
                    "params": r.params,
                    "kept": r.kept,
                    **asdict(r.outcome),
                }
                for r in self.rows
            ],
            "summary": self.summary(),
            "passed": self.passed,
            "total": len(self.rows),
            "exit_code": self.exit_code,
        }


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def replay_command(converter: str, profile: str, case_id: str) -> str:
    argv = ["crossval", "conformance", "--converter", converter, "--profile", profile]
    return " ".join(shlex.quote(a) for a in [*argv, "--case", case_id])


def select(
    worker: CaffeWorker,
    layers: Sequence[str] | None,
    wanted: Sequence[str] | None,
    profile: Profile,
) -> list[grid.Case]:
    """The cases `--layers` and `--case` select, built (prototxt and params)."""
    types, nets = grid.selection(layers)
    if wanted:
        ids = list(dict.fromkeys(wanted))
        types = [t for t in types if any(i.split("/")[0] == t for i in ids)]
        nets = [n for n in nets if f"{grid.ZOO}/{n}" in ids]
        built = grid.build(worker, types, nets, profile)
        known = {c.id for c in built}
        missing = [i for i in ids if i not in known]
        if missing:
            raise CrossvalError(
                f"--case {', '.join(missing)}: no such case in profile {profile.name}"
                + (f" with --layers {','.join(layers)}" if layers else "")
                + " (ids are TYPE/N from 0, or zoo/NAME)"
            )
        return [c for c in built if c.id in ids]
    return grid.build(worker, types, nets, profile)


def run(
    worker: CaffeWorker,
    converter: str,
    *,
    layers: Sequence[str] | None = None,
    profile: str = "ci",
    timeout: float = 60.0,
    cases: Sequence[str] | None = None,
    keep: outputs.Directory | None = None,
    progress: Callable[[str], None] | None = None,
) -> Conformance:
    """The conformance run of `converter` (MODULE:CALLABLE) against the Caffe of `worker`."""
    start = time.monotonic()
    chosen = PROFILES[profile]
    probe(converter)  # a converter that cannot be imported is bad usage, before any work
    todo = select(worker, layers, cases, chosen)
    result = Conformance(converter, profile, date=time.strftime("%Y-%m-%d"))
    with tempfile.TemporaryDirectory(prefix="crossval-conformance-") as tmp:
        for i, case in enumerate(todo, 1):
            net = Path(tmp, case.slug, "net.prototxt")
            weights = net.with_name("weights.caffemodel")
            net.parent.mkdir(parents=True)
            net.write_text(case.prototxt)
            worker.save(case.prototxt, case.weights, str(weights))
            outcome = run_case(worker, case, converter, net, weights, timeout)
            row = Row(case.id, case.type, case.params, outcome, case=case)
            if outcome.verdict != PASS and keep is not None:
                row.kept = _keep(
                    keep, case, net, weights, replay_command(converter, profile, case.id)
                )
            result.rows.append(row)
            if progress is not None:
                progress(
                    f"[{i}/{len(todo)}] {case.id}: {outcome.verdict} ({outcome.seconds:.1f} s)"
                )
    result.seconds = time.monotonic() - start
    return result


def _keep(keep: outputs.Directory, case: grid.Case, net: Path, weights: Path, replay: str) -> str:
    where = keep.sub(case.slug)
    outputs.write_bytes(where.file("net.prototxt"), net.read_bytes())
    outputs.write_bytes(where.file("weights.caffemodel"), weights.read_bytes())
    outputs.write_text(where.file("replay.txt"), replay + "\n")
    return str(where.path)


def main(args: argparse.Namespace) -> int:
    """The CLI's `crossval conformance`."""
    json_out = outputs.target(args.json, "--json", force=args.force) if args.json else None
    keep = outputs.directory(args.out, "--out", force=args.force, empty=True) if args.out else None
    layers = [x.strip() for x in args.layers.split(",") if x.strip()] if args.layers else None
    if keep is not None:
        keep.make()

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with CaffeWorker() as worker:
        result = run(
            worker,
            args.converter,
            layers=layers,
            profile=args.profile,
            timeout=args.timeout,
            cases=args.case,
            keep=keep,
            progress=progress,
        )
    print(result.text())
    if json_out is not None:
        outputs.write_text(json_out, json.dumps(result.as_json(), indent=2))
    return result.exit_code
