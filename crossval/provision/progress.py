"""Progress for the long provisioning steps: a live line on a terminal, few plain lines in logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO

PREFIX = "crossval caffe"


class Progress:
    """Reports stages and a build percentage.

    On a terminal the percentage rewrites one line. Elsewhere (CI logs) each stage is one
    line and the percentage is printed at fixed steps: every 10 % normally, every 25 % when
    quiet. Nothing is printed for a cache hit when quiet except the final line.
    """

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.live = (not quiet) and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.step = 25 if quiet else 10
        self._last_pct = -1
        self._printed = 0
        self._stage = ""
        self._t0 = time.monotonic()
        self._stage_t0 = self._t0

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _end_live_line(self) -> None:
        if self.live and self._last_pct >= 0:
            self._write("\n")

    def stage(self, name: str, detail: str = "") -> None:
        """Start a stage: one line, with the elapsed time of the whole run."""
        self._end_live_line()
        self._stage = name
        self._stage_t0 = time.monotonic()
        self._last_pct = -1
        self._printed = 0
        elapsed = self._stage_t0 - self._t0
        suffix = f": {detail}" if detail else ""
        self._write(f"[{PREFIX}] {elapsed:6.1f}s {name}{suffix}\n")

    def percent(self, pct: int, what: str = "") -> None:
        """Report a percentage of the current stage (monotone; repeats are dropped)."""
        if pct <= self._last_pct:
            return
        self._last_pct = pct
        if self.live:
            self._write(f"\r[{PREFIX}]         {self._stage} {pct:3d}% {what[:60]:<60}")
            return
        bucket = pct - pct % self.step
        if bucket > self._printed:
            self._printed = bucket
            elapsed = time.monotonic() - self._t0
            self._write(f"[{PREFIX}] {elapsed:6.1f}s {self._stage} {bucket}%\n")

    def note(self, text: str) -> None:
        """A line that matters even in quiet mode (waiting for a lock, installing packages)."""
        self._end_live_line()
        if self.live:
            self._last_pct = -1
        self._write(f"[{PREFIX}] {text}\n")

    def finish(self, text: str) -> None:
        self._end_live_line()
        elapsed = time.monotonic() - self._t0
        self._write(f"[{PREFIX}] {elapsed:6.1f}s {text}\n")
