"""The seed's net surgery: set the expectation head's `pred_age` kernel to arange(K) and save
the initial weights, as `crossval surgery PROTOTXT -o init_weights.caffemodel` does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import inputs, outputs
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
    if not layer:
        raise SurgeryError("--layer must name the Convolution whose kernel the surgery sets")
    text = inputs.read_prototxt(prototxt)
    target = outputs.target(out, "-o", force=force, inputs=[prototxt, weights])
    inputs.check_net(worker, text, prototxt, phase=phase, weights=weights, doing="surgery")
    with outputs.staged(target) as tmp:
        try:
            got = worker.surgery(
                prototxt=text,
                phase=phase,
                layer=layer,
                weights=str(weights or ""),
                out=str(tmp),
            )
            back = worker.params(text, phase=phase, weights=str(tmp))
        except CaffeError as exc:
            raise SurgeryError(f"{prototxt}: {exc}") from None
        assert got is not None  # the worker replies None only when no layer is given
        want = np.arange(got.bins, dtype=np.float32)[None, :]
        check = exact("surgery", f"{layer}/0 in {out.name}", back.params[layer][0], want)
        if not check.passed:
            raise SurgeryError(f"the saved kernel does not read back exactly: {check}")
    return SurgeryResult(out, layer, got.bins, got.bottom)
