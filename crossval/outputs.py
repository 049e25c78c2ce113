"""Every file crossval writes goes through here.

The policy, for every command and every output:

- an existing path is never replaced without ``--force``;
- an output that is one of the command's inputs is refused, even with ``--force``;
- a directory where a file is expected, a missing parent directory or a place that cannot
  be written is refused up front (`target`, `directory`), before any long work runs;
- the content goes to a unique temporary file in the target's directory, is fsynced and
  only then renamed into place; when the target must not exist the last step is exclusive
  (a hard link), so of two concurrent runs exactly one wins and the other gets an error;
- a failed write (full disk, I/O error) leaves neither a temporary file nor a damaged
  target, and the content is not lost: text is printed to stdout, anything else is kept in
  the system's temporary directory, and the error says which.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CrossvalError, raise_if_interrupted


class OutputError(CrossvalError):
    """An output cannot be written where it was asked for (exit status 2). `kept`: where
    its content was kept instead, if it was."""

    def __init__(self, message: str, kept: str = "") -> None:
        super().__init__(message)
        self.kept = kept


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _probe(directory: Path, label: str, path: Path) -> None:
    """Can a file be created in `directory`? (os.access says yes to root on a read-only
    file system; creating one is the only honest test.)"""
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".crossval-probe-")
    except OSError as exc:
        raise OutputError(
            f"{label} {path}: cannot write in {directory}: {exc.strerror or exc}"
        ) from None
    os.close(fd)
    os.unlink(tmp)


@dataclass(frozen=True)
class Target:
    """A file to write, checked by `target` (or `Directory.file`)."""

    path: Path
    label: str
    force: bool = False
    inputs: tuple[Path, ...] = ()
    make_parent: bool = False

    def check(self) -> Target:
        path, label = self.path, self.label
        for given in self.inputs:
            if _same(path, given):
                raise OutputError(
                    f"{label} {path} is one of the inputs of this command ({given}); "
                    "choose another path (--force does not change this)"
                )
        if path.is_dir():
            raise OutputError(f"{label} {path} is a directory; give a file path")
        if (path.exists() or path.is_symlink()) and not self.force:
            raise OutputError(f"{label} {path} exists; not overwriting it (use --force)")
        parent = path.parent
        if self.make_parent:
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
        if not parent.is_dir():
            what = "is not a directory" if parent.exists() else "does not exist"
            raise OutputError(f"{label} {path}: its directory {parent} {what}")
        _probe(parent, label, path)
        return self


def target(
    path: str | os.PathLike[str],
    label: str,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> Target:
    """Check the output `path` (named `label` in messages, e.g. "--json") now, before the
    command's work: raises OutputError if the policy refuses it."""
    given = tuple(Path(p) for p in inputs if p)
    return Target(Path(path), label, force, given).check()


@dataclass(frozen=True)
class Directory:
    """A directory of outputs (report --out, train --out, golden --out, ...): it is a
    directory or can be made (its parent exists), and the files a command will write
    there exist only with ``--force``."""

    path: Path
    label: str
    force: bool = False
    inputs: tuple[Path, ...] = field(default=())
    nested: bool = False

    def file(self, name: str) -> Target:
        return Target(self.path / name, self.label, self.force, self.inputs, make_parent=True)

    def sub(self, name: str) -> Directory:
        return Directory(self.path / name, self.label, self.force, self.inputs, nested=True)

    def make(self) -> Path:
        try:
            self.path.mkdir(parents=self.nested, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"{self.label} {self.path}: cannot make the directory: {exc.strerror or exc}"
            ) from None
        return self.path


def directory(
    path: str | os.PathLike[str],
    label: str,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    names: Iterable[str] = (),
    empty: bool = False,
) -> Directory:
    """Check the output directory `path` now. `names` are the files the command will write
    in it (each refused if it exists, unless `force`); with `empty`, a directory holding
    anything at all is refused unless `force`."""
    d = Directory(Path(path), label, force, tuple(Path(p) for p in inputs if p))
    p = d.path
    if p.exists() and not p.is_dir():
        raise OutputError(f"{label} {p} is a file, not a directory; give a directory")
    if p.is_dir():
        _probe(p, label, p)
        if empty and not force and any(p.iterdir()):
            raise OutputError(f"{label} {p} is not empty; not writing into it (use --force)")
        for name in names:
            d.file(name).check()
    else:
        parent = p.parent
        if not parent.is_dir():
            what = "is not a directory" if parent.exists() else "does not exist"
            raise OutputError(f"{label} {p}: its parent directory {parent} {what}")
        _probe(parent, label, p)
        for given in d.inputs:
            if given.resolve() == p.resolve():
                raise OutputError(f"{label} {p} is one of the inputs of this command")
    return d


