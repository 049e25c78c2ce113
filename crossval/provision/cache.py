"""The build cache: where entries live, their key, validation, locking and atomic publishing.

Layout under ``cache_root()``::

    caffe/downloads/            the three pinned source files (verified on every use)
    caffe/apt/                  apt's private lists and cache
    caffe/build/<key>/          unpacked source and CMake build tree (incremental)
    caffe/entries/<key>/        a finished pycaffe: caffe/ package + manifest.json
    caffe/locks/<key>.lock      held while an entry is built

An entry is only ever created by renaming a fully written and checked staging directory,
and is taken as good only when every file matches the SHA-256 in its manifest.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .progress import Progress
from .source import sha256_file

MANIFEST = "manifest.json"


def cache_root() -> Path:
    """CROSSVAL_CACHE_DIR, else $XDG_CACHE_HOME/crossval, else ~/.cache/crossval."""
    explicit = os.environ.get("CROSSVAL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "crossval").resolve()


def cache_key(inputs: dict[str, Any]) -> str:
    """16 hex digits of the SHA-256 of the canonical JSON of everything that decides a build."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def caffe(self) -> Path:
        return self.root / "caffe"

    @property
    def downloads(self) -> Path:
        return self.caffe / "downloads"

    @property
    def apt(self) -> Path:
        return self.caffe / "apt"

    def build(self, key: str) -> Path:
        return self.caffe / "build" / key

    def entry(self, key: str) -> Path:
        return self.caffe / "entries" / key

    def lock(self, key: str) -> Path:
        return self.caffe / "locks" / f"{key}.lock"


class InvalidEntry(Exception):
    """A cache entry that must not be used; the message says why."""


def write_manifest(entry: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Record every file of `entry` with size and SHA-256, plus `meta`. Written last."""
    files = {}
    for path in sorted(p for p in entry.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(entry).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = dict(meta, files=files)
    tmp = entry / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, entry / MANIFEST)
    return manifest


def read_entry(entry: Path, key: str) -> dict[str, Any]:
    """Return the manifest of a complete, intact entry, or raise InvalidEntry saying why."""
    if not entry.is_dir():
        raise InvalidEntry(f"{entry} does not exist")
    try:
        manifest: dict[str, Any] = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        raise InvalidEntry(f"{entry} has no {MANIFEST} (half-written)") from None
    except (OSError, ValueError) as exc:
        raise InvalidEntry(f"{entry / MANIFEST} is unreadable: {exc}") from None
    if manifest.get("key") != key:
        raise InvalidEntry(f"{entry} was built for key {manifest.get('key')}, not {key}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise InvalidEntry(f"{entry / MANIFEST} lists no files")
    for rel, rec in files.items():
        path = entry / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise InvalidEntry(f"{path} is missing") from None
        if size != rec["size"]:
            raise InvalidEntry(f"{path} has {size} bytes, the manifest says {rec['size']}")
        if sha256_file(path) != rec["sha256"]:
            raise InvalidEntry(f"{path} does not match its SHA-256 in the manifest")
    return manifest


def publish(staging: Path, entry: Path) -> None:
    """Move a finished staging directory into place; an old (invalid) entry is set aside first."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    aside = None
    if entry.exists():
        aside = entry.with_name(f"{entry.name}.stale-{os.getpid()}")
        os.replace(entry, aside)
    os.replace(staging, entry)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def remove_leftovers(entries_dir: Path, key: str) -> list[Path]:
    """Delete staging or set-aside directories of `key` left by interrupted runs.

    Only called with the key's lock held, so no live build owns them.
    """
    removed = []
    if entries_dir.is_dir():
        for p in entries_dir.iterdir():
            if p.name.startswith(f"{key}.") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def locked(path: Path, progress: Progress) -> Iterator[None]:
    """An exclusive advisory lock on `path`; says so when it has to wait for another process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            progress.note(f"waiting for {holder} to finish building into this cache entry")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
