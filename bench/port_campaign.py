"""The no-false-alarm campaign's figures: over the zoo nets (tests/test_zoo_nets.NETS), the
reference port and the hand-written port on generated examples, the largest err/bound per
bound rule (one per layer type, segments apart), findings counted; then each buggy variant
on generated examples until it is caught, the examples it took and the layer named.

    python bench/port_campaign.py [--examples N] [--seed S]

Prints Markdown (the tables in docs/validate-port.md come from here).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_zoo_nets import BUGS, NETS, generate_params, load_weights  # noqa: E402

from crossval.errors import UsageError  # noqa: E402
from crossval.portcheck.command import generated as examples  # noqa: E402
from crossval.portcheck.engine import PortChecker  # noqa: E402
from crossval.portcheck.refport import reference_port  # noqa: E402
from crossval.worker import CaffeWorker  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=20, help="per net and port")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    worst: dict[str, float] = {}
    counted = findings = 0
    start = time.perf_counter()
    lines = [f"Measured {time.strftime('%Y-%m-%d')} by `python bench/port_campaign.py`", ""]
    with CaffeWorker() as worker, tempfile.TemporaryDirectory() as tmp:
        made = {}
        for key, net in NETS.items():
            text = worker.prototxt(net.builder, batch=net.batch, **net.kwargs)
            described = worker.describe(text)
            params = generate_params(described, np.random.default_rng(0))
            path = str(Path(tmp) / f"{key}.caffemodel")
            worker.save(text, params, path)
            made[key] = (text, path, params)
            module = importlib.import_module(f"ports.{net.port}")
            mapping = module.caffe_map() if hasattr(module, "caffe_map") else None
            ref = reference_port(worker, text, weights=path)
            hand = module.make(**net.kwargs)
            load_weights(module, hand, params, strict=True)
            for port, pmap in ((ref, ref.mapping()), (hand, mapping)):
                checker = PortChecker(worker, text, port, pmap, path, generate=True)
                for ex in examples(args.examples, args.seed, net.batch):
                    v = checker.run(ex)
                    counted += 1
                    findings += len(v.findings)
                    for c in v.comparisons:
                        worst[c.rule] = max(worst.get(c.rule, 0.0), c.ratio)
        took = time.perf_counter() - start
        lines += [
            f"{counted} examples ({len(NETS)} nets x 2 ports x {args.examples}), {findings} "
            f"findings, {took:.0f} s",
            "",
            "| bound | largest err/bound |",
            "|---|---|",
        ]
        lines += [f"| {rule} | {r:.3g} |" for rule, r in sorted(worst.items())]
        lines += ["", "| net | buggy port | caught at | examples |", "|---|---|---|---|"]
        for key, variant in BUGS:
            net = NETS[key]
            if variant == "make_dropout_active":  # made in training mode: run in eval()
                lines.append(f"| {key} | {variant} | passes: run in eval(), as deployed | - |")
                continue
            text, path, params = made[key]
            module = importlib.import_module(f"ports.{net.port}")
            mapping = module.caffe_map() if hasattr(module, "caffe_map") else None
            port = getattr(module, variant)(**net.kwargs)
            load_weights(module, port, params, strict=False)
            try:
                checker = PortChecker(worker, text, port, mapping, path, generate=True)
            except UsageError as exc:
                first = str(exc).splitlines()[-1].strip()
                lines.append(f"| {key} | {variant} | bad usage (exit 2): {first} | 0 |")
                continue
            where, taken = "not caught", 0
            for ex in examples(50, args.seed, net.batch):
                taken += 1
                fault = checker.fault(checker.run(ex))
                if fault is not None:
                    where = re.sub(r" \w+_param \{.*?\}", "", fault.layer)
                    break
            lines.append(f"| {key} | {variant} | {where} | {taken} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
