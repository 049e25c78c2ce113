"""How close the checks come to their bounds: for generated cases of every head and loss,
the largest |error| / bound and the largest |error| per comparison kind.

    python bench/margins.py [--examples 1000]

A ratio below 1 passes; the distance to 1 is the margin the tolerance table leaves.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

from hypothesis import HealthCheck, given, settings

from crossval.checks import Harness
from crossval.strategies import cases
from crossval.worker import CaffeWorker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1000)
    args = ap.parse_args()
    worst: dict[tuple[str, str], tuple[float, float, str]] = defaultdict(lambda: (0.0, 0.0, ""))
    failures: list[str] = []
    with CaffeWorker() as worker:
        harness = Harness(worker)

        @settings(
            max_examples=args.examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=cases())
        def sweep(case: object) -> None:
            result = harness.run_case(case)  # type: ignore[arg-type]
            for c in result.comparisons:
                key = (c.check, re.sub(r"fc\d+", "fc<K>", c.blob))
                ratio, abs_err, _ = worst[key]
                if c.ratio > ratio:
                    worst[key] = (c.ratio, max(abs_err, c.max_abs), c.case)
                else:
                    worst[key] = (ratio, max(abs_err, c.max_abs), worst[key][2])
            failures.extend(str(c) for c in result.failures)

        sweep()
    print(f"{args.examples} generated cases, all heads and losses\n")
    print("| check | blob | largest err/bound | largest abs err | at |")
    print("|---|---|---|---|---|")
    for (check, blob), (ratio, abs_err, where) in sorted(worst.items()):
        if check.startswith(("transfer", "fixed")):
            continue
        print(f"| {check} | {blob} | {ratio:.3g} | {abs_err:.3g} | {where} |")
    print(f"\nfailures: {len(failures)}")
    for line in failures[:10]:
        print(line)


if __name__ == "__main__":
    main()
