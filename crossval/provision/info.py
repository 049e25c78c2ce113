"""`crossval caffe info`: what the Caffe in use is, and how it was built."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from . import CaffeInstall, pins
from .build import debian_package_version


def _cmake_cache_near(pycaffe_so: Path) -> Path | None:
    """A source-tree build links python/caffe/_caffe.so to <build>/lib/_caffe.so."""
    for cand in (
        pycaffe_so.parent.parent / "CMakeCache.txt",
        pycaffe_so.parents[2] / "build" / "CMakeCache.txt",
    ):
        if cand.is_file():
            return cand
    return None


def _elf_comment(path: str) -> str:
    if not path or shutil.which("readelf") is None:
        return ""
    proc = subprocess.run(["readelf", "-p", ".comment", path], capture_output=True, text=True)
    found = re.findall(r"\]\s+(GCC:.*|clang.*)$", proc.stdout, flags=re.M)
    return found[0].strip() if found else ""


def _package_of(path: str) -> str:
    if not path or shutil.which("dpkg-query") is None:
        return ""
    proc = subprocess.run(["dpkg-query", "-S", path], capture_output=True, text=True)
    if proc.returncode != 0:
        return ""
    pkg = proc.stdout.split(":")[0].strip()
    ver = debian_package_version(pkg)
    return f"{pkg} {ver}".strip()


def collect(install: CaffeInstall) -> dict[str, Any]:
    """Describe `install`: imports it in a child process; build facts from its manifest."""
    live = install.describe()
    libs = live["libraries"]
    info: dict[str, Any] = {
        "origin": install.origin,
        "path": str(install.python_path),
        "caffe_package": live["caffe_file"],
        "caffe_version": live["caffe_version"],
        "python": live["python"],
        "python_executable": live["python_executable"],
        "numpy": live["numpy"],
        "protobuf_python": live["protobuf_python"],
        "blas_library": live["blas_library"],
        "blas": live["openblas_config"] or _package_of(live["blas_library"]),
        "libprotobuf": _package_of(libs.get("libprotobuf", "")) or libs.get("libprotobuf", ""),
        "layer_types": len(live["layer_types"]),
    }
    if install.origin == "cache":
        m = install.manifest
        info.update(
            cache_key=install.key,
            variant=m.get("variant", "default"),
            bundled=m.get("build", {}).get("bundled", {}),
            source_package=m.get("source_package", ""),
            source_revision=m.get("upstream_revision", ""),
            compiler=m.get("build", {}).get("compiler", ""),
            build_flags=m.get("build", {}).get("cmake", {}),
            built_with_numpy=m.get("interpreter", {}).get("numpy_version", ""),
        )
    else:
        flags: dict[str, str] = {}
        cmake_cache = _cmake_cache_near(Path(live["pycaffe_so"]))
        if cmake_cache is not None:
            for line in cmake_cache.read_text(errors="replace").splitlines():
                mt = re.match(
                    r"^(CPU_ONLY|BLAS|USE_CUDNN|USE_OPENCV|USE_LEVELDB|USE_LMDB|"
                    r"BUILD_python_layer|CMAKE_BUILD_TYPE|CMAKE_CXX_COMPILER):\w+=(.*)$",
                    line,
                )
                if mt:
                    flags[mt.group(1)] = mt.group(2)
        info.update(
            source_package="unknown (external build)",
            source_revision="unknown (external build)",
            compiler=_elf_comment(libs.get("libcaffe", "") or live["pycaffe_so"]),
            build_flags=flags or {"note": "no CMakeCache.txt found beside this build"},
        )
    return info


def format_text(info: dict[str, Any]) -> str:
    order = [
        "origin",
        "path",
        "caffe_version",
        "source_package",
        "source_revision",
        "cache_key",
        "variant",
        "python",
        "python_executable",
        "numpy",
        "built_with_numpy",
        "protobuf_python",
        "libprotobuf",
        "blas",
        "blas_library",
        "bundled",
        "compiler",
        "layer_types",
        "build_flags",
    ]
    width = max(len(k) for k in order)
    lines = []
    for key in order:
        if key not in info:
            continue
        value = info[key]
        if isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in value.items())
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)


__all__ = ["collect", "format_text", "pins"]
