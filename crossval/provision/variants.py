"""Named builds of the one pinned Caffe source: the default, and variants beside it.

A variant changes CMake flags, edits source lines, or bundles a shared library into the
entry (found first through the entry's RUNPATH $ORIGIN). Each variant is its own cache entry:
its definition goes into the cache key, the default's key is unchanged by this module.

`crossval caffe ensure --variant NAME` builds one; `crossval check-build` compares builds.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from typing import Any

from ..errors import ProvisionError


@dataclass(frozen=True)
class Variant:
    name: str
    purpose: str
    cmake: tuple[tuple[str, str], ...] = ()  # CMake cache entries set or overridden
    edits: tuple[tuple[str, str, str], ...] = ()  # (file, exact old text, new text)
    build_depends: tuple[str, ...] = ()  # Debian packages needed on top of pins.BUILD_DEPENDS
    bundle: tuple[str, ...] = ()  # shared libraries copied into the entry ({multiarch} expands)
    deliberately_wrong: bool = False

    def key_inputs(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cmake": [list(c) for c in self.cmake],
            "edits": [list(e) for e in self.edits],
            "bundle": list(self.bundle),
        }

    def cmake_flags(self, base: tuple[str, ...]) -> list[str]:
        """`base` with this variant's entries replacing those of the same name, others added."""
        override = {k: _expand(v) for k, v in self.cmake}
        out = []
        for flag in base:
            name = flag[2:].split("=", 1)[0]
            if name in override:
                out.append(f"-D{name}={override.pop(name)}")
            else:
                out.append(flag)
        return out + [f"-D{k}={override[k]}" for k, _ in self.cmake if k in override]

    def bundled_paths(self) -> list[str]:
        return [_expand(p) for p in self.bundle]


def _expand(text: str) -> str:
    return text.replace("{multiarch}", sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu")


DEFAULT = "default"

_NETLIB = "/usr/lib/{multiarch}/blas/libblas.so.3"

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(DEFAULT, "CPU only, OpenBLAS, Python layer on (what every other command uses)"),
        Variant(
            "reference-blas",
            "the Netlib reference BLAS (Debian libblas3) in place of OpenBLAS, bundled in the "
            "entry so Debian's BLAS alternative (usually OpenBLAS) cannot take its place",
            cmake=(
                ("BLAS", "Generic"),
                ("BLA_VENDOR", "Generic"),
                ("BLAS_LIBRARIES", "/usr/lib/{multiarch}/blas/libblas.so"),
            ),
            build_depends=("libblas-dev",),
            bundle=(_NETLIB,),
        ),
        Variant(
            "no-python-layer",
            "without Caffe's Python layer (BUILD_python_layer=OFF, as some packaged builds are): "
            "the SmoothL1 loss cannot run on it",
            cmake=(("BUILD_python_layer", "OFF"),),
            # Upstream links Boost.Python into libcaffe only for the Python layer, and never
            # into _caffe.so: without this edit the module fails to import (undefined
            # boost::python symbols).
            edits=(
                (
                    "python/CMakeLists.txt",
                    "target_link_libraries(pycaffe PUBLIC ${Caffe_LINK} ${PYTHON_LIBRARIES})",
                    "target_link_libraries(pycaffe PUBLIC ${Caffe_LINK} ${PYTHON_LIBRARIES} "
                    "${Boost_LIBRARIES})",
                ),
            ),
        ),
        Variant(
            "softmax-backward-regression",
            "DELIBERATELY WRONG, for testing check-build: Softmax's backward leaves the last "
            "class out of dot(top_diff, top_data)",
            edits=(
                (
                    "src/caffe/layers/softmax_layer.cpp",
                    "scale_data[k] = caffe_cpu_strided_dot<Dtype>(channels,",
                    "scale_data[k] = caffe_cpu_strided_dot<Dtype>(channels - 1,",
                ),
            ),
            deliberately_wrong=True,
        ),
    )
}


def get(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ProvisionError(f"no build variant {name!r}; known: {', '.join(VARIANTS)}") from None


__all__ = ["DEFAULT", "VARIANTS", "Variant", "get"]
