"""Build pycaffe for one interpreter: build dependencies, CMake, make, and the entry's files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import NeedsRoot, ProvisionError
from . import pins
from .progress import Progress
from .variants import DEFAULT, VARIANTS, Variant


@dataclass(frozen=True)
class Interpreter:
    """The Python that will import pycaffe, and what the build takes from it."""

    executable: str
    version: str
    soabi: str
    include_dir: str
    library: str
    numpy_version: str
    numpy_include: str

    @property
    def numpy_major(self) -> int:
        return int(self.numpy_version.split(".")[0])

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def current_interpreter() -> Interpreter:
    """Describe the running interpreter. numpy must be importable: pycaffe compiles against it."""
    try:
        import numpy
    except ImportError:
        raise ProvisionError(
            f"numpy is not installed in {sys.executable}; pycaffe is compiled against it"
        ) from None
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [
        Path(libdir) / (sysconfig.get_config_var("LDLIBRARY") or ""),
        Path(libdir) / f"libpython{ver}.so",
        Path(libdir) / (sysconfig.get_config_var("MULTIARCH") or "") / f"libpython{ver}.so",
    ]
    library = next((str(p) for p in candidates if p.name.endswith(".so") and p.is_file()), None)
    if library is None:
        raise ProvisionError(
            f"no shared libpython{ver}.so found for {sys.executable} (looked in {libdir}); "
            f"on Debian install libpython{ver}-dev"
        )
    return Interpreter(
        executable=sys.executable,
        version=sys.version.split()[0],
        soabi=sysconfig.get_config_var("SOABI") or f"cpython-{ver}",
        include_dir=sysconfig.get_paths()["include"],
        library=library,
        numpy_version=numpy.__version__,
        numpy_include=numpy.get_include(),
    )


def key_inputs(interp: Interpreter, variant: Variant = VARIANTS[DEFAULT]) -> dict[str, Any]:
    """Everything that decides the bytes of a build: the cache key is the hash of this."""
    inputs = {
        "source": pins.SOURCE_FILES,
        "compat": [list(p) for p in pins.COMPAT_PATCHES],
        "python_abi": interp.soabi,
        "numpy_major": interp.numpy_major,
        "cmake_flags": list(pins.CMAKE_FLAGS),
        "recipe": pins.RECIPE_VERSION,
    }
    if variant.name != DEFAULT:  # the default's key predates variants and stays as it was
        inputs["variant"] = variant.key_inputs()
    return inputs


# ---- build dependencies -------------------------------------------------------------------


def missing_build_depends(packages: tuple[str, ...] = pins.BUILD_DEPENDS) -> list[str]:
    """The Debian packages among `packages` that are not installed."""
    if shutil.which("dpkg-query") is None:
        raise ProvisionError("dpkg-query not found: building Caffe needs a Debian system")
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n", *packages],
        capture_output=True,
        text=True,
    )
    installed = {
        line.split()[0].split(":")[0]
        for line in proc.stdout.splitlines()
        if len(line.split()) >= 2 and line.split()[1].startswith("ii")
    }
    return [p for p in packages if p not in installed]


def apt_install_command(packages: list[str]) -> str:
    return "apt-get update && apt-get install -y --no-install-recommends " + " ".join(packages)


def install_build_depends(progress: Progress, extra: tuple[str, ...] = ()) -> None:
    packages = pins.BUILD_DEPENDS + extra
    missing = missing_build_depends(packages)
    if not missing:
        return
    if os.geteuid() != 0:
        raise NeedsRoot(
            "Caffe's build dependencies are missing: "
            + " ".join(missing)
            + ". Install them as root, then run this again:\n  sudo sh -c '"
            + apt_install_command(missing)
            + "'"
        )
    progress.stage("deps", "apt-get install " + " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "-q", "update"],
        ["apt-get", "-q", "install", "-y", "--no-install-recommends", *missing],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise ProvisionError(f"{' '.join(cmd[:3])} failed (exit {proc.returncode}):\n{tail}")
    still = missing_build_depends(packages)
    if still:
        raise ProvisionError("apt-get finished but these are still missing: " + " ".join(still))


# ---- CMake and make -----------------------------------------------------------------------


def cmake_command(
    src: Path, interp: Interpreter, variant: Variant = VARIANTS[DEFAULT]
) -> list[str]:
    ver = ".".join(interp.version.split(".")[:2])
    return [
        "cmake",
        str(src),
        *variant.cmake_flags(pins.CMAKE_FLAGS),
        f"-Dpython_version={ver}",
        f"-DPYTHON_EXECUTABLE={interp.executable}",
        f"-DPYTHON_INCLUDE_DIR={interp.include_dir}",
        f"-DPYTHON_LIBRARY={interp.library}",
    ]


_PCT = re.compile(r"^\[\s*(\d+)%\]\s*(.*)$")


def _run_logged(
    cmd: list[str], cwd: Path, log: Path, what: str, progress: Progress | None = None
) -> None:
    """Run `cmd`, all output to `log`; feed make's [NN%] lines to `progress`."""
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            m = _PCT.match(line)
            if m and progress is not None:
                progress.percent(int(m.group(1)), m.group(2).rsplit("/", 1)[-1])
        rc = proc.wait()
    if rc != 0:
        lines = log.read_text(errors="replace").splitlines()
        errors = [ln for ln in lines if "error" in ln.lower()][-10:] or lines[-20:]
        raise ProvisionError(f"{what} failed (exit {rc}); full log: {log}\n" + "\n".join(errors))


