"""The examples a test runs in the active hypothesis profile (HYPOTHESIS_PROFILE, loaded by
tests/conftest.py): the slow properties run fewer examples in `ci` than the profile's
default, and the profile's own count elsewhere (all of `thorough`'s)."""

from __future__ import annotations

import os

from hypothesis import settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "dev")


def profile_examples() -> int:
    default = settings.default
    return default.max_examples if default is not None else 100


def examples(ci: int) -> int:
    """`ci` examples in the `ci` profile (never more than the profile's own count); the
    profile's count in the others."""
    if PROFILE == "ci":
        return min(ci, profile_examples())
    return profile_examples()


def thorough() -> bool:
    return PROFILE == "thorough"
