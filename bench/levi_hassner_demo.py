"""validate-port on Levi and Hassner's age net as published (input 227, LRN, overhanging
pools, dropout): its correct port and each buggy variant, as a user runs them.

    python bench/levi_hassner_demo.py [--size 227] [--examples 3] [--out FILE.md]

Writes the commands and their outputs (Markdown) to stdout or --out; the figures in
docs/validate-port.md come from here. The ports are tests/ports/levi_hassner.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PORTS = ["make", "make_pool_floor", "make_lrn_alpha_unscaled", "make_softmax_batch_axis"]


def _crossval(*args: str) -> tuple[int, str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "crossval", *args], capture_output=True, text=True, env=env
    )
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=227)
    ap.add_argument("--examples", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lines = [f"Measured {time.strftime('%Y-%m-%d')} by `python bench/levi_hassner_demo.py`:", ""]
    with tempfile.TemporaryDirectory() as d:
        net = Path(d) / "levi_hassner_age.prototxt"
        rc, out, _ = _crossval(
            "prototxt", "levi_hassner_age", "--size", str(args.size), "-o", str(net)
        )
        if rc:
            print(out, file=sys.stderr)
            return rc
        for port in PORTS:
            cmd = [
                "validate-port",
                str(net),
                "--port",
                f"ports.levi_hassner:{port}",
                "--examples",
                str(args.examples),
            ]
            rc, out, took = _crossval(*cmd)
            shown = " ".join(["crossval", *cmd]).replace(str(net), net.name)
            lines += ["```", f"$ {shown}"]
            lines += [ln.replace(str(net), net.name) for ln in out.rstrip().splitlines()]
            lines += [f"(exit {rc}, {took:.0f} s)", "```", ""]
    text = "\n".join(lines)
    if args.out:
        from crossval import outputs

        outputs.write_text(outputs.target(Path(args.out), "--out"), text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
