"""The warm process that forks validate-port's isolated children: a child sees the caller's
environment, directory, streams and path; its exit status reads as Popen's; killing its group
takes what it started with it."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crossval import warmstart

TESTS = Path(__file__).resolve().parent


# ---- entries the children run (this module, imported in the child) ----------------------


def report(argv: list[str]) -> None:
    """Writes what the child sees to argv[0]; argv[1] is the number of a pipe's write end."""
    Path(argv[0]).write_text(
        json.dumps(
            {
                "env": os.environ.get("CROSSVAL_WARM_PROBE"),
                "tmpdir": __import__("tempfile").gettempdir(),
                "cwd": os.getcwd(),
                "path0": sys.path[0],
                "session": os.getsid(0) == os.getpid(),
            }
        )
    )
    os.write(int(argv[1]), b"through the pipe")
    print("printed by the child", flush=True)


def exits(argv: list[str]) -> None:
    raise SystemExit(int(argv[0]))


def segfaults(argv: list[str]) -> None:
    ctypes.string_at(0)


def starts_and_sleeps(argv: list[str]) -> None:
    """Starts a grandchild (in the child's process group), writes its pid, and sleeps."""
    grandchild = subprocess.Popen(["sleep", "600"])
    Path(argv[0]).write_text(str(grandchild.pid))
    time.sleep(600)


# ---- tests ------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(TESTS), **extra}


def test_child_sees_the_callers_environment_directory_streams_and_pipe(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "seen.json"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    read_end, write_end = os.pipe()
    env = _env(CROSSVAL_WARM_PROBE="given", TMPDIR=str(tmp_path))
    child = warmstart.fork("test_warmstart:report", [str(out)], (write_end,), env)
    os.close(write_end)
    assert child.wait(timeout=60) == 0
    with os.fdopen(read_end, "rb") as pipe:
        assert pipe.read() == b"through the pipe"
    seen = json.loads(out.read_text())
    assert seen == {
        "env": "given",
        "tmpdir": str(tmp_path),
        "cwd": str(work),
        "path0": str(work),
        "session": True,
    }
    assert "printed by the child" in capfd.readouterr().out


@pytest.mark.parametrize(
    ("entry", "args", "code"),
    [("exits", ["0"], 0), ("exits", ["7"], 7), ("segfaults", [], -signal.SIGSEGV)],
)
def test_exit_status_reads_as_popens(entry: str, args: list[str], code: int) -> None:
    child = warmstart.fork(f"test_warmstart:{entry}", args, (), _env())
    assert child.wait(timeout=60) == code
    assert child.poll() == code


def test_a_missing_entry_is_a_failed_child_with_its_traceback(
    capfd: pytest.CaptureFixture[str],
) -> None:
    child = warmstart.fork("test_warmstart:no_such_entry", [], (), _env())
    assert child.wait(timeout=60) == 1
    assert "AttributeError" in capfd.readouterr().err


def test_kill_group_takes_the_childs_own_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild"
    child = warmstart.fork("test_warmstart:starts_and_sleeps", [str(pid_file)], (), _env())
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.2)
    child.kill_group()
    assert child.poll() == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while Path(f"/proc/{grandchild}").exists() and time.monotonic() < deadline:
        state = Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        assert not Path(f"/proc/{grandchild}").exists(), "the grandchild outlived kill_group"


def test_the_warm_process_is_reused_and_ends_with_its_caller() -> None:
    first = warmstart.warm()
    warmstart.fork("test_warmstart:exits", ["0"], (), _env()).wait(timeout=60)
    assert warmstart.warm() is first
    code = (
        "from crossval import warmstart\n"
        "import os, sys\n"
        "w = warmstart.warm()\n"
        "warmstart.fork('test_warmstart:exits', ['0'], (), dict(os.environ)).wait(timeout=60)\n"
        "print(w.proc.pid)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    warm_pid = int(done.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{warm_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{warm_pid}").exists(), "the warm process outlived its caller"


def echo(argv: list[str]) -> None:
    """Copies its standard input to its standard output."""
    sys.stdout.write(sys.stdin.read().upper())


def test_streams_handed_over_and_one_warm_process_per_preload_and_environment() -> None:
    child_in, to_child = os.pipe()
    from_child, child_out = os.pipe()
    env = _env()
    child = warmstart.fork(
        "test_warmstart:echo",
        [],
        (),
        env,
        streams=(child_in, child_out, 2),
        preload=("json",),
        warm_env=env,
    )
    for fd in (child_in, child_out):
        os.close(fd)
    with os.fdopen(to_child, "w") as w:
        w.write("through stdin")
    with os.fdopen(from_child) as r:
        assert r.read() == "THROUGH STDIN"
    assert child.wait(timeout=60) == 0
    json_warm = warmstart.warm(("json",), env)
    assert json_warm is not warmstart.warm()  # the default preload's is another
    other_env = {**env, "OMP_NUM_THREADS": "3"}
    assert warmstart.warm(("json",), other_env) is not json_warm
    assert warmstart.warm(("json",), {**env, "UNRELATED": "x"}) is json_warm
