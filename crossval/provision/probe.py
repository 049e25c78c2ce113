"""Run inside a child interpreter: import pycaffe from a given directory and describe it.

``python -m crossval.provision.probe DIR`` prints one JSON object on stdout. It is always
run in a separate process, so a pycaffe that aborts on import cannot take the caller down.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys


def _loaded_libraries() -> dict[str, str]:
    wanted = (
        "libcaffe",
        "libopenblas",
        "libblas",
        "libcblas",
        "libprotobuf.",
        "libglog",
        "libboost_python",
        "libpython",
    )
    found: dict[str, str] = {}
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if line.count("/") else ""
                name = os.path.basename(path)
                for w in wanted:
                    if name.startswith(w) and w not in found:
                        found[w.rstrip(".")] = os.path.realpath(path)
    except OSError:
        pass
    return found


def _openblas_config(path: str) -> str:
    try:
        lib = ctypes.CDLL(path)
        fn = lib.openblas_get_config
        fn.restype = ctypes.c_char_p
        return (fn() or b"").decode()
    except (OSError, AttributeError):
        return ""


def _load_libraries(directory: str) -> None:
    """dlopen the package's own shared libraries one by one, saying which on stderr first, so
    a crash while loading one (SIGBUS on a truncated file) leaves its name behind."""
    pkg = os.path.join(directory, "caffe")
    names = sorted(n for n in os.listdir(pkg) if n.startswith("lib") and ".so" in n)
    for name in [*names, "_caffe.so"]:
        path = os.path.join(pkg, name)
        if os.path.isfile(path):
            print(f"loading {path}", file=sys.stderr, flush=True)
            ctypes.CDLL(path)


def main(directory: str) -> None:
    os.environ.setdefault("GLOG_minloglevel", "2")
    _load_libraries(directory)
    sys.path.insert(0, directory)
    import caffe  # after the sys.path change above
    import numpy

    libs = _loaded_libraries()
    blas_path = libs.get("libopenblas") or libs.get("libblas") or libs.get("libcblas") or ""
    try:
        from google import protobuf

        protobuf_python = protobuf.__version__
    except ImportError:
        protobuf_python = ""
    out = {
        "caffe_file": os.path.realpath(caffe.__file__),
        "caffe_version": getattr(caffe, "__version__", ""),
        "pycaffe_so": os.path.realpath(caffe._caffe.__file__),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "numpy": numpy.__version__,
        "protobuf_python": protobuf_python,
        "libraries": libs,
        "blas_library": blas_path,
        "openblas_config": _openblas_config(blas_path) if "openblas" in blas_path else "",
        "layer_types": sorted(caffe.layer_type_list()),
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
