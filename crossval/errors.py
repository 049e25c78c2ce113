"""Errors crossval reports to its user. Each names the thing at fault."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

EXIT_PASS = 0
EXIT_FINDING = 1  # a finding about the thing under test (a mismatch, a regression, a crash)
EXIT_USAGE = 2  # bad usage or input
EXIT_INTERNAL = 3  # an internal error of crossval itself
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM


class CrossvalError(Exception):
    """Base class: an error the CLI prints as one clear message (exit status 2)."""

    exit_code = 2


class UsageError(CrossvalError):
    """Bad input to a command: the message names the file, blob, layer or key at fault."""


class ProvisionError(CrossvalError):
    """Caffe could not be provisioned (fetch, verify, build, or a selected build is unusable)."""


class SourceHashMismatch(ProvisionError):
    """A downloaded source file does not have its pinned SHA-256."""


class NeedsRoot(ProvisionError):
    """Build dependencies are missing and this process may not install them."""


class CaffeNotAvailable(ProvisionError):
    """No usable pycaffe: none provisioned, or the selected one does not import."""


# Ctrl-C and SIGTERM. The handler raises KeyboardInterrupt, but Python drops an exception
# raised while it runs a garbage-collector callback or a __del__ ("Exception ignored in
# ..."), and the run would go on to pass. So the signal is also remembered, and the places
# a run must pass through (each worker request, each published output, the end of main)
# raise it again.
_interrupted_by: int | None = None


def on_interrupt(signum: int, frame: object) -> None:
    global _interrupted_by
    _interrupted_by = signum
    raise KeyboardInterrupt


def quiet_interrupts(hook: Callable[[Any], object]) -> Callable[[Any], object]:
    """An unraisable-exception hook that drops the KeyboardInterrupt of a remembered signal
    (Python would print it as "Exception ignored in ..." with a traceback) and passes
    everything else to `hook`."""

    def quiet(info: Any) -> object:
        if _interrupted_by is not None and isinstance(info.exc_value, KeyboardInterrupt):
            return None
        return hook(info)

    return quiet


def raise_if_interrupted() -> None:
    if _interrupted_by is not None:
        raise KeyboardInterrupt


def clear_interrupt() -> None:
    global _interrupted_by
    _interrupted_by = None
