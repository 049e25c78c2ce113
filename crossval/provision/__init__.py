"""Provisioning of real BVLC Caffe (pycaffe) for the running interpreter.

``ensure()`` returns a usable pycaffe: an external one chosen by the user (``--caffe PATH``
or ``CROSSVAL_CAFFE``), else the cached build for this interpreter, building it first if
needed. ``locate()`` does the same without ever building.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CaffeNotAvailable, ProvisionError
from . import build, cache, pins, source, variants
from .progress import Progress

ENV_CAFFE = "CROSSVAL_CAFFE"


@dataclass
class CaffeInstall:
    """A pycaffe to use: `python_path` is the directory that holds the `caffe` package."""

    python_path: Path
    origin: str  # "cache" or "external"
    key: str = ""
    variant: str = ""  # the build variant of a cached entry
    manifest: dict[str, Any] = field(default_factory=dict)
    cached: bool = False  # served from the cache without building
    probed: dict[str, Any] = field(default_factory=dict)  # `probe`'s description, if taken

    def describe(self) -> dict[str, Any]:
        """`probe`'s description of this pycaffe (imported in a child process once)."""
        if not self.probed:
            self.probed = probe(self.python_path)
        return self.probed

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a child process that imports this pycaffe, with Caffe's log quiet."""
        env = dict(os.environ if base is None else base)
        parts = [str(self.python_path)] + [p for p in env.get("PYTHONPATH", "").split(":") if p]
        env["PYTHONPATH"] = ":".join(parts)
        env.setdefault("GLOG_minloglevel", "2")
        return env


def external_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The user's chosen pycaffe directory, from the argument or CROSSVAL_CAFFE, if any."""
    chosen = explicit if explicit is not None else os.environ.get(ENV_CAFFE) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser().resolve()
    # Accept the package directory itself (.../python/caffe) as well as its parent.
    if (path / "__init__.py").is_file() and path.name == "caffe":
        path = path.parent
    return path


