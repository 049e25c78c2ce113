"""pytest plugin (entry point `pytest11`): real Caffe in your own tests.

Fixtures:
- ``crossval_caffe``: the provisioned pycaffe (``crossval caffe ensure``, or CROSSVAL_CAFFE);
  a test that uses it fails, never skips, when there is none.
- ``crossval_worker``: a Caffe worker process (aborts in Caffe become errors).

Assertion helper: ``assert_port_matches(worker, net, port, weights=..., examples=...)`` runs
the same validation as ``crossval validate-port`` (with the CLI's option names) and fails
with its report when the port does not match Caffe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
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
    worker: Any,
    net: str | Path,
    port: str | Callable[[], Any],
    *,
    weights: str | Path | None = None,
    map: Mapping[str, str] | None = None,  # the CLI's --map
    head: str | None = None,
    bins: int | None = None,
    examples: int = 25,
    seed: int = 0,
    batch: int | None = None,
    generate: bool = False,
    save_failure: str | Path | None = None,
    replay: str | Path | None = None,
) -> Any:
    """Validate `port` (``module:callable`` or a factory returning the module) against the
    Caffe net `net`, as ``crossval validate-port`` does, and raise AssertionError with its
    report unless the port matches. Returns the report. The options are the CLI's:

    - ``weights``: a caffemodel for the net's params (else they are generated);
    - ``map``: ``{"layer/index": "state_dict key"}`` where the default names do not fit;
    - ``head="expectation"`` with ``bins``: append the seed's expectation head;
    - ``examples``, ``seed``, ``batch``: the search (batch defaults to the net's, at least 2);
    - ``generate``: with ``weights``, generate the learnable params anyway;
    - ``save_failure``: a directory to keep the failing example in; ``replay``: run one
      saved example instead of searching.

    Paths may be str or Path. The port runs in this process (use the CLI for isolation).
    """
    from crossval.portcheck.command import validate

    def path(p: str | Path | None) -> Path | None:
        return None if p is None else Path(p)

    report = validate(
        worker,
        Path(net),
        port,
        weights=path(weights),
        mapping=map,
        head=head,
        bins=bins,
        examples_n=examples,
        seed=seed,
        batch=batch,
        generate=generate,
        save_failure=path(save_failure),
        replay=path(replay),
    )
    if report.verdict != "match":
        raise AssertionError(report.text())
    return report
