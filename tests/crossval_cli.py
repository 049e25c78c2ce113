"""Run the `crossval` command in a child process, as a user would (shared by the tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def run_crossval(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    """`python -m crossval ARGS` with the source tree and tests/ (the ports the tests name)
    first on PYTHONPATH, in `env` (default: this process's environment)."""
    env = dict(os.environ if env is None else env)
    paths = [str(ROOT), str(TESTS), *filter(None, env.get("PYTHONPATH", "").split(":"))]
    env["PYTHONPATH"] = ":".join(paths)
    env.setdefault("GLOG_minloglevel", "2")
    return subprocess.run(
        [sys.executable, "-m", "crossval", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
