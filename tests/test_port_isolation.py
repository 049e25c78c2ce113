"""`crossval validate-port` runs the port where it cannot take crossval down: a port that
segfaults, exits, hangs or raises is a finding (exit 1) naming the example it was running,
which is saved and replays; Caffe crashing or hanging on a generated example stops the
search at once, naming and saving that example. No process or temporary file is left."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from crossval_cli import ROOT
from profiles import thorough

from crossval import provision, warmstart
from crossval.cli import main

PORT = '''
import ctypes
import os
import time

from crossval import reference


class Port(reference.SigmoidScaleHead):
    """Correct, except on inputs above 100 (generated at input scale 1e3)."""

    def forward(self, pool5):
        if float(pool5.abs().max()) > 100:
            {fault}
        return super().forward(pool5=pool5)


def make():
    return Port(16)
'''

FAULTS = {
    "segfault": ("ctypes.string_at(0)", "crashed (SIGSEGV)"),
    "exit": ("os._exit(0)", "exited with status 0"),
    "hang": ("time.sleep(3600)", "did not return within 3 s"),
    "raise": ('raise ZeroDivisionError("no bins")', "raised ZeroDivisionError: no bins"),
}

GUARD_LAYER = '''
import os
import time

import caffe


class Guard(caffe.Layer):
    """Passes its input through; on inputs above 100 it {what}."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        if abs(bottom[0].data).max() > 100:
            {fault}
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff
'''

# The reference of the guard (the identity, exact both ways), for --layer-plugin.
GUARD_PLUGIN = """
import numpy as np

from crossval.portcheck.plugins import register_python_layer

register_python_layer(
    "guard_layer",
    "Guard",
    forward=lambda spec, bottoms: [bottoms[0] * 1],
    forward_bound=lambda spec, bottoms, blobs, tops: [np.zeros(np.shape(tops[0]))],
    backward_bound=lambda spec, bottoms, blobs, tops, diffs: ([np.zeros(np.shape(bottoms[0]))], []),
)
"""


@pytest.fixture(scope="module")
def sigmoid_net(
    tmp_path_factory: pytest.TempPathFactory, caffe_install: provision.CaffeInstall
) -> Path:
    path = tmp_path_factory.mktemp("nets") / "sigmoid.prototxt"
    # in process: the runs under test are validate-port's, each a process of its own
    assert main(["prototxt", "sigmoid_scale", "--features", "16", "--deploy", "-o", str(path)]) == 0
    return path


def _ours(tag: str) -> list[int]:
    """Live processes whose environment holds `tag` (this test's private TMPDIR) or that
    hold a file open below it (a Caffe worker's log: a forked worker's environment is its
    warm process's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                opened = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
            except OSError:
                continue
            below = any(path.startswith(f"{tag}/") for path in opened)
            if (tag.encode() in environ or below) and state != "Z":
                found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    """Live (not zombie) processes below `pid`."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


Run = Callable[..., tuple[int, str, str, float]]


@pytest.fixture()
def run_vp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Run:
    """validate-port ARGS in this process (each run's port and Caffe in a child forked from
    the warm process) with this test's modules on PYTHONPATH and its own TMPDIR; checks that
    no process or temporary file of the run is left behind."""
    private = tmp_path / "tmp"
    private.mkdir(exist_ok=True)
    pythonpath = [str(tmp_path), str(ROOT), str(ROOT / "tests")]
    monkeypatch.setenv("TMPDIR", str(private))
    monkeypatch.setenv("PYTHONPATH", ":".join(pythonpath))
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    monkeypatch.syspath_prepend(str(tmp_path))

    def run(*args: str) -> tuple[int, str, str, float]:
        capsys.readouterr()
        start = time.monotonic()
        code = main(["validate-port", *args])
        took = time.monotonic() - start
        warm = warmstart.warm().proc.pid
        end = time.monotonic() + 3
        while _descendants(warm) and time.monotonic() < end:
            time.sleep(0.05)
        assert _descendants(warm) == [], "processes of the run are left"
        assert list(private.iterdir()) == [], "temporary files of the run are left"
        got = capsys.readouterr()
        assert "Traceback" not in got.out + got.err, got.out + got.err
        return code, got.out, got.err, took

    return run


@pytest.mark.parametrize("how", list(FAULTS))
def test_a_failing_port_is_a_finding_naming_the_example(
    sigmoid_net: Path, tmp_path: Path, run_vp: Run, how: str
) -> None:
    fault, said = FAULTS[how]
    (tmp_path / f"port_{how}.py").write_text(PORT.replace("{fault}", fault))
    limit = ["--timeout", "3"] if how == "hang" else []
    args = [str(sigmoid_net), "--port", f"port_{how}:make", *limit]
    saved_dir = tmp_path / "failures"
    rc, out, err, _ = run_vp(*args, "--save-failure", str(saved_dir))
    assert rc == 1, out + err
    m = re.search(
        rf"PORT FAILURE: the port {re.escape(said)} in its forward while running "
        r"example (\d+) \(batch 2, seed \d+, input scale ([\d.e+]+)",
        out,
    )
    assert m, out
    assert float(m.group(2)) > 100 / 3  # the example with large inputs (see Port)
    (saved,) = saved_dir.glob("*.npz")
    replay = re.search(r"replay with:\n  crossval (.*)", out)
    assert replay and f"--replay {saved}" in replay.group(1)
    if how != "segfault" and not thorough():
        return  # the replay's run (a process again) for one fault in `ci`, each in `thorough`
    # The saved example fails the same way on its own.
    rc2, out2, err2, _ = run_vp(*replay.group(1).split()[1:])
    assert rc2 == 1, out2 + err2
    assert f"the port {said} in its forward while running example 1 (replayed" in out2, out2


def test_a_port_that_crashes_on_import_is_a_finding(
    sigmoid_net: Path, tmp_path: Path, run_vp: Run
) -> None:
    (tmp_path / "port_import.py").write_text("import ctypes\nctypes.string_at(0)\n")
    rc, out, err, _ = run_vp(str(sigmoid_net), "--port", "port_import:make")
    assert rc == 1, out + err
    assert "the port crashed (SIGSEGV) in its module 'port_import' (import)" in out, out


def _guarded_net(net: Path, tmp_path: Path, fault: str) -> Path:
    """The sigmoid head behind a Python layer that fails on large inputs."""
    what = "aborts" if "abort" in fault else "hangs"
    (tmp_path / "guard_plugin.py").write_text(GUARD_PLUGIN)
    (tmp_path / "guard_layer.py").write_text(
        GUARD_LAYER.replace("{fault}", fault).replace("{what}", what)
    )
    text = net.read_text().replace('bottom: "pool5"', 'bottom: "guarded"')
    layer = (
        'layer {\n  name: "guard"\n  type: "Python"\n  bottom: "pool5"\n  top: "guarded"\n'
        '  python_param { module: "guard_layer" layer: "Guard" }\n}\n'
    )
    at = text.index('layer {\n  name: "fc1"')
    out = tmp_path / "guarded.prototxt"
    out.write_text(text[:at] + layer + text[at:])
    return out


def test_a_caffe_abort_in_the_search_is_reported_at_once(
    sigmoid_net: Path, tmp_path: Path, run_vp: Run
) -> None:
    net = _guarded_net(sigmoid_net, tmp_path, "os.abort()")
    saved_dir = tmp_path / "failures"
    rc, out, err, took = run_vp(
        str(net),
        "--port",
        "ports.heads:sigmoid",
        "--layer-plugin",
        "guard_plugin",
        "--examples",
        "12",
        "--save-failure",
        str(saved_dir),
    )
    assert rc != 0 and rc != 1, out + err  # Caffe's crash is not a verdict on the port
    m = re.search(
        r"Caffe killed by signal 6 during run_generated.* while running example (\d+) "
        r"\(batch 2, seed \d+, input scale ([\d.e+]+).*the example is saved to (\S+);",
        err,
    )
    assert m and float(m.group(2)) > 100 / 3, err
    assert Path(m.group(3)).is_file()
    # No shrinking through a fresh worker per step (it took 67 s for 12 examples).
    assert took < 30, took


def test_a_caffe_hang_in_the_search_is_stopped_by_the_time_limit(
    sigmoid_net: Path, tmp_path: Path, run_vp: Run
) -> None:
    net = _guarded_net(sigmoid_net, tmp_path, "time.sleep(3600)")
    rc, out, err, took = run_vp(
        str(net),
        "--port",
        "ports.heads:sigmoid",
        "--layer-plugin",
        "guard_plugin",
        "--timeout",
        "3",
    )
    assert rc != 0 and rc != 1, out + err
    assert re.search(
        r"Caffe did not return within 3 s during run_generated \(it was in forward "
        r"\(guard_layer.py:\d+\)\); the worker was killed while running example \d+ ",
        err,
    ), err
    assert took < 30, took


def test_a_python_layer_without_a_reference_is_refused(
    sigmoid_net: Path, tmp_path: Path, run_vp: Run
) -> None:
    net = _guarded_net(sigmoid_net, tmp_path, "os.abort()")
    rc, out, err, _ = run_vp(str(net), "--port", "ports.heads:sigmoid")
    assert rc == 2, out + err
    assert "no layer for guard (Python layer guard_layer.Guard)" in err and "--layer-plugin" in err


def test_sigterm_to_crossval_leaves_nothing_behind(sigmoid_net: Path, tmp_path: Path) -> None:
    (tmp_path / "port_hang.py").write_text(PORT.replace("{fault}", FAULTS["hang"][0]))
    private = tmp_path / "tmp"
    private.mkdir()
    env = dict(os.environ, TMPDIR=str(private), GLOG_minloglevel="2")
    env["PYTHONPATH"] = ":".join([str(tmp_path), str(ROOT), str(ROOT / "tests")])
    args = ["validate-port", str(sigmoid_net), "--port", "port_hang:make"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "crossval", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Wait until the port hangs on its example (the child has written it) with Caffe up.
        end = time.monotonic() + 60
        while time.monotonic() < end and not (
            list(private.glob("crossval-port-*/example.npz"))
            and list(private.glob("crossval-port-*/crossval-worker-*"))
            and len(_ours(str(private))) >= 3
        ):
            time.sleep(0.1)
        time.sleep(1.0)
        # the warm process, the port's child and its Caffe worker
        assert len(_ours(str(private))) >= 3, "the child and its Caffe worker did not start"
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in out + err
    end = time.monotonic() + 3
    while _ours(str(private)) and time.monotonic() < end:
        time.sleep(0.05)
    assert _ours(str(private)) == [] and list(private.iterdir()) == []