def _mode(path: Path) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(t: Target, tmp: str) -> None:
    """Move the complete, fsynced `tmp` to `t.path`: replacing it with force, exclusively
    (the loser of a race gets OutputError) without. Nothing is published after Ctrl-C."""
    raise_if_interrupted()
    os.chmod(tmp, _mode(t.path))
    if t.force:
        if t.path.is_dir():
            raise OutputError(f"{t.label} {t.path} is now a directory; not replacing it")
        os.replace(tmp, t.path)
    else:
        try:
            os.link(tmp, t.path)
        except FileExistsError:
            raise OutputError(
                f"{t.label} {t.path} was created by something else while crossval worked "
                "(another run?); not replacing it (use --force)"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # No hard links here: claim the name exclusively, then rename over the claim.
            try:
                os.close(os.open(t.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                raise OutputError(
                    f"{t.label} {t.path} was created by something else while crossval "
                    "worked (another run?); not replacing it (use --force)"
                ) from None
            os.replace(tmp, t.path)
        else:
            os.unlink(tmp)
    _fsync_dir(t.path.parent)


def _fresh(t: Target) -> str:
    """A unique temporary file next to `t.path` (its directory made if allowed)."""
    t.check()
    if t.make_parent:
        t.path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=t.path.parent, prefix=f".{t.path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _keep_elsewhere(t: Target, data: bytes) -> str:
    """Keep `data` in the system's temporary directory; the path, or "" if that fails too."""
    fd = -1
    kept = ""
    try:
        fd, kept = tempfile.mkstemp(prefix="crossval-kept-", suffix=f"-{t.path.name}")
        _write_all(fd, data)
        os.fsync(fd)
    except OSError:
        if kept:
            _discard(kept)
        return ""
    finally:
        if fd >= 0:
            os.close(fd)
    return kept


def _rescue(t: Target, data: bytes, text: bool, why: str) -> OutputError:
    if text:
        sys.stdout.write(data.decode())
        if not data.endswith(b"\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
        return OutputError(f"{why}; its content was printed to stdout above instead")
    kept = _keep_elsewhere(t, data)
    if kept:
        return OutputError(f"{why}; its content was kept in {kept} instead", kept)
    return OutputError(f"{why}; it could not be kept elsewhere either")


def write_bytes(t: Target, data: bytes, *, text: bool = False) -> Path:
    """Write `data` to the target under the policy; the temporary file is read back and
    compared byte for byte before it is published."""
    try:
        # The target is checked again here: something may have made it while we worked.
        tmp = _fresh(t)
    except OutputError as exc:
        raise _rescue(t, data, text, str(exc)) from None
    except OSError as exc:
        why = f"cannot write {t.label} {t.path}: {exc.strerror or exc}; nothing was changed there"
        raise _rescue(t, data, text, why) from None
    try:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(tmp, "rb") as f:
            if f.read() != data:
                raise OSError(errno.EIO, "the file does not read back byte for byte")
        _publish(t, tmp)
    except OutputError as exc:
        _discard(tmp)
        raise _rescue(t, data, text, str(exc)) from None
    except OSError as exc:
        _discard(tmp)
        why = f"cannot write {t.label} {t.path}: {exc.strerror or exc}; nothing was changed there"
        raise _rescue(t, data, text, why) from None
    return t.path


def write_text(t: Target, text: str) -> Path:
    """`write_bytes` for text (UTF-8); on failure the text is printed to stdout."""
    return write_bytes(t, text.encode(), text=True)


@contextmanager
def staged(t: Target) -> Iterator[Path]:
    """A temporary path next to the target for writers that need a path (Caffe's
    net.save, numpy, matplotlib); fsynced and published when the block ends without an
    exception, removed in every case otherwise."""
    tmp = _fresh(t)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _publish(t, tmp)
    except OSError as exc:
        raise OutputError(
            f"cannot write {t.label} {t.path}: {exc.strerror or exc}; nothing was changed there"
        ) from None
    finally:
        _discard(tmp)


def write_with(t: Target, writer: Callable[[Path], object]) -> Path:
    """Call `writer(path)` on a staged temporary path and publish it."""
    with staged(t) as tmp:
        writer(tmp)
    return t.path


__all__ = [
    "Directory",
    "OutputError",
    "Target",
    "directory",
    "staged",
    "target",
    "write_bytes",
    "write_text",
    "write_with",
]
