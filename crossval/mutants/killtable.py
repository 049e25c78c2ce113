"""The kill table: every mutant in the catalogue run through the checks until one catches it.

Each mutant is searched with Hypothesis over its head and loss (forward/loss/gradient
mutants: ``strategies.cases``; training mutants: ``training.strategies.train_cases``), generation
only (no shrinking), derandomized and without a database, so that the count of examples to
detection is reproducible. The unmutated reference then runs on the same example sequence,
as many examples as the slowest-caught mutant of that search needed: it must pass them all
(no false alarm).

The counts are reproducible for one entry point, not across entry points: Hypothesis mixes
literal constants from every loaded local module into what it generates, so the set of
modules imported (the CLI, a test module) can move a detection by a few examples.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import find, settings
from hypothesis.errors import NoSuchExample
from hypothesis.strategies import SearchStrategy

from crossval.reference.solvers import SOLVER_TYPES, CaffeSolver

from ..checks import Harness
from ..compare import Comparison
from ..layercheck import CASES as LAYER_CASES
from ..layercheck import run_case as run_layer_case
from ..layercheck.mutants import LAYER_MUTANTS
from ..profiles import fixed_settings
from ..strategies import cases
from ..training import TrainCase, run_parity
from ..training.strategies import train_cases
from ..worker import CaffeWorker
from .catalogue import CATALOGUE, EQUIVALENT, TRAINING_MUTANTS
from .solvers import SOLVER_MUTANTS


@dataclass
class Kill:
    """One row of the kill table."""

    name: str
    mistake: str
    shows_in: str  # where it shows
    kind: str  # "case" (forward/loss/gradient) or "train"
    caught: bool
    examples: int  # examples run until the first catch (the budget if it survived)
    check: str = ""  # the comparison that caught it
    blob: str = ""
    case: str = ""


@dataclass
class KillTable:
    rows: list[Kill]
    equivalent: list[tuple[str, str, str]]  # name, mistake, why it cannot show
    reference_examples: dict[str, int]  # search -> examples the reference passed
    false_alarms: list[str]

    @property
    def survivors(self) -> list[Kill]:
        return [r for r in self.rows if not r.caught]

    @property
    def median(self) -> float:
        return float(statistics.median(r.examples for r in self.rows))

    @property
    def ok(self) -> bool:
        return not self.survivors and not self.false_alarms

    def markdown(self) -> str:
        lines = [
            "| mutant | mistake | shows | caught | examples | caught by | blob |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| `{r.name}` | {r.mistake} | {r.shows_in} | "
                f"{'yes' if r.caught else '**SURVIVED**'} | {r.examples} | {r.check} | "
                f"{r.blob} |"
            )
        caught = len(self.rows) - len(self.survivors)
        lines += [
            "",
            f"{caught} of {len(self.rows)} mutants caught; median examples to detection "
            f"{self.median:g}.",
        ]
        ref = ", ".join(f"{k}: {n}" for k, n in sorted(self.reference_examples.items()))
        if self.false_alarms:
            lines.append("FALSE ALARM on the unmutated reference: " + "; ".join(self.false_alarms))
        else:
            lines.append(f"Unmutated reference: no failure on the same examples ({ref}).")
        if self.equivalent:
            lines += ["", "Equivalent (cannot change any output; not counted):", ""]
            lines += [f"- `{n}` ({m}): {why}" for n, m, why in self.equivalent]
        return "\n".join(lines)


def _search(
    strategy: SearchStrategy[Any], failures: Callable[[Any], list[Comparison | str]], budget: int
) -> tuple[int, Any, list[Comparison | str]]:
    """Examples tried until `failures` is non-empty (or the budget), the example, failures."""
    seen = [0]
    found: list[tuple[Any, list[Comparison | str]]] = []

    def condition(example: Any) -> bool:
        if found:
            return True
        seen[0] += 1
        got = failures(example)
        if got:
            found.append((example, got))
        return bool(got)

    try:
        find(strategy, condition, settings=fixed_settings(budget, generate_only=True))
    except NoSuchExample:
        pass
    if found:
        return seen[0], found[0][0], found[0][1]
    return seen[0], None, []


def _shows(kinds: tuple[str, ...], when: str) -> str:
    where = ", ".join(kinds)
    return where if when == "always" else f"{where}; {when}"


def _kill(
    name: str,
    mistake: str,
    shows: str,
    kind: str,
    tried: int,
    example: Any,
    fails: list[Comparison | str],
) -> Kill:
    if example is None:
        return Kill(name, mistake, shows, kind, False, tried)
    first = fails[0]
    if isinstance(first, str) and kind == "layer":  # "forward: top 0 has shape ..."
        check, _, blob = first.partition(": ")
        check, blob = check + " shape", blob.partition(" has")[0]
    elif isinstance(first, str):  # "fixed parameter moved: <who> at step <t>, ..."
        moved = first.partition(": ")[2]
        check, blob = "train fixed moved", moved.partition(", ")[0]
    else:
        check, blob = first.check, first.blob
    return Kill(name, mistake, shows, kind, True, tried, check, blob, example.describe())


# ---- training ---------------------------------------------------------------------------


def training_failures(
    worker: CaffeWorker,
    tc: TrainCase,
    solver: type[CaffeSolver] = CaffeSolver,
    port: Any = None,
) -> list[Comparison | str]:
    """Failing trajectory comparisons (and a moved constant) of a port trained with `solver`
    (or, with `port`, the Impl `port` trained by Caffe's rules): `run_parity`'s findings."""
    with tempfile.TemporaryDirectory(prefix="crossval-kill-") as d:
        got = run_parity(worker, tc, Path(d), port=port, solver=solver)
    out: list[Comparison | str] = [m for m in (got.caffe_fixed, got.torch_fixed) if m is not None]
    out.extend(c for c in got.comparisons if not c.passed)
    return out


# ---- the table --------------------------------------------------------------------------


def kill_table(
    worker: CaffeWorker, max_examples: int | None = None, names: list[str] | None = None
) -> KillTable:
    """Every mutant (or those in `names`) searched for up to `max_examples` examples (the
    loaded Hypothesis profile's), then the reference on the same examples."""
    default = settings.default
    budget = max_examples or (default.max_examples if default is not None else 100)
    harness = Harness(worker)
    rows: list[Kill] = []
    need: dict[tuple[str, str, str], int] = {}  # search -> examples the reference must pass

    def want(name: str) -> bool:
        return names is None or name in names

    def note(key: tuple[str, str, str], n: int) -> None:
        need[key] = max(need.get(key, 0), n)

    for name, m in CATALOGUE.items():
        if not want(name):
            continue
        combo = ((m.head, m.loss),)

        def port_failures(case: Any, impl: Any = m.impl) -> list[Comparison | str]:
            return list(harness.run_case(case, port=impl).failures)

        tried, ex, fails = _search(cases(combos=combo), port_failures, budget)
        rows.append(_kill(name, m.mistake, _shows(m.shows_in, m.when), "case", tried, ex, fails))
        note(("case", m.head, m.loss), tried)

    for name, tm in TRAINING_MUTANTS.items():
        if not want(name):
            continue
        combo = ((tm.head, tm.loss),)

        def port_train(tc: Any, impl: Any = tm.impl) -> list[Comparison | str]:
            return training_failures(worker, tc, port=impl)

        tried, ex, fails = _search(train_cases(combos=combo), port_train, budget)
        shows = _shows(tm.shows_in, tm.when)
        rows.append(_kill(name, tm.mistake, shows, "train", tried, ex, fails))
        note(("train", tm.head, tm.loss + "/" + ",".join(SOLVER_TYPES)), tried)

    for name, sm in SOLVER_MUTANTS.items():
        if not want(name):
            continue
        combo = ((sm.head, sm.loss),)

        def solver_train(tc: Any, solver: type[CaffeSolver] = sm.solver) -> list[Comparison | str]:
            return training_failures(worker, tc, solver)

        tried, ex, fails = _search(train_cases(combos=combo, types=sm.types), solver_train, budget)
        rows.append(
            _kill(name, sm.mistake, _shows(sm.shows_in, sm.when), "train", tried, ex, fails)
        )
        note(("train", sm.head, sm.loss + "/" + ",".join(sm.types)), tried)

    def layer_failures(case: Any, port: Any = None) -> list[Comparison | str]:
        result = run_layer_case(worker, case, port)
        return [*result.shape_errors, *result.failures]

    for name, lm in LAYER_MUTANTS.items():
        if not want(name):
            continue

        def layer_port(case: Any, port: Any = lm.port) -> list[Comparison | str]:
            return layer_failures(case, port)

        tried, ex, fails = _search(LAYER_CASES[lm.type](), layer_port, budget)
        rows.append(_kill(name, lm.mistake, lm.shows, "layer", tried, ex, fails))
        note(("layer", lm.type, ""), tried)

    # The reference on the same example sequences (same strategy, same derandomized seed).
    false_alarms: list[str] = []
    ran: dict[str, int] = {}

    def ref_case(case: Any) -> list[Comparison | str]:
        return list(harness.run_case(case).failures)

    def ref_train(tc: Any) -> list[Comparison | str]:
        return training_failures(worker, tc)

    for (kind, head, loss), n in sorted(need.items()):
        base, _, types = loss.partition("/")
        combo = ((head, base),)
        if kind == "case":
            tried, ex, fails = _search(cases(combos=combo), ref_case, n)
        elif kind == "layer":
            tried, ex, fails = _search(LAYER_CASES[head](), layer_failures, n)
        else:
            tc_strategy = train_cases(combos=combo, types=tuple(types.split(",")))
            tried, ex, fails = _search(tc_strategy, ref_train, n)
        ran[f"{kind} {head}+{loss}" if loss else f"{kind} {head}"] = tried
        if ex is not None:
            false_alarms.append(f"{ex.describe()}: {fails[0]}")

    equivalent = [(name, m.mistake, why) for name, (m, why) in EQUIVALENT.items() if want(name)]
    for name, (m, _) in EQUIVALENT.items():
        if not want(name):
            continue

        # An equivalent mutant must indeed pass: run it on the whole budget.
        def eq(case: Any, impl: Any = m.impl) -> list[Comparison | str]:
            return list(harness.run_case(case, port=impl).failures)

        _, ex, fails = _search(cases(combos=((m.head, m.loss),)), eq, budget)
        if ex is not None:
            false_alarms.append(f"'equivalent' {name} was caught: {fails[0]}")
    return KillTable(rows, equivalent, ran, false_alarms)


__all__ = ["Kill", "KillTable", "kill_table", "training_failures"]
