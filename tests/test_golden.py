"""The golden vectors are exactly what their documented command writes, and bad files are
refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from crossval_cli import run_crossval

from crossval import golden
from crossval import tolerances as tol
from crossval.errors import CrossvalError
from crossval.heads import COMBINATIONS


def test_stored_golden_files_are_what_the_command_writes(tmp_path: Path) -> None:
    proc = run_crossval("golden", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    stored = sorted(p.name for p in golden.GOLDEN_DIR.glob("*.npz"))
    assert stored == sorted(f"{n}.npz" for n in golden.GOLDEN_CASES)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == stored
    for name in stored:
        with np.load(golden.GOLDEN_DIR / name) as a, np.load(tmp_path / name) as b:
            assert sorted(a.files) == sorted(b.files), name
            assert json.loads(str(a["meta"])) == json.loads(str(b["meta"]))
            for key in a.files:
                if key.startswith(("x", "target", "w:")):  # copies: bit for bit
                    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {key}")
                elif key != "meta":  # float64 reference values, computed again
                    bound = tol.regenerated_f64(a[key])
                    assert np.all(np.abs(a[key] - b[key]) <= bound), f"{name} {key}"


def test_golden_cases_cover_every_head_and_loss() -> None:
    refs = golden.load()
    assert {(r.case.head, r.case.loss) for r in refs} == set(COMBINATIONS)
    assert any(r.case.batch == 1 for r in refs) and any(r.case.sigma != 1 for r in refs)
    assert any(r.case.normalization == "FULL" and r.case.ignore_label is not None for r in refs)
    assert {r.case.bins for r in refs if r.case.head == "expectation"} >= {100, 101}


def test_golden_write_never_replaces_files_without_force(tmp_path: Path) -> None:
    golden.write(tmp_path)
    path = tmp_path / f"{next(iter(golden.GOLDEN_CASES))}.npz"
    path.write_bytes(b"mine")
    with pytest.raises(CrossvalError, match="--force"):
        golden.write(tmp_path)
    assert path.read_bytes() == b"mine"


def test_a_damaged_golden_file_is_named(tmp_path: Path) -> None:
    src = golden.GOLDEN_DIR / f"{next(iter(golden.GOLDEN_CASES))}.npz"
    bad = tmp_path / "cut.npz"
    bad.write_bytes(src.read_bytes()[:300])
    with pytest.raises(CrossvalError, match=r"cut\.npz"):
        golden.load_file(bad)
    with pytest.raises(CrossvalError, match="no golden files"):
        golden.load(tmp_path / "empty")
