"""Provisioning of real Caffe: cache behaviour, integrity, pins, progress, selection."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from crossval_cli import run_crossval

from crossval import provision
from crossval.errors import CaffeNotAvailable, NeedsRoot, SourceHashMismatch
from crossval.provision import build, cache, pins, source
from crossval.provision.progress import Progress


def seeded_cache(tmp_path: Path, install: provision.CaffeInstall) -> tuple[dict[str, str], Path]:
    """A private cache holding a copy of the real entry; downloads and build tree are shared
    (symlinked), so a rebuild there is an incremental make, not a cold build."""
    real = cache.Layout(cache.cache_root())
    mine = cache.Layout(tmp_path / "cache")
    (mine.caffe / "build").mkdir(parents=True)
    mine.downloads.symlink_to(real.downloads)
    mine.build(install.key).symlink_to(real.build(install.key))
    shutil.copytree(install.python_path, mine.entry(install.key))
    env = dict(os.environ, CROSSVAL_CACHE_DIR=str(mine.root))
    env.pop("CROSSVAL_CAFFE", None)
    return env, mine.entry(install.key)


@pytest.fixture()
def cached_install(caffe_install: provision.CaffeInstall) -> provision.CaffeInstall:
    if caffe_install.origin != "cache":
        pytest.fail("these tests check the provisioned cache; unset CROSSVAL_CAFFE", pytrace=False)
    return caffe_install


def test_second_ensure_is_served_from_cache(cached_install: provision.CaffeInstall) -> None:
    entry = cached_install.python_path
    before = {p: p.stat().st_mtime_ns for p in entry.rglob("*") if p.is_file()}
    proc = run_crossval("caffe", "ensure", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"pycaffe (cached): {entry}" in proc.stdout
    assert "build" not in proc.stderr and "configure" not in proc.stderr, proc.stderr
    after = {p: p.stat().st_mtime_ns for p in entry.rglob("*") if p.is_file() and p in before}
    assert after == before


def test_cache_key_follows_numpy_major_and_python_abi() -> None:
    interp = build.current_interpreter()
    key = cache.cache_key(build.key_inputs(interp))
    same_major = replace(interp, numpy_version=f"{interp.numpy_major}.999.0")
    other_major = replace(interp, numpy_version=f"{interp.numpy_major + 1}.0.0")
    other_abi = replace(interp, soabi="cpython-312-x86_64-linux-gnu")
    assert cache.cache_key(build.key_inputs(same_major)) == key
    assert cache.cache_key(build.key_inputs(other_major)) != key
    assert cache.cache_key(build.key_inputs(other_abi)) != key


@pytest.mark.parametrize("damage", ["flip-bytes", "drop-manifest", "truncate"])
def test_damaged_entry_is_detected_and_rebuilt(
    tmp_path: Path, cached_install: provision.CaffeInstall, damage: str
) -> None:
    env, entry = seeded_cache(tmp_path, cached_install)
    so = entry / "caffe" / "_caffe.so"
    good = so.read_bytes()
    if damage == "flip-bytes":
        data = bytearray(good)
        data[len(data) // 2] ^= 0xFF
        so.write_bytes(bytes(data))
    elif damage == "drop-manifest":
        (entry / cache.MANIFEST).unlink()
    else:
        so.write_bytes(good[: len(good) // 3])
    with pytest.raises(cache.InvalidEntry):
        cache.read_entry(entry, cached_install.key)
    leftover = entry.with_name(f"{cached_install.key}.partial-interrupted")
    leftover.mkdir()
    proc = run_crossval("caffe", "ensure", "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "cache entry rejected" in proc.stderr
    assert cache.read_entry(entry, cached_install.key)["key"] == cached_install.key
    assert not leftover.exists()
    # The rebuilt library is a working one (the probe imported it before publishing).
    assert (entry / "caffe" / "_caffe.so").stat().st_size == len(good)


def test_concurrent_ensures_share_one_build(
    tmp_path: Path, cached_install: provision.CaffeInstall
) -> None:
    env, entry = seeded_cache(tmp_path, cached_install)
    (entry / cache.MANIFEST).unlink()
    cmd = [sys.executable, "-m", "crossval", "caffe", "ensure", "--quiet"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    builds = sum("cache entry rejected" in err for _, err in outs)
    assert builds == 1, outs
    cache.read_entry(entry, cached_install.key)


def test_wrong_pinned_hash_is_refused(
    tmp_path: Path, cached_install: provision.CaffeInstall
) -> None:
    downloads = cache.Layout(cache.cache_root()).downloads
    source.verify(downloads)  # the real files match the real pins
    tampered = dict(pins.SOURCE_FILES)
    tampered[pins.DSC_FILE] = "0" * 64
    with pytest.raises(SourceHashMismatch, match=r"refusing caffe_.*\.dsc: SHA-256 is c492f4"):
        source.verify(downloads, tampered)
    # Through the real download path: nothing unverified is kept.
    target = tmp_path / "downloads"
    with pytest.raises(SourceHashMismatch):
        source.fetch(target, tmp_path / "apt", Progress(io.StringIO()), expected=tampered)
    assert not target.exists() or not any(target.iterdir())


def test_caffe_info_reports_real_values(cached_install: provision.CaffeInstall) -> None:
    proc = run_crossval("caffe", "info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["origin"] == "cache"
    assert info["path"] == str(cached_install.python_path)
    assert info["caffe_version"] == "1.0.0"
    assert info["source_package"] == f"caffe {pins.SOURCE_VERSION}"
    assert info["source_revision"] == pins.UPSTREAM_REVISION
    assert info["python"] == sys.version.split()[0]
    assert info["numpy"] == np.__version__
    assert info["blas"].startswith("OpenBLAS"), info["blas"]
    assert "libprotobuf" in info["libprotobuf"] and "3.21" in info["libprotobuf"]
    gxx = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    # The same compiler (CMake names it c++, the alternatives link to g++).
    assert info["compiler"].split(" ", 1)[1] == gxx.splitlines()[0].strip().split(" ", 1)[1]
    assert info["build_flags"]["CPU_ONLY"] == "ON"
    assert info["build_flags"]["BLAS"] == "Open"
    assert info["layer_types"] > 40
    text = run_crossval("caffe", "info").stdout
    assert "caffe_version" in text and "1.0.0" in text


def test_external_caffe_path_is_checked(
    tmp_path: Path, cached_install: provision.CaffeInstall
) -> None:
    env = dict(os.environ)
    empty = run_crossval("caffe", "ensure", "--caffe", str(tmp_path), env=env)
    assert empty.returncode == 2
    assert f"{tmp_path} holds no `caffe` package" in empty.stderr
    aborting = tmp_path / "aborting"
    (aborting / "caffe").mkdir(parents=True)
    (aborting / "caffe" / "__init__.py").write_text("import os\nos.abort()\n")
    proc = run_crossval("caffe", "info", "--caffe", str(aborting), env=env)
    assert proc.returncode == 2
    assert "does not work (killed by SIGABRT)" in proc.stderr
    assert "while importing caffe" in proc.stderr
    # The real build selected through the environment variable.
    env["CROSSVAL_CAFFE"] = str(cached_install.python_path / "caffe")
    ok = run_crossval("caffe", "info", "--json", env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["origin"] == "external"


def test_missing_build_deps_without_root_name_the_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert build.missing_build_depends() == []  # this machine built Caffe
    missing = ["libhdf5-dev", "patchelf"]
    monkeypatch.setattr(build, "missing_build_depends", lambda packages=(): missing)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(
        NeedsRoot,
        match=r"apt-get install -y --no-install-recommends "
        r"libhdf5-dev patchelf",
    ):
        build.install_build_depends(Progress(io.StringIO()))


def test_quiet_progress_is_a_few_plain_lines() -> None:
    out = io.StringIO()
    prog = Progress(out, quiet=True)
    prog.stage("build", "make")
    for pct in range(0, 101):
        prog.percent(pct)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [ln.split()[-1] for ln in lines[1:]] == ["25%", "50%", "75%", "100%"]


def test_mirror_is_read_from_apt_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://mirror.example/debian bookworm main contrib\n"
        "deb http://security.example/debian-security bookworm-security main\n"
    )
    (tmp_path / "sources.list.d" / "extra.sources").write_text(
        textwrap.dedent("""\
        Types: deb
        URIs: http://other.example/debian/
        Suites: bookworm bookworm-updates
        Components: main
        """)
    )
    (tmp_path / "sources.list.d" / "off.sources.disabled").write_text(
        "Types: deb\nURIs: http://never.example/debian\nSuites: bookworm\nComponents: main\n"
    )
    assert source.debian_mirrors(tmp_path) == [
        "http://mirror.example/debian",
        "http://other.example/debian",
    ]
    assert source.debian_mirrors()  # this machine's own sources name a mirror


def test_locate_without_a_build_says_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CROSSVAL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CROSSVAL_CAFFE", raising=False)
    with pytest.raises(CaffeNotAvailable, match="run `crossval caffe ensure`"):
        provision.locate()
