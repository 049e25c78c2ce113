"""pytest plugin (entry point `pytest11`): real Caffe in your own tests.

Fixtures:
- ``crossval_caffe``: the provisioned pycaffe (``crossval caffe ensure``, or CROSSVAL_CAFFE);
  a test that uses it fails, never skips, when there is none.
- ``crossval_worker``: a Caffe worker process (aborts in Caffe become errors).

Assertion helper: ``assert_port_matches(worker, net, port, **options)`` runs the same
validation as ``crossval validate-port`` and fails with its report when the port does not
match Caffe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def crossval_caffe() -> Any:
    from crossval import provision
    from crossval.errors import CaffeNotAvailable

    try:
        return provision.locate()
    except CaffeNotAvailable as exc:
        pytest.fail(f"real Caffe is required: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def crossval_worker(crossval_caffe: Any) -> Iterator[Any]:
    from crossval.worker import CaffeWorker

    with CaffeWorker(crossval_caffe) as worker:
        yield worker


def assert_port_matches(
    worker: Any, net: str | Path, port: str | Callable[[], Any], **options: Any
) -> Any:
    """Validate `port` (``module:callable`` or a factory) against the Caffe net `net`;
    raise AssertionError with the report unless it matches. Returns the report."""
    from crossval.validate import validate

    report = validate(worker, Path(net), port, **options)
    if report.verdict != "match":
        raise AssertionError(report.text())
    return report
