"""References for a user's own Caffe Python layers.

A net with a Python layer crossval does not know cannot be judged at that layer, so
validate-port refuses it (exit 2) unless a plugin module, named with ``--layer-plugin
MODULE``, registers the layer's float64 reference and its float32 error bounds::

    from crossval.portcheck.plugins import register_python_layer

    register_python_layer(
        "my_layers", "Clip",                      # python_param { module layer }
        forward=lambda spec, bottoms: [bottoms[0].clamp(-1, 1)],
        forward_bound=lambda spec, bottoms, blobs, tops: [np.zeros(np.shape(tops[0]))],
        backward_bound=lambda spec, bottoms, blobs, tops, diffs: ([np.zeros(...)], []),
    )

``forward`` takes the layer's spec (``spec.param("python_param")["param_str"]`` holds its
parameters) and float64 bottom tensors; autograd through it gives the backward. The bounds
take float64 arrays and give, per top (forward) and per bottom and param (backward), the
largest error a correct float32 implementation may have at each element.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence

from torch import Tensor

from crossval.reference.layers import LAYERS, LayerSpec
from crossval.reference.layers.loss import PYTHON_LAYERS

from ..errors import UsageError
from ..tolerances.layers import BackwardBound, ForwardBound, LayerBound
from ..tolerances.loss import PYTHON_BOUNDS
from .port import importable_from_cwd


def register_python_layer(
    module: str,
    layer: str,
    *,
    forward: Callable[[LayerSpec, Sequence[Tensor]], list[Tensor]],
    forward_bound: ForwardBound,
    backward_bound: BackwardBound,
) -> None:
    """Make Caffe's Python layer `module`.`layer` known to the reference and the bounds."""
    PYTHON_LAYERS[(module, layer)] = forward
    PYTHON_BOUNDS[(module, layer)] = LayerBound(
        "layer_python", forward_bound, "layer_python", backward_bound
    )


def load(modules: Iterable[str]) -> None:
    """Import each plugin module (which registers its layers)."""
    for name in modules:
        with importable_from_cwd():
            try:
                importlib.import_module(name)
            except Exception as exc:
                raise UsageError(
                    f"--layer-plugin {name!r}: importing it failed: {type(exc).__name__}: {exc}"
                ) from None


def unsupported(specs: Iterable[LayerSpec]) -> list[str]:
    """The layers of `specs` the reference cannot judge, each as "name (type)"."""
    out = []
    for spec in specs:
        if spec.type not in LAYERS:
            out.append(f"{spec.name} ({spec.type})")
        elif spec.type == "Python":
            p = spec.param("python_param")
            key = (str(p["module"]), str(p["layer"]))
            if key not in PYTHON_LAYERS or key not in PYTHON_BOUNDS:
                out.append(f"{spec.name} (Python layer {key[0]}.{key[1]})")
    return out
