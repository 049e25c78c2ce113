"""Realistic port bugs, and the kill table that shows the checks catch each one.

- ``catalogue``: wrong heads and losses (``CATALOGUE``, the seed's ``MUTANTS``, the ports that
  train a constant ``TRAINING_MUTANTS``, and ``EQUIVALENT``: mistakes no output can show);
- ``solvers``: wrong update rules (``SOLVER_MUTANTS``);
- ``killtable``: ``crossval mutants``, every mutant searched for by the properties.
"""

from __future__ import annotations

from .catalogue import CATALOGUE, EQUIVALENT, MUTANTS, TRAINING_MUTANTS, Mutant
from .solvers import SOLVER_MUTANTS, SolverMutant

__all__ = [
    "CATALOGUE",
    "EQUIVALENT",
    "MUTANTS",
    "SOLVER_MUTANTS",
    "TRAINING_MUTANTS",
    "Mutant",
    "SolverMutant",
]
