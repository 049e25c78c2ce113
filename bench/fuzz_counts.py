"""Run the fuzz suite's table of bad inputs and faults against a crossval install, each case as
a real process, and count the outcomes: clean errors (a one-line message, no traceback),
tracebacks, hangs (no exit within the limit), crossval killed by a signal, user files damaged,
files left behind (in the user's directory or $TMPDIR), Caffe workers left running.

    python bench/fuzz_counts.py [--python PYTHON] [--limit SECONDS]

`--python` is the interpreter whose `crossval` package is measured (default: this one), so
an older checkout's environment can be counted with the same table. The valid nets and
weights the bad inputs are made from are written by this checkout's crossval.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import test_fuzz as fz  # noqa: E402


def run(case: fz.Fuzz, arts: dict[str, bytes], python: str, limit: float) -> Counter[str]:
    got: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="fuzzcount-") as top:
        user, systmp = Path(top) / "user", Path(top) / "systmp"
        user.mkdir()
        systmp.mkdir()
        for name in case.files:
            (user / name).write_bytes(fz.FILES[name](arts))
        before = fz._snapshot(user)
        argv = [a.replace("{f}", str(user)) for a in case.argv]
        env = {
            **os.environ,
            "TMPDIR": str(systmp),
            "PYTHONPATH": ":".join([str(user), str(ROOT / "tests")]),
            "GLOG_minloglevel": "2",
            **{k: v.replace("{f}", str(user)) for k, v in case.env.items()},
        }
        try:
            proc = subprocess.run(
                [python, "-m", "crossval", *argv],
                env=env,
                cwd=user,
                capture_output=True,
                text=True,
                timeout=limit,
            )
            out, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired:
            got["hang"] += 1
            out, code = "", None
        if code is not None:
            if code < 0:
                got["crossval killed by a signal"] += 1
            elif "Traceback" in out:
                got["traceback"] += 1
            elif code == case.code:
                got["clean error, expected code"] += 1
            else:
                got["clean error, another code"] += 1
        after = fz._snapshot(user)
        if any(after.get(n) != c for n, c in before.items()):
            got["user file damaged"] += 1
        new = set(after) - set(before)
        if any(not any(n.startswith(c) for c in case.creates) for n in new):
            got["left in the user's directory"] += 1
        time.sleep(0.5)
        if fz._workers(systmp):
            got["worker left running"] += 1
        if list(systmp.iterdir()):
            got["left in $TMPDIR"] += 1
    return got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--limit", type=float, default=60.0)
    args = parser.parse_args()
    total: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="fuzzcount-art-") as d:
        arts = fz.make_artifacts(Path(d))
        for case in fz.CASES:
            got = run(case, arts, args.python, args.limit)
            total.update(got)
            print(case.id, dict(got), flush=True)
    print(f"\n{len(fz.CASES)} cases:")
    for k, n in sorted(total.items()):
        print(f"  {k}: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
