"""Inputs checked before use: each problem is a one-line error (exit status 2) naming the
file, layer, blob or key at fault, instead of a traceback or a bare Caffe CHECK."""

from __future__ import annotations

import argparse
import difflib
import math
import zipfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import CrossvalError

if TYPE_CHECKING:
    from .worker import CaffeWorker


class InputError(CrossvalError):
    """A file or value given to crossval is not usable (exit status 2)."""


# ---- counts on the command line --------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of examples, steps, a batch...)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (at least 1)")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a seed)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (it must be 0 or more)")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (no nan, no inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (SmoothL1's sigma, a time limit)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def closest(name: str, choices: Iterable[str]) -> str:
    """' (closest: a, b)' for a misspelt `name`, or '' when nothing is close."""
    near = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" (closest: {', '.join(near)})" if near else ""


# ---- files -----------------------------------------------------------------------------


def read_prototxt(path: Path, label: str = "prototxt") -> str:
    """The text of a prototxt; missing, unreadable, binary or non-UTF-8 files are refused."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{label} {path} is a directory, not a prototxt file")
    if not path.exists():
        raise InputError(f"no {label} at {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {label} {path}: {exc.strerror or exc}") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise InputError(
            f"{label} {path} is a binary file (a caffemodel?), not a text prototxt "
            f"(NUL byte at offset {nul})"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{label} {path} is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} "
            "(save it as UTF-8; Caffe's prototxts are ASCII)"
        ) from None


def read_replay(path: Path) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    """The inputs and params of an example saved by validate-port's --save-failure."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise InputError(f"--replay {path} {what}; give a failure-*.npz saved by --save-failure")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"--replay {path} is not a saved example (.npz): {exc}") from None
    inputs = {k[len("input/") :]: v for k, v in arrays.items() if k.startswith("input/")}
    params: dict[str, list[np.ndarray]] = {}
    indexed: dict[str, dict[int, np.ndarray]] = {}
    for k, v in arrays.items():
        if not k.startswith("param/"):
            continue
        layer, _, index = k[len("param/") :].rpartition("/")
        if not layer or not index.isdigit():
            raise InputError(f"--replay {path}: array {k!r} is not param/<layer>/<index>")
        indexed.setdefault(layer, {})[int(index)] = v
    for layer, blobs in indexed.items():
        if sorted(blobs) != list(range(len(blobs))):
            raise InputError(f"--replay {path}: layer {layer!r} has params {sorted(blobs)}")
        params[layer] = [blobs[i] for i in range(len(blobs))]
    if not inputs or any(v.ndim == 0 or v.shape[0] < 1 for v in inputs.values()):
        raise InputError(
            f"--replay {path} holds no input blobs with a batch (arrays: "
            f"{', '.join(sorted(arrays)) or 'none'}); give a file saved by --save-failure"
        )
    return inputs, params


# ---- nets and caffemodels ----------------------------------------------------------------


def same_shapes(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> bool:
    """Equal up to leading 1s (legacy 4-d blobs pad their leading axes with 1)."""

    def strip(s: tuple[int, ...]) -> tuple[int, ...]:
        i = 0
        while i < len(s) - 1 and s[i] == 1:
            i += 1
        return tuple(s[i:])

    return len(a) == len(b) and all(strip(x) == strip(y) for x, y in zip(a, b, strict=True))


def check_net(
    worker: CaffeWorker,
    text: str,
    where: Path | str,
    *,
    phase: str = "TEST",
    weights: Path | None = None,
    need_input: bool = False,
    doing: str = "loading the net",
) -> None:
    """Refuse a net Caffe would take badly: no layers, duplicate layer names, an input with a
    zero dimension (Caffe says only "Check failed: data_"), no Input layer (with
    `need_input`); and a caffemodel that does not fit it: every learnable layer of the net
    must be in it with the net's param shapes (Caffe keeps the filler's values for a missing
    one, without a word); the layers it holds that the net lacks are listed. The net is
    made here: a Caffe abort on an empty blob is named as such, any other is raised as a
    crash during `doing`."""
    from .worker import CaffeCrash, CaffeError

    if weights is not None and not Path(weights).is_file():
        raise InputError(f"no caffemodel at {weights}")
    try:
        got = worker.check_net(text, phase=phase, weights=str(weights or ""))
    except CaffeError as exc:
        why = str(exc).split(": ", 1)[-1].removeprefix("ValueError: ")
        raise InputError(f"{where}: {why}") from None
    except CaffeCrash as exc:
        if "Check failed: data_" not in str(exc):
            raise CaffeCrash(doing, exc.how, exc.log_lines) from None
        raise InputError(
            f"{where}: Caffe aborted making the net ('Check failed: data_'): a blob has a "
            "zero dimension, i.e. some layer's output is empty (an input too small for the "
            "kernels and strides that follow?)"
        ) from None
    names = [name for name, _ in got.layers]
    if not names:
        raise InputError(f"{where} has no layers: the net is empty")
    twice = sorted(n for n, c in Counter(names).items() if c > 1)
    if twice:
        raise InputError(
            f"{where}: layer names used more than once: {', '.join(map(repr, twice))} "
            "(Caffe finds a layer's weights by its name: give each layer its own)"
        )
    shapes = got.inputs
    if need_input and not shapes:
        types = ", ".join(sorted({t for _, t in got.layers}))
        raise InputError(
            f"{where} has no Input layer (layer types: {types}); crossval feeds a net through "
            "Input layers: replace its data layer by one (input_param { shape { dim: ... } })"
        )
    unread = got.unwritten_bottoms
    if unread:
        layer, blob = unread[0]
        hint = " (the net has no Input layer)" if not shapes else ""
        raise InputError(
            f"{where}: layer {layer!r} reads blob {blob!r}, which no layer before it writes{hint}"
        )
    for blob, shape in shapes.items():
        if not shape or any(d < 1 for d in shape):
            raise InputError(
                f"{where}: input {blob!r} has shape {tuple(shape)}; every dimension must be "
                "at least 1"
            )
    if weights is None:
        return
    net, model = got.params, got.model
    problems = []
    for layer, blobs in net.items():
        want = [tuple(shape) for shape, _ in blobs]
        if layer not in model:
            if any(lr != 0 for _, lr in blobs):
                problems.append(f"no {layer!r} (the net's learnable layer, shapes {want})")
            continue
        have = [tuple(s) for s in model[layer]]
        if not same_shapes(have, want):
            problems.append(f"{layer!r} with shapes {have}, where the net has {want}")
    if problems:
        extra = sorted(set(model) - set(net))
        lacks = f"; it holds layers the net lacks: {', '.join(extra)}" if extra else ""
        raise InputError(
            f"caffemodel {weights} does not fit {where}: it has "
            + "; ".join(problems)
            + lacks
            + " (a caffemodel for another net?)"
        )


__all__ = [
    "InputError",
    "check_net",
    "closest",
    "finite_float",
    "nonnegative_int",
    "positive_int",
    "read_prototxt",
    "read_replay",
    "same_shapes",
]
