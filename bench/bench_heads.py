"""Benchmark: verified cases per second for each head+loss property, batched (many cases per
hypothesis example, crossval.batched) and one case per example (the per-case path), against
the raw cost of one Caffe and one PyTorch forward+backward of the same case.

    python bench/bench_heads.py [--examples 20] [--cases 64] [--single 300]
                                [--batch 8] [--features 64] [--bins 100]

Prints a markdown table (docs/performance.md's figures come from it). Not a test: nothing
here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
from hypothesis import given
from hypothesis import strategies as st

from crossval.batched import case_batches, check_batch
from crossval.checks import Harness
from crossval.heads import COMBINATIONS, HEADS, LOSSES
from crossval.report import fixed_settings
from crossval.strategies import build_case, cases
from crossval.transfer import state_dict_to_caffe
from crossval.worker import CaffeWorker


def raw_costs(
    harness: Harness, head: str, loss: str, n: int, d: int, k: int
) -> tuple[float, float]:
    """Seconds per forward+backward: Caffe inside the worker (no IPC), PyTorch float32."""
    case = build_case(head, loss, batch=n, features=d, bins=k, spread=5.0, seed=1)
    h = HEADS[head]
    proto = harness.prototxt(h, case)
    ip = h.ip_layer(case)
    learnable = {key: torch.from_numpy(case.weights[key]) for key in h.learnable(case)}
    params = state_dict_to_caffe(learnable, {ip: harness._layouts[proto][ip]})
    label = "label" if LOSSES[loss].consumes == "logits" else "true_age"
    caffe = harness.worker.call(
        "time_raw",
        prototxt=proto,
        params=params,
        surgery=h.surgery,
        inputs={"pool5": case.x, label: case.target},
    )["forward_backward"]
    module = h.reference(case, torch.float32)
    x = torch.from_numpy(case.x).requires_grad_(True)
    target = torch.from_numpy(case.target)
    consumed = ip if LOSSES[loss].consumes == "logits" else "pred_age"
    reps = 500
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            LOSSES[loss].reference(module(x)[consumed], target, case).backward()
        best = min(best, (time.perf_counter() - t0) / reps)
    return caffe, best


def single_cases_per_second(
    harness: Harness, combo: tuple[str, str], examples: int, n: int, d: int, k: int
) -> float:
    """The per-case path: one case per hypothesis example (``Harness.run_case``)."""
    strategy = cases(combos=(combo,), batches=st.just(n), features=st.just(d), bins=st.just(k))
    count = 0

    @fixed_settings(examples)  # type: ignore[untyped-decorator]
    @given(case=strategy)
    def prop(case: object) -> None:
        nonlocal count
        count += 1
        assert harness.run_case(case).passed  # type: ignore[arg-type]

    t0 = time.perf_counter()
    prop()
    return count / (time.perf_counter() - t0)


def batched_cases_per_second(
    harness: Harness, combo: tuple[str, str], examples: int, per: int, n: int, d: int, k: int
) -> float:
    """Batched: `per` cases per hypothesis example, every one verified (``check_batch``)."""
    strategy = case_batches(
        combos=(combo,),
        count=per,
        batches=st.just(n),
        features=st.just(d),
        bins=st.just(k),
        max_work=None,
    )
    count = 0

    @fixed_settings(examples)  # type: ignore[untyped-decorator]
    @given(batch=strategy)
    def prop(batch: object) -> None:
        nonlocal count
        count += check_batch(harness, batch).batch.size  # type: ignore[arg-type]

    t0 = time.perf_counter()
    prop()
    return count / (time.perf_counter() - t0)


def hypothesis_floor(strategy: st.SearchStrategy[object], examples: int) -> float:
    """Examples/s of a property whose body does nothing: hypothesis's own cost per example."""

    @fixed_settings(examples)  # type: ignore[untyped-decorator]
    @given(value=strategy)
    def prop(value: object) -> None:
        pass

    prop()  # warm up (strategy compilation)
    t0 = time.perf_counter()
    prop()
    return examples / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=20, help="hypothesis examples, batched")
    ap.add_argument("--cases", type=int, default=64, help="cases per example, batched")
    ap.add_argument("--single", type=int, default=300, help="examples of the per-case path")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--bins", type=int, default=100)
    args = ap.parse_args()
    n, d, k = args.batch, args.features, args.bins
    with CaffeWorker() as worker:
        harness = Harness(worker)
        print(
            f"{datetime.date.today()}: batch {n}, features {d}, K {k}; batched: "
            f"{args.examples} examples x {args.cases} cases per property; per case: "
            f"{args.single} examples; torch threads {torch.get_num_threads()}\n"
        )
        print(
            "| property | cases/s, batched | us/case | overhead (x raw) "
            "| cases/s, one per example | overhead (x raw) "
            "| raw Caffe fwd+bwd | raw PyTorch fwd+bwd |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for combo in COMBINATIONS:
            caffe, pt = raw_costs(harness, *combo, n, d, k)
            batched_cases_per_second(harness, combo, 2, args.cases, n, d, k)  # warm up
            rate = batched_cases_per_second(harness, combo, args.examples, args.cases, n, d, k)
            single = single_cases_per_second(harness, combo, args.single, n, d, k)
            raw = caffe + pt
            print(
                f"| {'+'.join(combo)} | {rate:.0f} | {1e6 / rate:.0f} | "
                f"{1 / rate / raw:.2f} | {single:.0f} | {1 / single / raw:.1f} | "
                f"{caffe * 1e6:.0f} us | {pt * 1e6:.0f} us |"
            )
        combo = ("expectation", "euclidean")
        strategy = cases(combos=(combo,), batches=st.just(n), features=st.just(d), bins=st.just(k))
        floors = [
            ("st.integers()", hypothesis_floor(st.integers(), 1000)),
            ("the heads' case strategy", hypothesis_floor(strategy, 1000)),
        ]
        print("\nhypothesis alone (a property with an empty body, 1000 examples):")
        for name, rate in floors:
            print(f"- {name}: {rate:.0f} examples/s ({1e3 / rate:.2f} ms/example)")


if __name__ == "__main__":
    main()
