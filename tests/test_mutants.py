"""The mutant catalogue: every realistic port bug is caught, the reference never is."""

from __future__ import annotations

import pytest
from hypothesis import settings

from crossval.layercheck.mutants import LAYER_MUTANTS
from crossval.mutants import CATALOGUE, EQUIVALENT, SOLVER_MUTANTS, TRAINING_MUTANTS
from crossval.mutants.killtable import KillTable, kill_table
from crossval.worker import CaffeWorker

# About 15 s with Caffe; part of the default suite. One xdist worker builds the kill table
# (tox runs `--dist loadgroup`): every test of this file shares it.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("kill-table")]

# The targets: at least this many mutants, median examples to detection at most this,
# every mutant caught within the `ci` profile's examples.
MIN_MUTANTS = 20
MAX_MEDIAN = 20
CI_EXAMPLES = 200


def budget() -> int:
    default = settings.default
    return max(CI_EXAMPLES, default.max_examples if default is not None else 0)


@pytest.fixture(scope="module")
def table(worker: CaffeWorker) -> KillTable:
    return kill_table(worker, max_examples=budget())


def test_catalogue_size_and_rows() -> None:
    names = [*CATALOGUE, *TRAINING_MUTANTS, *SOLVER_MUTANTS, *LAYER_MUTANTS]
    assert len(names) == len(set(names)) >= MIN_MUTANTS
    assert not set(EQUIVALENT) & set(names), "equivalent mutants are kept out of the count"
    for m in CATALOGUE.values():
        assert m.mistake and m.shows_in and m.when, m.impl.name
    for s in SOLVER_MUTANTS.values():
        assert s.mistake and s.types and s.when, s.name


def test_every_mutant_is_caught(table: KillTable) -> None:
    survivors = [(r.name, r.examples) for r in table.survivors]
    assert not survivors, f"mutants survived:\n{table.markdown()}"
    assert {r.name for r in table.rows} == {
        *CATALOGUE,
        *TRAINING_MUTANTS,
        *SOLVER_MUTANTS,
        *LAYER_MUTANTS,
    }
    for r in table.rows:
        assert r.check and r.blob and r.case and r.examples >= 1, r


def test_reference_raises_no_false_alarm(table: KillTable) -> None:
    assert not table.false_alarms, table.false_alarms
    # The reference ran as many examples as the slowest catch of each search.
    assert sum(table.reference_examples.values()) >= max(r.examples for r in table.rows)


def test_median_examples_to_detection(table: KillTable) -> None:
    assert all(r.examples <= budget() for r in table.rows)
    assert table.median <= MAX_MEDIAN, table.markdown()


def test_kill_table_names_the_catching_check(table: KillTable) -> None:
    text = table.markdown()
    for r in table.rows:
        assert f"`{r.name}`" in text
    kinds = {r.name: r.check.split()[0] for r in table.rows}
    # A gradient-only mutant is caught by a gradient check, a training one by training.
    for name, m in CATALOGUE.items():
        if m.shows_in == ("gradient",):
            assert kinds[name] == "gradient", (name, kinds[name])
    for name in (*TRAINING_MUTANTS, *SOLVER_MUTANTS):
        assert kinds[name] == "train", (name, kinds[name])
    for name, lm in LAYER_MUTANTS.items():
        assert kinds[name] in ("forward", "backward"), (name, kinds[name])
        assert lm.type in next(r.case for r in table.rows if r.name == name)
