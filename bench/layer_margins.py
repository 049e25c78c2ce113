"""Largest err/bound per layer type over many generated cases, against real Caffe.

    python bench/layer_margins.py [--examples 2000] [--out bench/layer_margins.json] TYPE...

Runs ``crossval.layercheck.run_case`` on `--examples` cases drawn from each type's strategy
(no shrinking), and writes per type: examples, failures (with the first few summaries), and
the largest err/bound seen with the case it was seen on. Exit 1 if any case failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings

from crossval import layercheck, provision
from crossval.layercheck import LayerCase, run_case
from crossval.worker import CaffeWorker


def measure(worker: CaffeWorker, layer_type: str, examples: int) -> dict[str, object]:
    stats: dict[str, object] = {"examples": 0, "failures": 0, "max_ratio": 0.0, "worst": ""}
    failures: list[str] = []
    start = time.perf_counter()

    @seed(20261202)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=layercheck.CASES[layer_type]())
    def prop(case: LayerCase) -> None:
        try:
            result = run_case(worker, case)
            ok, ratio, text = result.passed, result.ratio, result.summary()
        except Exception as exc:
            ok, ratio, text = False, float("inf"), f"{case.describe()}: {exc!r}"
        stats["examples"] = int(stats["examples"]) + 1  # type: ignore[call-overload]
        if not ok:
            stats["failures"] = int(stats["failures"]) + 1  # type: ignore[call-overload]
            if len(failures) < 5:
                failures.append(text)
        if ratio > float(stats["max_ratio"]):  # type: ignore[arg-type]
            stats["max_ratio"], stats["worst"] = ratio, case.describe()

    prop()
    stats["first_failures"] = failures
    stats["seconds"] = round(time.perf_counter() - start, 1)
    return stats


def main() -> int:
    torch.set_num_threads(1)  # small tensors; Caffe runs on the other core
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="+")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("bench/layer_margins.json"))
    args = parser.parse_args()
    unknown = [t for t in args.types if t not in layercheck.CASES]
    if unknown:
        print(f"no layer cases for {', '.join(unknown)}", file=sys.stderr)
        return 2
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    failed = False
    with CaffeWorker(provision.locate()) as worker:
        for t in args.types:
            stats = measure(worker, t, args.examples)
            results[t] = stats
            failed |= bool(stats["failures"])
            print(
                f"{t}: {stats['examples']} examples, {stats['failures']} failures, largest "
                f"err/bound {float(stats['max_ratio']):.3g} ({stats['seconds']} s) "  # type: ignore[arg-type]
                f"at {stats['worst']}",
                flush=True,
            )
            for f in stats["first_failures"]:  # type: ignore[attr-defined]
                print("  " + f.replace("\n", "\n  "), flush=True)
            args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
