"""Benchmark: verified cases per second for each head+loss property, batched (many cases per
hypothesis example, crossval.batched) and one case per example (the per-case path), against
the raw cost of one Caffe and one PyTorch forward+backward of the same case.

    python bench/bench_heads.py [--examples 20] [--cases 64] [--rounds 5] [--single 300]
                                [--batch 8] [--features 64] [--bins 100]

Prints a markdown table (docs/performance.md's figures come from it), with the load average
before and after: the machine is shared, so the batched rate is measured `--rounds` times
(best and median), the raw framework costs in the same run. Not a test: nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st

from crossval.batched import case_batches, check_batch
from crossval.checks import Harness
from crossval.heads import COMBINATIONS, HEADS, LOSSES
from crossval.profiles import fixed_settings
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
    caffe = harness.worker.time_raw(
        prototxt=proto,
        params=params,
        surgery=h.surgery,
        inputs={"pool5": case.x, label: case.target},
    ).forward_backward
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


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min), {os.cpu_count()} cores"


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


def where_the_time_goes(harness: Harness, combo: tuple[str, str], rounds: int = 6) -> str:
    """``run_batch`` on one batch of 64 cases (batch 8, 64 features, K 100): us a case (best
    and median of `rounds` rounds of 5 batches, and the parent's CPU time), and its stages
    (ms a batch, wall, summed over their calls: sending to the worker, the PyTorch float32
    side, the float64 reference, the bounds, the comparisons, waiting for the reply)."""
    from crossval import batched
    from crossval.batched import Spec, expand, run_batch
    from crossval.heads import Head

    head, loss = combo
    labels = dict(targets="fractional", normalization="VALID", ignoring="some")
    extra: dict[str, Any] = labels if loss == "softmax_with_loss" else {}
    spec = Spec(head, loss, batch=8, features=64, bins=100, spread=5.0, seed=1, count=64, **extra)
    batch = expand(spec)
    spent: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

        return run

    names = {
        "run_torch_batch": "pytorch float32",
        "reference64": "float64 reference",
        "three_way_each": "compare",
        "exact_each": "compare",
    }
    saved = {name: getattr(batched, name) for name in (*names, "submit_run_many")}
    bounds_each = Head.bounds_each

    def submit(*a: Any, **kw: Any) -> Any:
        return timed("wait", timed("send", saved["submit_run_many"])(*a, **kw))

    setattr(batched, "submit_run_many", submit)  # noqa: B010 (a module's function, timed)
    for name, stage in names.items():
        setattr(batched, name, timed(stage, saved[name]))
    setattr(Head, "bounds_each", timed("bounds", bounds_each))  # noqa: B010
    per_case: list[float] = []
    cpu: list[float] = []
    stages: dict[str, float] = {}
    try:
        run_batch(harness, batch)  # warm
        for _ in range(rounds):
            spent.clear()
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(5):
                assert run_batch(harness, batch).passed
            per_case.append((time.perf_counter() - t0) / 5 / batch.size * 1e6)
            cpu.append((time.thread_time() - c0) / 5 / batch.size * 1e6)
            for k, v in spent.items():
                stages[k] = stages.get(k, 0.0) + v / 5 / rounds * 1e3
    finally:
        for name, fn in saved.items():
            setattr(batched, name, fn)
        setattr(Head, "bounds_each", bounds_each)  # noqa: B010
    parts = ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
    return (
        f"- {'+'.join(combo)}: {min(per_case):.0f} us/case (median "
        f"{statistics.median(per_case):.0f}; the parent's CPU {min(cpu):.0f}); "
        f"ms a batch of 64: {parts}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=20, help="hypothesis examples, batched")
    ap.add_argument("--cases", type=int, default=64, help="cases per example, batched")
    ap.add_argument("--rounds", type=int, default=5, help="batched measurements (best, median)")
    ap.add_argument("--single", type=int, default=300, help="examples of the per-case path")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--bins", type=int, default=100)
    ap.add_argument(
        "--where",
        action="store_true",
        help="only where the time of a batch goes (its stages)",
    )
    args = ap.parse_args()
    if args.where:
        with CaffeWorker() as worker:
            harness = Harness(worker)
            print(
                f"{datetime.datetime.now():%Y-%m-%d %H:%M}: run_batch, 64 cases of batch 8, "
                f"64 features, K 100; {load_average()}"
            )
            for combo in COMBINATIONS:
                print(where_the_time_goes(harness, combo))
        return
    n, d, k = args.batch, args.features, args.bins
    with CaffeWorker() as worker:
        harness = Harness(worker)
        print(
            f"{datetime.datetime.now():%Y-%m-%d %H:%M}: batch {n}, features {d}, K {k}; batched: "
            f"{args.rounds} rounds of {args.examples} examples x {args.cases} cases per "
            f"property; per case: {args.single} examples; torch threads "
            f"{torch.get_num_threads()}\n{load_average()}\n"
        )
        # Hypothesis's own first-use costs (its scan of the loaded modules for constants,
        # once per process: 0.2 s) before anything is timed.
        combo = ("expectation", "euclidean")
        strategy = cases(combos=(combo,), batches=st.just(n), features=st.just(d), bins=st.just(k))
        floors = [
            ("st.integers()", hypothesis_floor(st.integers(), 1000)),
            ("the heads' case strategy", hypothesis_floor(strategy, 1000)),
        ]
        print(
            "| property | cases/s, batched: best | median | us/case (best) | overhead (x raw) "
            "| cases/s, one per example | overhead (x raw) "
            "| raw Caffe fwd+bwd | raw PyTorch fwd+bwd |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for combo in COMBINATIONS:
            caffe, pt = raw_costs(harness, *combo, n, d, k)
            batched_cases_per_second(harness, combo, 2, args.cases, n, d, k)  # warm up
            rates = [
                batched_cases_per_second(harness, combo, args.examples, args.cases, n, d, k)
                for _ in range(args.rounds)
            ]
            best, median = max(rates), statistics.median(rates)
            single = single_cases_per_second(harness, combo, args.single, n, d, k)
            raw = caffe + pt
            print(
                f"| {'+'.join(combo)} | {best:.0f} | {median:.0f} | {1e6 / best:.0f} | "
                f"{1 / best / raw:.2f} | {single:.0f} | {1 / single / raw:.1f} | "
                f"{caffe * 1e6:.0f} us | {pt * 1e6:.0f} us |"
            )
        print(f"\n{load_average()}")
        print("\nhypothesis alone (a property with an empty body, 1000 examples):")
        for name, rate in floors:
            print(f"- {name}: {rate:.0f} examples/s ({1e3 / rate:.2f} ms/example)")


if __name__ == "__main__":
    main()
