"""The hypothesis profiles of the commands (generated examples per property) and the one
settings helper every command's search uses (derandomized, no deadline, no database).

The test suite's profiles (tests/conftest.py) use the same names and counts."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, Phase, settings

PROFILES = {"dev": 25, "ci": 200, "thorough": 5000}


def fixed_settings(n: int, generate_only: bool = False) -> Any:
    """Hypothesis settings for `n` derandomized examples, no deadline, no database, no
    health check; with `generate_only`, no explicit, reuse or shrink phase (a search that
    collects or counts examples)."""
    fixed = settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    return settings(fixed, phases=[Phase.generate]) if generate_only else fixed
