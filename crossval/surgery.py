"""The seed's net surgery: set the expectation head's `pred_age` kernel to arange(K) and save
the initial weights, as `crossval surgery PROTOTXT -o init_weights.caffemodel` does."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .compare import exact
from .errors import CrossvalError
from .worker import CaffeError, CaffeWorker


class SurgeryError(CrossvalError):
    """The net cannot take the surgery, or the output cannot be written."""


@dataclass
class SurgeryResult:
    out: Path
    layer: str
    bins: int
    bottom: str

    def __str__(self) -> str:
        return (
            f"set {self.layer} kernel to arange({self.bins}) (over the {self.bins} bins of "
            f"{self.bottom!r}); wrote {self.out}"
        )


def surgery(
    worker: CaffeWorker,
    prototxt: Path,
    out: Path,
    layer: str = "pred_age",
    weights: Path | None = None,
    force: bool = False,
    phase: str = "TRAIN",
) -> SurgeryResult:
    """Apply the surgery to the net in `prototxt` (optionally starting from `weights`) and
    save all its params to `out`. The saved file is reloaded and its kernel checked bit for
    bit before it replaces anything; an existing `out` is kept unless `force`."""
    prototxt, out = Path(prototxt), Path(out)
    if not prototxt.is_file():
        raise SurgeryError(f"no prototxt at {prototxt}")
    if out.exists() and not force:
        raise SurgeryError(f"{out} exists; not overwriting it (use --force)")
    protected = {prototxt.resolve()} | ({weights.resolve()} if weights else set())
    if out.resolve() in protected:
        raise SurgeryError(f"the output {out} is one of the inputs; choose another path")
    text = prototxt.read_text()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(fd)
    try:
        try:
            got = worker.call(
                "surgery",
                prototxt=text,
                phase=phase,
                layer=layer,
                weights=str(weights or ""),
                out=tmp,
            )
            back = worker.call("params", prototxt=text, phase=phase, weights=tmp)
        except CaffeError as exc:
            raise SurgeryError(f"{prototxt}: {exc}") from None
        want = np.arange(got["bins"], dtype=np.float32)[None, :]
        check = exact("surgery", f"{layer}/0 in {out.name}", back["params"][layer][0], want)
        if not check.passed:
            raise SurgeryError(f"the saved kernel does not read back exactly: {check}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return SurgeryResult(out, layer, int(got["bins"]), str(got["bottom"]))
