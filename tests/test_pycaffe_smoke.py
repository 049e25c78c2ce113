"""Real pycaffe runs a small net (InnerProduct + Softmax); its output matches numpy."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from crossval import provision, tolerances

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import caffe
    from caffe import layers as L

    caffe.set_mode_cpu()
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[5, 37]))
    n.fc = L.InnerProduct(n.data, num_output=11)
    n.prob = L.Softmax(n.fc)
    path = sys.argv[1]
    with open(path + "/net.prototxt", "w") as f:
        f.write(str(n.to_proto()))
    net = caffe.Net(path + "/net.prototxt", caffe.TEST)
    inputs = np.load(path + "/in.npz")
    net.params["fc"][0].data[...] = inputs["w"]
    net.params["fc"][1].data[...] = inputs["b"]
    net.blobs["data"].data[...] = inputs["x"]
    out = net.forward()
    np.savez(path + "/out.npz", fc=net.blobs["fc"].data, prob=out["prob"],
             w=net.params["fc"][0].data, b=net.params["fc"][1].data)
""")


def test_inner_product_softmax_matches_numpy(
    tmp_path: Path, caffe_install: provision.CaffeInstall
) -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(0, 3, (5, 37)).astype(np.float32)
    w = rng.normal(0, 1, (11, 37)).astype(np.float32)
    b = rng.normal(0, 1, (11,)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x, w=w, b=b)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=caffe_install.env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = np.load(tmp_path / "out.npz")
    # Weights went in bit for bit.
    assert out["w"].tobytes() == w.tobytes() and out["b"].tobytes() == b.tobytes()
    x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    z = x64 @ w64.T + b64
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    e_z = tolerances.inner_product(x64, w64, b64)
    e_p = tolerances.softmax(z, p, e_z)
    assert np.all(np.abs(out["fc"] - z) <= e_z), np.max(np.abs(out["fc"] - z) / e_z)
    assert np.all(np.abs(out["prob"] - p) <= e_p), np.max(np.abs(out["prob"] - p) / e_p)
    # A wrong answer is caught by the same bounds: softmax over the batch axis.
    e_b = np.exp(z - z.max(axis=0, keepdims=True))
    wrong = e_b / e_b.sum(axis=0, keepdims=True)
    assert not np.all(np.abs(wrong - p) <= e_p)
