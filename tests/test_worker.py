"""Caffe runs in a worker process: its aborts and crashes never kill the caller."""

from __future__ import annotations

import numpy as np
import pytest

from crossval import provision
from crossval.worker import CaffeCrash, CaffeError, CaffeWorker


def test_check_failure_is_reported_with_caffes_log_line(
    caffe_install: provision.CaffeInstall,
) -> None:
    with CaffeWorker(caffe_install) as worker:
        proto = worker.call("prototxt", head="sigmoid_scale", features=4, batch=2, loss="euclidean")
        first = worker.call("ping")["pid"]
        with pytest.raises(CaffeCrash) as info:
            # true_age with 2 values per sample: EuclideanLoss CHECKs count(1) in Reshape.
            worker.call(
                "run",
                prototxt=proto,
                inputs={
                    "pool5": np.zeros((2, 4), np.float32),
                    "true_age": np.zeros((2, 2), np.float32),
                },
            )
        err = info.value
        assert "killed by signal 6" in str(err)
        assert "Check failed: bottom[0]->count(1) == bottom[1]->count(1)" in str(err)
        assert "euclidean_loss_layer.cpp" in str(err)
        # The next request gets a fresh worker, and the same net works there.
        assert worker.call("ping")["pid"] != first
        out = worker.call(
            "run",
            prototxt=proto,
            inputs={"pool5": np.ones((2, 4), np.float32), "true_age": np.zeros((2, 1), np.float32)},
        )
        assert out["blobs"]["pred_age"].shape == (2, 1)
        assert worker.restarts == 1


@pytest.mark.parametrize("how", ["abort", "segfault"])
def test_crashes_become_errors(caffe_install: provision.CaffeInstall, how: str) -> None:
    with CaffeWorker(caffe_install) as worker:
        with pytest.raises(CaffeCrash, match=r"killed by signal (6|11)"):
            worker.call("crash", how=how)
        assert worker.call("ping")["caffe"].startswith(str(caffe_install.python_path))


def test_python_errors_keep_the_worker(caffe_install: provision.CaffeInstall) -> None:
    with CaffeWorker(caffe_install) as worker:
        pid = worker.call("ping")["pid"]
        proto = worker.call("prototxt", head="expectation", features=4, bins=3)
        with pytest.raises(CaffeError, match="input blob 'data' is not in the net"):
            worker.call("run", prototxt=proto, inputs={"data": np.zeros((1, 4), np.float32)})
        with pytest.raises(CaffeError, match="unknown worker op 'nope'"):
            worker.call("nope")
        assert worker.call("ping")["pid"] == pid and worker.restarts == 0


def test_nets_are_reused_across_batch_sizes(caffe_install: provision.CaffeInstall) -> None:
    with CaffeWorker(caffe_install) as worker:
        proto = worker.call("prototxt", head="expectation", features=5, bins=7)
        worker.call("surgery", prototxt=proto)  # a fresh net: the cached one is untouched
        for n in (1, 3, 64, 2):
            x = np.random.default_rng(n).standard_normal((n, 5)).astype(np.float32)
            out = worker.call("run", prototxt=proto, inputs={"pool5": x}, surgery="pred_age")
            assert out["blobs"]["pred_age"].shape == (n, 1)
            assert (
                out["params"]["pred_age"][0].tobytes()
                == np.arange(7, dtype=np.float32)[None].tobytes()
            )
