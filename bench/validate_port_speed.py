"""validate-port's cost per example on the DEX VGG-16 at 224 (batch 1, forward and backward)
against the raw cost of one Caffe forward+backward and one port forward+backward.

    python bench/validate_port_speed.py [--size 224] [--examples 2]

Prints Markdown (the figures in docs/validate-port.md come from here).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ports import dex  # noqa: E402

from crossval.portcheck.engine import PortChecker, PortExample  # noqa: E402
from crossval.worker import CaffeWorker  # noqa: E402


def _per_example(checker: PortChecker, examples: int) -> float:
    times = []
    for i in range(examples):
        t0 = time.perf_counter()
        v = checker.run(PortExample(i, batch=1))
        times.append(time.perf_counter() - t0)
        assert checker.fault(v) is None, [str(f) for f in v.findings]
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--examples", type=int, default=2)
    args = ap.parse_args()
    load_before = os.getloadavg()
    with CaffeWorker() as worker, tempfile.TemporaryDirectory() as tmp:
        text = worker.prototxt("dex_vgg16", bins=101, size=args.size)
        port = dex.make(size=args.size)
        checker = PortChecker(worker, text, port)
        inputs, params = checker.arrays(PortExample(0, batch=1))
        raw_caffe = worker.time_raw(checker.prototxt, inputs, params, repeat=2).forward_backward
        x = {k: torch.from_numpy(v).requires_grad_(True) for k, v in inputs.items()}
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            out = port(**x)
            torch.autograd.backward(
                [out["prob"]], [torch.from_numpy(np.ones(out["prob"].shape, np.float32))]
            )
            best = min(best, time.perf_counter() - t0)
        raw_port = best
        # a trained net's weights, as a user runs it (--weights), and fresh weights drawn
        # for every example (no --weights): drawing VGG-16's 138 M weights is part of it
        model = worker.save(text, params, str(Path(tmp, "w.caffemodel")))
        trained = _per_example(
            PortChecker(worker, text, port, weights=model, generate=False), args.examples
        )
        drawn = _per_example(checker, args.examples)
    raw = raw_caffe + raw_port
    load_after = os.getloadavg()
    command = " ".join(["python bench/validate_port_speed.py", *sys.argv[1:]])
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `{command}`")
    print(
        f"(load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
        f"{os.cpu_count()} cores):"
    )
    print()
    print("| DEX VGG-16 at 224, batch 1 | seconds | against raw |")
    print("|---|---|---|")
    print(f"| raw Caffe forward+backward | {raw_caffe:.2f} | |")
    print(f"| raw port forward+backward | {raw_port:.2f} | |")
    print(f"| raw, both | {raw:.2f} | 1x |")
    print(
        f"| validate-port, one example, --weights (best of {args.examples}) | {trained:.2f} | "
        f"{trained / raw:.1f}x |"
    )
    print(
        f"| validate-port, one example, weights drawn (best of {args.examples}) | {drawn:.2f} | "
        f"{drawn / raw:.1f}x |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
