"""What an exported head's ONNX file is: its input, outputs and fixed constant (HeadSpec), and
the errors of the ONNX commands."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from ..compare import Comparison
from ..errors import CrossvalError
from ..heads import HEADS, Case, Head

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]


OUTPUT = "pred_age"
BATCH_AXIS = "batch"
EXPORTER = "torch.onnx.export (dynamo)"


class OnnxInputError(CrossvalError):
    """Bad input: a file that is not what it should be, or a net that is not one of the heads."""


class OnnxModelInvalid(CrossvalError):
    """An ONNX model fails validation (checker, shapes, structure or the fixed constants)."""


class OnnxCheckFailed(CrossvalError):
    """The exported model failed its checks; nothing was written (exit status 1)."""

    exit_code = 1

    def __init__(self, message: str, comparisons: list[Comparison] | None = None) -> None:
        super().__init__(message)
        self.comparisons = comparisons or []


# ---- the head to export -------------------------------------------------------------------


@dataclass(frozen=True)
class HeadSpec:
    """What an exported file holds beside the head's own description (``heads.HEADS``): the
    head of that shape (D, K or the scale, the InnerProduct's Caffe name) and the input
    blob's name and per-example dims. Blobs, params, the fixed constant and the reference
    module all come from the head's row, through `shape`."""

    head: str
    features: int
    bins: int = 100  # K, where the head has bins
    scale: float = 99.0  # where the head has a scale
    ip_layer: str = ""  # default: the head's (fc1 / fc<K>)
    input_blob: str = "pool5"
    input_dims: tuple[int, ...] = ()  # per-example input dims; default (features,)

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise OnnxInputError(f"unknown head {self.head!r}; known: {', '.join(HEADS)}")
        row = HEADS[self.head]
        try:
            row.check(self.case(np.zeros((1, max(self.features, 0)), np.float32), {}))
        except ValueError as exc:
            raise OnnxInputError(str(exc)) from None
        if not self.ip_layer:
            object.__setattr__(self, "ip_layer", row.default_ip_name(self.bins))
        if not self.input_dims:
            object.__setattr__(self, "input_dims", (self.features,))
        if int(np.prod(self.input_dims)) != self.features:
            raise OnnxInputError(
                f"input {self.input_blob!r} has per-example dims {self.input_dims} "
                f"({int(np.prod(self.input_dims))} values), not the {self.features} features"
            )

    @classmethod
    def from_case(cls, case: Case) -> HeadSpec:
        return cls(case.head, case.features, case.bins, case.scale, case.ip_name)

    @property
    def row(self) -> Head:
        return HEADS[self.head]

    @property
    def shape(self) -> Case:
        """A case of this head's shape (one zero example, no weights): what the head's row
        reads its blobs, params and constants from."""
        return self.case(np.zeros((1, self.features), np.float32), {})

    @property
    def outputs(self) -> int:
        """The InnerProduct's num_output."""
        return self.row.outputs(self.shape)

    @property
    def blobs(self) -> tuple[str, ...]:
        return self.row.blobs(self.shape)

    @property
    def learnable(self) -> tuple[str, ...]:
        return self.row.learnable(self.shape)

    def fixed_value(self) -> F32:
        """The constant the head must hold (the Scale's [99.], the kernel arange(K)[None])."""
        return self.row.fixed_value(self.shape)

    def fixed_text(self) -> str:
        return self.row.fixed_text(self.shape)

    def module(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The reference head (learnable weights as PyTorch initialises them)."""
        return self.row.module(self.shape).to(dtype).eval()

    def describe(self) -> str:
        text = f"{self.head} D={self.features} {self.row.shape_text(self.shape)}"
        return text + (f" ip={self.ip_layer}" if self.row.renamable else "")

    def case(self, x: F32, weights: Mapping[str, F32], region: str = "") -> Case:
        """The case the head and tolerance tables describe: this head, shape and
        InnerProduct name (a custom one, such as fc8-101, carried by the case)."""
        row = HEADS[self.head]
        custom = self.ip_layer and self.ip_layer != row.default_ip_name(self.bins)
        target = np.zeros((x.shape[0], 1), dtype=np.float32)
        return Case(
            self.head,
            "euclidean",
            x,
            target,
            dict(weights),
            bins=self.bins,
            scale=self.scale,
            region=region,
            ip_name=self.ip_layer if custom else "",
        )

    def metadata(self) -> dict[str, str]:
        meta = {
            "crossval.head": self.head,
            "crossval.features": str(self.features),
            "crossval.ip_layer": self.ip_layer,
            "crossval.input": self.input_blob,
            "crossval.input_dims": ",".join(map(str, self.input_dims)),
            "crossval.outputs": ",".join(self.blobs),
        }
        meta.update({f"crossval.{k}": v for k, v in self.row.shape_metadata(self.shape).items()})
        return meta

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> HeadSpec:
        head = props.get("crossval.head")
        if head is None:
            raise OnnxInputError(
                "the model carries no crossval metadata (crossval.head): name the head to "
                "expect instead"
            )
        try:
            features = int(props["crossval.features"])
            dims = tuple(int(d) for d in props.get("crossval.input_dims", "").split(",") if d)
            return cls(
                head,
                features,
                bins=int(props.get("crossval.bins", "100")),
                scale=float(props.get("crossval.scale", "99.0")),
                ip_layer=props.get("crossval.ip_layer", ""),
                input_blob=props.get("crossval.input", "pool5"),
                input_dims=dims,
            )
        except (KeyError, ValueError) as exc:
            raise OnnxInputError(f"the model's crossval metadata is unreadable: {exc}") from None
