"""Shared fixtures. Tests that need Caffe use real Caffe: they fail, never skip, without it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Literal

import pytest
import torch
from hypothesis import HealthCheck, settings

from crossval import provision
from crossval.errors import CaffeNotAvailable
from crossval.profiles import PROFILES
from crossval.worker import CaffeWorker

# One PyTorch thread: the Caffe worker runs beside the tests on the other core, and the
# tensors are small; two threads each (oversubscribed) made the layer checks 6x slower.
torch.set_num_threads(1)

# Hypothesis profiles, chosen by HYPOTHESIS_PROFILE (tox sets `ci`): the commands' profiles
# (crossval.profiles), with the test suite's own settings.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=PROFILES["ci"],
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=PROFILES["dev"])
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=PROFILES["thorough"],
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "dev")
settings.load_profile(PROFILE)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Full-size and long campaigns (marked `thorough`) run in the thorough profile only:
    deselected, and counted in pytest's summary, in the others."""
    if PROFILE == "thorough":
        return
    kept = [item for item in items if item.get_closest_marker("thorough") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


@pytest.fixture(scope="session")
def caffe_install() -> provision.CaffeInstall:
    """The provisioned (or CROSSVAL_CAFFE-selected) pycaffe."""
    try:
        return provision.locate()
    except CaffeNotAvailable as exc:
        pytest.fail(f"real Caffe is required and missing: {exc}", pytrace=False)


def _worker_scope(fixture_name: str, config: pytest.Config) -> Literal["module", "session"]:
    # One worker per pytest process (an xdist worker), its cached nets shared by the modules;
    # per module in `thorough`, whose full-size nets would stay cached for the whole run.
    return "module" if PROFILE == "thorough" else "session"


@pytest.fixture(scope=_worker_scope)
def worker(caffe_install: provision.CaffeInstall) -> Iterator[CaffeWorker]:
    """A Caffe worker shared by the tests (a crash or a time limit restarts it)."""
    with CaffeWorker(caffe_install) as w:
        yield w
