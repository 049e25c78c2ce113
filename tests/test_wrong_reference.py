"""Every comparison fails on a deliberately wrong reference, and on a wrong port."""

from __future__ import annotations

import pytest
from hypothesis import Phase, find, settings

from crossval.checks import CaseResult, Harness
from crossval.mutants import MUTANTS, Mutant
from crossval.strategies import cases
from crossval.worker import CaffeWorker


@pytest.fixture(scope="module")
def harness(worker: CaffeWorker) -> Harness:
    return Harness(worker)


# The first failing case found is checked (shrinking it only cost time: every step a worker
# round trip; the assertions below hold for any failing case).
NO_SHRINK = settings(max_examples=50, database=None, phases=[Phase.generate])


def failing_kinds(result: CaseResult) -> set[str]:
    return {c.check.split()[0] for c in result.failures}


def failing_pairs(result: CaseResult) -> set[str]:
    return {c.check.split()[-1] for c in result.failures if " " in c.check}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_wrong_reference_is_caught(harness: Harness, name: str) -> None:
    """The mutant as the reference (float32 and float64): Caffe no longer matches it."""
    mutant: Mutant = MUTANTS[name]
    combo = ((mutant.head, mutant.loss),)
    case = find(
        cases(combos=combo),
        lambda c: not harness.run_case(c, reference=mutant.impl).passed,
        settings=NO_SHRINK,
    )
    result = harness.run_case(case, reference=mutant.impl)
    kinds = failing_kinds(result)
    assert set(mutant.shows_in) <= kinds, (name, kinds, [str(c) for c in result.failures[:3]])
    assert "caffe~ref64" in failing_pairs(result) and "torch~caffe" in failing_pairs(result)
    # The same case with the true reference passes: the failure is the mutant's.
    assert harness.run_case(case).passed


@pytest.mark.parametrize("name", list(MUTANTS))
def test_wrong_port_is_caught(harness: Harness, name: str) -> None:
    """The mutant as a port (float32 side only): torch~caffe and torch~ref64 both fail."""
    mutant: Mutant = MUTANTS[name]
    combo = ((mutant.head, mutant.loss),)
    case = find(
        cases(combos=combo),
        lambda c: not harness.run_case(c, port=mutant.impl).passed,
        settings=NO_SHRINK,
    )
    result = harness.run_case(case, port=mutant.impl)
    pairs = failing_pairs(result)
    assert {"torch~caffe", "torch~ref64"} <= pairs, pairs
    assert "caffe~ref64" not in pairs
