"""The pytest plugin users put in their own suites."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crossval import provision
from crossval.pytest_plugin import assert_port_matches
from crossval.worker import CaffeWorker

TESTS = Path(__file__).resolve().parent


def test_assert_port_matches(tmp_path: Path, caffe_install: provision.CaffeInstall) -> None:
    sys.path.insert(0, str(TESTS))
    try:
        from ports import tiny

        with CaffeWorker(caffe_install) as worker:
            net = tmp_path / "tiny.prototxt"
            net.write_text(worker.prototxt("tiny_cnn", batch=2, bins=7))
            # The CLI's option names; paths as str or Path.
            report = assert_port_matches(worker, str(net), tiny.make, examples=10, seed=3)
            assert report.verdict == "match" and report.examples_run == 10
            with pytest.raises(AssertionError, match=r"first failing layer: drop1 \(Dropout\)"):
                assert_port_matches(worker, net, tiny.make_functional_dropout, examples=10)
            with pytest.raises(TypeError, match="examples_n"):
                assert_port_matches(worker, net, tiny.make, examples_n=10)  # type: ignore[call-arg]
    finally:
        sys.path.remove(str(TESTS))


def test_plugin_fixtures_in_a_users_suite(
    tmp_path: Path, caffe_install: provision.CaffeInstall
) -> None:
    """A user's test file using the fixtures, run by pytest with the plugin loaded."""
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent("""
        def test_worker(crossval_worker):
            assert crossval_worker.ping().pid > 0
    """)
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "crossval.pytest_plugin",
            str(tmp_path / "test_user.py"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=caffe_install.env(),
        timeout=300,
    )
    if "Plugin already registered" in proc.stdout + proc.stderr:  # loaded by its entry point
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", str(tmp_path / "test_user.py")],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=caffe_install.env(),
            timeout=300,
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