def probe(python_path: Path, timeout: float = 120.0) -> dict[str, Any]:
    """Import pycaffe from `python_path` in a child process and describe it.

    Raises CaffeNotAvailable with the child's last error lines when it fails to import
    (including aborts and crashes).
    """
    if not (python_path / "caffe").is_dir():
        raise CaffeNotAvailable(f"{python_path} holds no `caffe` package (no {python_path}/caffe)")
    env = dict(os.environ, GLOG_minloglevel="2")
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = ":".join([pkg_root, *filter(None, env.get("PYTHONPATH", "").split(":"))])
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "crossval.provision.probe", str(python_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise CaffeNotAvailable(
            f"importing pycaffe from {python_path} hung for {timeout:.0f}s"
        ) from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        if lines and lines[-1].startswith("loading ") and proc.returncode < 0:
            lines[-1] = "crashed while " + lines[-1]
        else:
            lines = [ln for ln in lines if not ln.startswith("loading ")]
            if not lines:
                lines = ["no output: it died while importing caffe"]
        how = f"exit {proc.returncode}"
        if proc.returncode < 0:
            try:
                how = f"killed by {signal.Signals(-proc.returncode).name}"
            except ValueError:
                how = f"killed by signal {-proc.returncode}"
        raise CaffeNotAvailable(
            f"pycaffe at {python_path} does not work ({how}):\n  " + "\n  ".join(lines[-6:])
        )
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _use_external(path: Path) -> CaffeInstall:
    return CaffeInstall(python_path=path, origin="external", probed=probe(path))


def _cached(layout: cache.Layout, key: str, variant: str) -> CaffeInstall | None:
    entry = layout.entry(key)
    try:
        manifest = cache.read_entry(entry, key)
    except cache.InvalidEntry:
        return None
    return CaffeInstall(
        python_path=entry,
        origin="cache",
        key=key,
        variant=variant,
        manifest=manifest,
        cached=True,
    )


def locate(
    caffe: str | os.PathLike[str] | None = None, variant: str = variants.DEFAULT
) -> CaffeInstall:
    """The pycaffe to use, without building anything; CaffeNotAvailable if there is none."""
    ext = external_path(caffe)
    if ext is not None:
        return _use_external(ext)
    interp = build.current_interpreter()
    key = cache.cache_key(build.key_inputs(interp, variants.get(variant)))
    found = _cached(cache.Layout(cache.cache_root()), key, variant)
    if found is None:
        how = "" if variant == variants.DEFAULT else f" --variant {variant}"
        raise CaffeNotAvailable(
            f"no Caffe{how and ' (' + variant + ')'} is provisioned for {interp.executable} "
            f"(numpy {interp.numpy_version}); run `crossval caffe ensure{how}`, or select a "
            f"build with --caffe PATH / {ENV_CAFFE}=PATH"
        )
    return found


def ensure(
    caffe: str | os.PathLike[str] | None = None,
    quiet: bool = False,
    progress: Progress | None = None,
    jobs: int | None = None,
    install_runtime: bool = True,
    variant: str = variants.DEFAULT,
) -> CaffeInstall:
    """Return a working pycaffe, building and caching it for this interpreter if needed.

    `variant` names a build of the same source from ``variants.VARIANTS``.
    """
    chosen = variants.get(variant)
    progress = progress or Progress(quiet=quiet)
    if install_runtime:
        install_runtime_depends(progress)
    ext = external_path(caffe)
    if ext is not None:
        progress.stage("check", f"external pycaffe at {ext}")
        return _use_external(ext)
    interp = build.current_interpreter()
    key = cache.cache_key(build.key_inputs(interp, chosen))
    layout = cache.Layout(cache.cache_root())
    found = _cached(layout, key, variant)
    if found is None:
        with cache.locked(layout.lock(key), progress):
            found = _cached(layout, key, variant)  # another process may have built it meanwhile
            if found is None:
                found = _build(layout, key, interp, progress, jobs, chosen)
    return found


def _build(
    layout: cache.Layout,
    key: str,
    interp: build.Interpreter,
    progress: Progress,
    jobs: int | None,
    variant: variants.Variant,
) -> CaffeInstall:
    entry = layout.entry(key)
    reason = "not built yet"
    if entry.exists():
        try:
            cache.read_entry(entry, key)
        except cache.InvalidEntry as exc:
            reason = f"cache entry rejected: {exc}"
    progress.stage(
        "provision",
        f"building pycaffe ({variant.name}) for {interp.executable} (key {key}; {reason})",
    )
    cache.remove_leftovers(entry.parent, key)
    build.install_build_depends(progress, variant.build_depends)
    downloads = source.fetch(layout.downloads, layout.apt, progress)
    source.verify(downloads)
    work = layout.build(key)
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()  # CMake must see the same paths every time, or it rebuilds all
    src = source.unpack(downloads, work / "src", progress, variant.edits)
    build.configure(src, work / "build", interp, progress, key, variant)
    build.compile_caffe(work / "build", progress, jobs)
    progress.stage("assemble", f"{entry}")
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f"{key}.partial-"))
    try:
        facts = build.assemble(src, work / "build", staging, variant.bundled_paths())
        progress.stage("check", "importing the new pycaffe in a child process")
        info = probe(staging)
        meta = {
            "key": key,
            "key_inputs": build.key_inputs(interp, variant),
            "variant": variant.name,
            "variant_purpose": variant.purpose,
            "source_package": f"{pins.SOURCE_PACKAGE} {pins.SOURCE_VERSION}",
            "upstream_revision": pins.UPSTREAM_REVISION,
            "interpreter": interp.as_dict(),
            "build": facts,
            "layer_types": len(info["layer_types"]),
        }
        manifest = cache.write_manifest(staging, meta)
        cache.publish(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress.finish(f"built and cached pycaffe at {entry}")
    return CaffeInstall(
        python_path=entry, origin="cache", key=key, variant=variant.name, manifest=manifest
    )


def install_runtime_depends(progress: Progress) -> list[str]:
    """pip-install pycaffe's import-time dependencies that the running interpreter lacks."""
    missing = [pip for pip, mod in pins.PYCAFFE_RUNTIME if not _importable(mod)]
    if missing:
        progress.note("installing pycaffe's Python dependencies: " + " ".join(missing))
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", *missing], capture_output=True, text=True
        )
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
            raise ProvisionError(f"pip install {' '.join(missing)} failed:\n{tail}")
    return missing


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