def configure(
    src: Path,
    build: Path,
    interp: Interpreter,
    progress: Progress,
    key: str,
    variant: Variant = VARIANTS[DEFAULT],
) -> None:
    """Run CMake unless this build tree is already configured for cache key `key`.

    Interpreters with the same key (same ABI, same numpy major) build interchangeable
    products, so a tree configured by one serves the others; re-running CMake with another
    interpreter's numpy include path would recompile everything for nothing.
    """
    stamp = build / "crossval-configured"
    if (build / "CMakeCache.txt").is_file() and stamp.is_file() and stamp.read_text() == key:
        return
    progress.stage("configure", f"cmake, variant {variant.name}: {variant.purpose}")
    build.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    _run_logged(cmake_command(src, interp, variant), build, build / "cmake.log", "cmake")
    stamp.write_text(key)


def compile_caffe(build: Path, progress: Progress, jobs: int | None = None) -> None:
    jobs = jobs or os.cpu_count() or 2
    progress.stage("build", f"make -j{jobs} " + " ".join(pins.MAKE_TARGETS))
    _run_logged(
        ["make", f"-j{jobs}", *pins.MAKE_TARGETS], build, build / "make.log", "make", progress
    )
    progress.percent(100)


# ---- assembling an entry ------------------------------------------------------------------


def _cmake_cache(build: Path) -> dict[str, str]:
    out = {}
    path = build / "CMakeCache.txt"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            m = re.match(r"^([A-Za-z_][\w.-]*):[A-Z]+=(.*)$", line)
            if m:
                out[m.group(1)] = m.group(2)
    return out


def assemble(
    src: Path, build: Path, staging: Path, bundle: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """Copy pycaffe into `staging`/caffe with libcaffe beside _caffe.so (RUNPATH $ORIGIN).

    Libraries in `bundle` are copied there too, under their file names, so the dynamic
    loader takes them before the system's.

    Returns build facts for the manifest.
    """
    pkg_src = src / "python" / "caffe"
    pkg = staging / "caffe"
    for path in pkg_src.rglob("*"):
        rel = path.relative_to(pkg_src)
        if rel.parts[0] == "test" or "__pycache__" in rel.parts:
            continue
        if path.is_file() and not path.is_symlink() and path.suffix in (".py", ".npy"):
            (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, pkg / rel)
    proto_dir = pkg / "proto"
    proto_dir.mkdir(parents=True, exist_ok=True)
    (proto_dir / "__init__.py").touch()
    generated = list((build / "include" / "caffe" / "proto").glob("*_pb2.py"))
    if not generated:
        raise ProvisionError(f"no generated caffe_pb2.py under {build}/include/caffe/proto")
    for path in generated:
        shutil.copy2(path, proto_dir / path.name)
    lib = build / "lib"
    pycaffe = lib / "_caffe.so"
    libcaffe = sorted(p for p in lib.glob("libcaffe.so.*") if not p.is_symlink())
    if not pycaffe.is_file() or not libcaffe:
        raise ProvisionError(f"build products missing in {lib}: _caffe.so and libcaffe.so.*")
    shutil.copy2(pycaffe.resolve(), pkg / "_caffe.so")
    for path in libcaffe:
        shutil.copy2(path, pkg / path.name)
    for lib_path in bundle:
        if not os.path.isfile(lib_path):
            raise ProvisionError(f"library to bundle not found: {lib_path}")
        shutil.copy2(os.path.realpath(lib_path), pkg / os.path.basename(lib_path))
    # The build tree's RUNPATH names the build directory; the entry must not depend on it.
    for path in [pkg / "_caffe.so", *(pkg / p.name for p in libcaffe)]:
        proc = subprocess.run(
            ["patchelf", "--set-rpath", "$ORIGIN", str(path)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise ProvisionError(f"patchelf failed on {path}: {proc.stderr.strip()}")
    cache = _cmake_cache(build)
    return {
        "cmake": {
            k: cache.get(k, "")
            for k in (
                "CPU_ONLY",
                "BLAS",
                "USE_CUDNN",
                "USE_OPENCV",
                "USE_LEVELDB",
                "USE_LMDB",
                "BUILD_python_layer",
                "CMAKE_BUILD_TYPE",
                "CMAKE_CXX_COMPILER",
                "CMAKE_CXX_FLAGS",
                "CMAKE_CXX_FLAGS_RELEASE",
                "OpenBLAS_LIB",
            )
        },
        "bundled": {os.path.basename(p): _debian_package_of(p) for p in bundle},
        "compiler": compiler_version(cache.get("CMAKE_CXX_COMPILER", "c++")),
        "libprotobuf": debian_package_version("libprotobuf-dev"),
        "libopenblas": debian_package_version("libopenblas-dev"),
        "boost": debian_package_version("libboost-python-dev"),
    }


def _debian_package_of(path: str) -> str:
    """'<package> <version>' of the Debian package that installed `path` (or its target)."""
    if shutil.which("dpkg-query") is None:
        return ""
    for candidate in (path, os.path.realpath(path)):
        proc = subprocess.run(["dpkg-query", "-S", candidate], capture_output=True, text=True)
        if proc.returncode == 0:
            pkg = proc.stdout.split(":")[0].strip()
            return f"{pkg} {debian_package_version(pkg)}".strip()
    return ""


def compiler_version(compiler: str) -> str:
    try:
        proc = subprocess.run([compiler, "--version"], capture_output=True, text=True)
    except OSError:
        return ""
    return proc.stdout.splitlines()[0].strip() if proc.stdout else ""


def debian_package_version(package: str) -> str:
    if shutil.which("dpkg-query") is None:
        return ""
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True
    )
    return proc.stdout.strip() if proc.returncode == 0 else ""
