"""Fetch, verify and unpack the pinned Debian source package of Caffe.

apt runs with a private sources list and private state and cache directories, so the
machine's own apt configuration and lists are never touched. The mirror is the one the
machine's apt sources already use.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import ProvisionError, SourceHashMismatch
from . import pins
from .progress import Progress

APT_ETC = Path("/etc/apt")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, ""
            continue
        if line[0] in " \t" and key:
            current[key] += " " + line.strip()
            continue
        if ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def _is_debian_archive(uri: str, suites: list[str], components: list[str]) -> bool:
    """A main Debian archive: a plain codename suite (no -security/-updates) with `main`."""
    if not uri.startswith(("http://", "https://", "file:", "ftp://")):
        return False
    plain = [s for s in suites if "-" not in s and "/" not in s]
    return bool(plain) and "main" in components and "security" not in uri


def debian_mirrors(apt_etc: Path = APT_ETC) -> list[str]:
    """Debian archive URIs named by the machine's apt sources, in the order apt reads them."""
    found: list[str] = []
    files: list[Path] = []
    main_list = apt_etc / "sources.list"
    if main_list.is_file():
        files.append(main_list)
    parts = apt_etc / "sources.list.d"
    if parts.is_dir():
        files.extend(sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources")))
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for st in _deb822_stanzas(text):
                if st.get("enabled", "yes").lower() == "no":
                    continue
                if (
                    "deb" not in st.get("types", "").split()
                    and "deb-src" not in st.get("types", "").split()
                ):
                    continue
                suites = st.get("suites", "").split()
                comps = st.get("components", "").split()
                for uri in st.get("uris", "").split():
                    if _is_debian_archive(uri, suites, comps):
                        found.append(uri.rstrip("/"))
        else:
            for raw in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", " ", raw.split("#", 1)[0]).split()
                if len(words) >= 4 and words[0] in ("deb", "deb-src"):
                    uri, suite, comps = words[1], words[2], words[3:]
                    if _is_debian_archive(uri, [suite], comps):
                        found.append(uri.rstrip("/"))
    seen: list[str] = []
    for uri in found:
        if uri not in seen:
            seen.append(uri)
    return seen


def verify(directory: Path, expected: dict[str, str] | None = None) -> None:
    """Check every pinned file in `directory` against its SHA-256; refuse any mismatch."""
    expected = pins.SOURCE_FILES if expected is None else expected
    for name, want in expected.items():
        path = directory / name
        if not path.is_file():
            raise ProvisionError(f"source file missing after download: {path}")
        got = sha256_file(path)
        if got != want:
            raise SourceHashMismatch(
                f"refusing {name}: SHA-256 is {got}, but the pinned value is {want}. "
                "The download is not the pinned Debian source package "
                f"{pins.SOURCE_PACKAGE} {pins.SOURCE_VERSION}; it was not used."
            )


def _all_present(directory: Path, expected: dict[str, str]) -> bool:
    try:
        verify(directory, expected)
    except ProvisionError:
        return False
    return True


def fetch(
    downloads: Path, apt_dir: Path, progress: Progress, expected: dict[str, str] | None = None
) -> Path:
    """Make `downloads` hold the three pinned files, verified. Returns `downloads`."""
    expected = pins.SOURCE_FILES if expected is None else expected
    if _all_present(downloads, expected):
        return downloads
    mirrors = (
        [os.environ["CROSSVAL_DEBIAN_MIRROR"]]
        if os.environ.get("CROSSVAL_DEBIAN_MIRROR")
        else debian_mirrors()
    )
    if not mirrors:
        raise ProvisionError(
            "no Debian archive found in /etc/apt/sources.list or /etc/apt/sources.list.d; "
            "set CROSSVAL_DEBIAN_MIRROR to a Debian mirror URI"
        )
    if shutil.which("apt-get") is None:
        raise ProvisionError("apt-get not found: fetching the Caffe source needs Debian's apt")
    mirror = mirrors[0]
    progress.stage("fetch", f"{pins.SOURCE_PACKAGE} {pins.SOURCE_VERSION} from {mirror}")
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    sources_list = apt_dir / "sources.list"
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    signed = f"[signed-by={keyring}] " if os.path.exists(keyring) else ""
    sources_list.write_text(f"deb-src {signed}{mirror} {pins.SOURCE_SUITE} main\n")
    opts = [
        "-o",
        f"Dir::Etc::SourceList={sources_list}",
        "-o",
        "Dir::Etc::SourceParts=/dev/null",
        "-o",
        f"Dir::State::Lists={apt_dir / 'lists'}",
        "-o",
        f"Dir::Cache={apt_dir / 'cache'}",
    ]
    if os.geteuid() == 0:
        opts += ["-o", "APT::Sandbox::User=root"]
    _run(["apt-get", "-q", *opts, "update"], "apt-get update (private lists)")
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads.parent, prefix=".download-") as tmp:
        _run(
            [
                "apt-get",
                "-q",
                *opts,
                "source",
                "--download-only",
                f"{pins.SOURCE_PACKAGE}={pins.SOURCE_VERSION}",
            ],
            "apt-get source --download-only",
            cwd=Path(tmp),
        )
        progress.stage("verify", "SHA-256 of the three source files")
        verify(Path(tmp), expected)
        for name in expected:
            os.replace(Path(tmp) / name, downloads / name)
    return downloads


def unpack(
    downloads: Path,
    dest: Path,
    progress: Progress,
    edits: tuple[tuple[str, str, str], ...] = (),
) -> Path:
    """Unpack with Debian's patch series (dpkg-source -x) plus our compat patches.

    `edits` are a build variant's source changes, applied after those.
    Unpacks beside `dest` and renames into place, so `dest` is either complete or absent.
    Returns the source tree.
    """
    tree = dest / pins.UNPACKED_DIR
    if (dest / ".complete").is_file():
        return tree
    progress.stage("unpack", "dpkg-source -x, Debian patch series, protobuf compat change")
    if shutil.which("dpkg-source") is None:
        raise ProvisionError("dpkg-source not found (Debian package dpkg-dev)")
    if dest.exists():
        shutil.rmtree(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".unpack-"))
    try:
        _run(
            [
                "dpkg-source",
                "--no-check",
                "-x",
                str(downloads / pins.DSC_FILE),
                str(tmp / pins.UNPACKED_DIR),
            ],
            "dpkg-source -x",
        )
        apply_compat_patches(tmp / pins.UNPACKED_DIR)
        apply_edits(tmp / pins.UNPACKED_DIR, edits)
        (tmp / ".complete").write_text(pins.SOURCE_VERSION + "\n")
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tree


def apply_compat_patches(tree: Path) -> None:
    apply_edits(tree, pins.COMPAT_PATCHES, "compat patch")


def apply_edits(tree: Path, edits: tuple[tuple[str, str, str], ...], what: str = "edit") -> None:
    """Replace each exact `old` text by `new`; the old text must occur exactly once."""
    for rel, old, new in edits:
        path = tree / rel
        text = path.read_text()
        if text.count(old) == 1:
            path.write_text(text.replace(old, new))
        elif new not in text:
            raise ProvisionError(
                f"{what} does not apply to {rel}: expected text found {text.count(old)} times"
            )


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ProvisionError(f"{what} failed (exit {proc.returncode}):\n{tail}")
