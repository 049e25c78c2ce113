"""Hostile input and faults, over every command: each case asserts the exit code, a message
that names the problem, no traceback, the user's files byte for byte unchanged, no
leftover temporary file and no leftover Caffe worker.

Cases are data (``CASES``): a command line with placeholders for the files a case sets up
in its own directory. Most run in-process through ``crossval.cli.main`` (fast; a port that
crashes, exits or hangs does so in validate-port's child); those that need an environment of
their own run as a real process, and the signal tests below start one. The valid artifacts
the bad inputs are made from (nets, an init caffemodel) are written once per session by
crossval itself.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from crossval_cli import ROOT, TESTS, run_crossval

from crossval import cli, provision
from crossval.errors import EXIT_INTERNAL
from crossval.worker import CaffeWorker

EXIT_INTERRUPTED = 130

# -- valid artifacts --------------------------------------------------------------------


def make_artifacts(d: Path, install: provision.CaffeInstall | None = None) -> dict[str, bytes]:
    """The valid files bad inputs are derived from, as bytes, made by crossval itself in `d`
    (its commands run in this process: a child process each cost seconds of imports)."""
    made = {
        "exp.prototxt": ("prototxt", "expectation", "--features", "16", "--deploy"),
        "sig.prototxt": ("prototxt", "sigmoid_scale", "--features", "16", "--deploy"),
        "train.prototxt": ("prototxt", "expectation", "--features", "16"),
        "tiny.prototxt": ("prototxt", "tiny_cnn", "--bins", "7"),
    }
    for name, args in made.items():
        assert cli.main([*args, "-o", str(d / name)]) == 0, name
    surgery = ["surgery", str(d / "exp.prototxt"), "-o", str(d / "exp.caffemodel")]
    assert cli.main(surgery) == 0, "surgery"
    # Another net's weights: the sigmoid head's, as Caffe's fillers made them.
    with CaffeWorker(install) as worker:
        text = (d / "sig.prototxt").read_text()
        worker.save(text, {}, str(d / "sig.caffemodel"))
    return {p.name: p.read_bytes() for p in d.iterdir()}


@pytest.fixture(scope="session")
def artifacts(
    tmp_path_factory: pytest.TempPathFactory, caffe_install: provision.CaffeInstall
) -> dict[str, bytes]:
    return make_artifacts(tmp_path_factory.mktemp("artifacts"), caffe_install)


# -- user files a case can ask for --------------------------------------------------------


def _exp(a: dict[str, bytes]) -> bytes:
    return a["exp.prototxt"]


def _edit(name: str, old: bytes, new: bytes, count: int = 1) -> Callable[[dict[str, bytes]], bytes]:
    def make(a: dict[str, bytes]) -> bytes:
        text = a[name]
        assert old in text, (name, old)
        return text.replace(old, new, count)

    return make


def _no_input(a: dict[str, bytes]) -> bytes:
    text = a["exp.prototxt"].decode()
    start = text.index("layer {")
    end = text.index("layer {", start + 1)
    return (text[:start] + text[end:]).encode()


def _duplicate_names(a: dict[str, bytes]) -> bytes:
    return re.sub(rb'name: "prob"', b'name: "fc100"', a["exp.prototxt"], count=1)


def _port(body: str) -> Callable[[dict[str, bytes]], bytes]:
    """A port module: the seed's expectation head with `body` spliced into it."""
    text = (
        "import os, sys, time, ctypes\n"
        "import torch\n"
        "from torch import nn\n"
        "import reference\n\n"
        "class Port(reference.ExpectationHead):\n"
        "    def __init__(self):\n"
        "        super().__init__(16, 100)\n\n"
        "    def forward(self, pool5):\n"
        "        out = super().forward(pool5)\n"
        + "".join(f"        {line}\n" for line in body.splitlines())
        + "        return out\n\n"
        "def make():\n"
        "    return Port()\n"
    )
    return lambda a: text.encode()


FILES: dict[str, Callable[[dict[str, bytes]], bytes]] = {
    "exp.prototxt": _exp,
    "sig.prototxt": lambda a: a["sig.prototxt"],
    "train.prototxt": lambda a: a["train.prototxt"],
    "tiny.prototxt": lambda a: a["tiny.prototxt"],
    "exp.caffemodel": lambda a: a["exp.caffemodel"],
    "sig.caffemodel": lambda a: a["sig.caffemodel"],
    "truncated.caffemodel": lambda a: a["exp.caffemodel"][: len(a["exp.caffemodel"]) // 2],
    "empty.caffemodel": lambda a: b"",
    "random.caffemodel": lambda a: bytes(range(256)) * 40,
    "binary.prototxt": lambda a: bytes(range(256)) * 4,
    "latin1.prototxt": lambda a: a["exp.prototxt"].replace(b'"pool5"', '"poolé"'.encode("latin-1")),
    "empty.prototxt": lambda a: b"",
    "comment.prototxt": lambda a: b"# nothing but a comment\n",
    "malformed.prototxt": lambda a: a["exp.prototxt"][:-40],
    "noinput.prototxt": _no_input,
    "dup.prototxt": _duplicate_names,
    "zerodim.prototxt": _edit("exp.prototxt", b"dim: 16", b"dim: 0"),
    "negdim.prototxt": _edit("exp.prototxt", b"dim: 16", b"dim: -4"),
    "unknown_type.prototxt": _edit("exp.prototxt", b'type: "Softmax"', b'type: "Softmaxx"'),
    "missing_bottom.prototxt": _edit("exp.prototxt", b'bottom: "prob"', b'bottom: "probb"'),
    "nosoftmax.prototxt": lambda a: a["sig.prototxt"],
    "map_bad_json.json": lambda a: b"{not json",
    "map_list.json": lambda a: b'["fc100/0"]',
    "map_typo.json": lambda a: b'{"fc10/0": "fc100.weight"}',
    "garbage.npz": lambda a: b"PK\x03\x04 not really a zip",
    "notes.txt": lambda a: b"the user's notes\n",
    "report.json": lambda a: b'{"the user\'s": "earlier report"}\n',
    "port_ok.py": _port(""),
    "port_empty.py": _port("out = {}"),
    "port_strings.py": _port("out = {k: 'x' for k in out}"),
    "port_shape.py": _port("out['pred_age'] = out['pred_age'][:1]"),
    "port_raises.py": _port("raise RuntimeError('port blew up')"),
    "port_segv.py": _port("ctypes.string_at(0)"),
    "port_exit.py": _port("os._exit(0)"),
    "port_sleep.py": _port("time.sleep(3600)"),
    "port_import_raises.py": lambda a: b"raise RuntimeError('import-time failure')\n",
    "port_factory_raises.py": lambda a: b"def make():\n    raise ValueError('factory failure')\n",
    "port_not_module.py": lambda a: b"def make():\n    return 42\n",
}


# -- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fuzz:
    """One bad input or fault: the command line (``{f}`` is the case's directory), the
    files it needs, the exit code and a regex the message must match."""

    id: str
    argv: tuple[str, ...]
    code: int
    message: str
    files: tuple[str, ...] = ()
    process: bool = False  # run as a real process (its own environment)
    env: dict[str, str] = field(default_factory=dict)
    creates: tuple[str, ...] = ()  # files the command may create in the case's directory


def F(id: str, argv: str, code: int, message: str, *files: str, **kw: object) -> Fuzz:
    return Fuzz(id, tuple(argv.split()), code, message, tuple(files), **kw)  # type: ignore[arg-type]


EXISTS = r"exists.*--force"
INPUT = r"one of (this command's|the) inputs"
DIRECTORY = r"is a directory"
BADCOUNT = r"not a positive integer|is negative|must be (positive|0 or more|at least)"
VP = "validate-port {f}/exp.prototxt --weights {f}/exp.caffemodel --generate"

CASES: tuple[Fuzz, ...] = (
    # -- the command line itself
    F("no-command", "", 2, r"required|command"),
    F("unknown-command", "frobnicate", 2, r"invalid choice"),
    F("unknown-option", "report --frobnicate", 2, r"unrecognized arguments"),
    # -- prototxt
    F("prototxt-batch-0", "prototxt expectation --batch 0", 2, BADCOUNT),
    F("prototxt-batch-negative", "prototxt expectation --batch -3", 2, BADCOUNT),
    F("prototxt-bins-0", "prototxt expectation --bins 0", 2, BADCOUNT),
    F("prototxt-features-0", "prototxt sigmoid_scale --features 0", 2, BADCOUNT),
    F("prototxt-unknown-head", "prototxt alexnet", 2, r"invalid choice"),
    F("prototxt-exists", "prototxt expectation -o {f}/notes.txt", 2, EXISTS, "notes.txt"),
    F("prototxt-dir", "prototxt expectation -o {f}", 2, DIRECTORY),
    F("prototxt-no-parent", "prototxt expectation -o {f}/no/such/x.prototxt", 2, r"no/such"),
    # -- surgery: the net
    F("surgery-missing-net", "surgery {f}/nope.prototxt -o {f}/o.caffemodel", 2, r"nope\.prototxt"),
    F("surgery-net-is-dir", "surgery {f} -o {f}/o.caffemodel", 2, DIRECTORY),
    F(
        "surgery-binary-net",
        "surgery {f}/binary.prototxt -o {f}/o.caffemodel",
        2,
        r"binary\.prototxt.*(UTF-8|text|decode)",
        "binary.prototxt",
    ),
    F(
        "surgery-latin1-net",
        "surgery {f}/latin1.prototxt -o {f}/o.caffemodel",
        2,
        r"latin1\.prototxt.*(UTF-8|text|decode)",
        "latin1.prototxt",
    ),
    F(
        "surgery-empty-net",
        "surgery {f}/empty.prototxt -o {f}/o.caffemodel",
        2,
        r"empty\.prototxt.*(no layers|empty)",
        "empty.prototxt",
    ),
    F(
        "surgery-comment-net",
        "surgery {f}/comment.prototxt -o {f}/o.caffemodel",
        2,
        r"(no layers|empty)",
        "comment.prototxt",
    ),
    F(
        "surgery-malformed-net",
        "surgery {f}/malformed.prototxt -o {f}/o.caffemodel",
        2,
        r"malformed",
        "malformed.prototxt",
    ),
    F(
        "surgery-no-input",
        "surgery {f}/noinput.prototxt -o {f}/o.caffemodel",
        2,
        r"(no Input|input)",
        "noinput.prototxt",
    ),
    F(
        "surgery-duplicate-names",
        "surgery {f}/dup.prototxt -o {f}/o.caffemodel",
        2,
        r"fc100.*(twice|duplicate)|(twice|duplicate).*fc100",
        "dup.prototxt",
    ),
    F(
        "surgery-zero-dim",
        "surgery {f}/zerodim.prototxt -o {f}/o.caffemodel",
        2,
        r"(zero|0).*(dim|shape)|(dim|shape).*(zero|0)",
        "zerodim.prototxt",
    ),
    F(
        "surgery-negative-dim",
        "surgery {f}/negdim.prototxt -o {f}/o.caffemodel",
        2,
        r"(dim|shape)",
        "negdim.prototxt",
    ),
    F(
        "surgery-unknown-layer-type",
        "surgery {f}/unknown_type.prototxt -o {f}/o.caffemodel",
        2,
        r"Softmaxx",
        "unknown_type.prototxt",
    ),
    F(
        "surgery-missing-bottom",
        "surgery {f}/missing_bottom.prototxt -o {f}/o.caffemodel",
        2,
        r"probb",
        "missing_bottom.prototxt",
    ),
    F(
        "surgery-layer-missing",
        "surgery {f}/exp.prototxt -o {f}/o.caffemodel --layer nope",
        2,
        r"nope",
        "exp.prototxt",
    ),
    F(
        "surgery-layer-empty",
        "surgery {f}/exp.prototxt -o {f}/o.caffemodel --layer=",
        2,
        r"--layer",
        "exp.prototxt",
    ),
    F(
        "surgery-layer-not-conv",
        "surgery {f}/exp.prototxt -o {f}/o.caffemodel --layer prob",
        2,
        r"prob.*Softmax",
        "exp.prototxt",
    ),
    # -- surgery: the weights and the output
    F(
        "surgery-weights-truncated",
        "surgery {f}/exp.prototxt -o {f}/o.caffemodel --weights {f}/truncated.caffemodel",
        2,
        r"truncated\.caffemodel",
        "exp.prototxt",
        "truncated.caffemodel",
    ),
    F(
        "surgery-weights-empty",
        "surgery {f}/exp.prototxt -o {f}/o.caffemodel --weights {f}/empty.caffemodel",
        2,
        r"empty\.caffemodel",
        "exp.prototxt",
        "empty.caffemodel",
    ),
    F(
        "surgery-weights-random",
        "surgery {f}/exp.prototxt -o {f}/o.caffemodel --weights {f}/random.caffemodel",
        2,
        r"random\.caffemodel",
        "exp.prototxt",
        "random.caffemodel",
    ),
    F(
        "surgery-weights-other-net",
        "surgery {f}/exp.prototxt -o {f}/o.caffemodel --weights {f}/sig.caffemodel",
        2,
        r"sig\.caffemodel.*fc100|fc100.*sig\.caffemodel",
        "exp.prototxt",
        "sig.caffemodel",
    ),
    F(
        "surgery-weights-is-prototxt",
        "surgery {f}/exp.prototxt -o {f}/o.caffemodel --weights {f}/sig.prototxt",
        2,
        r"sig\.prototxt",
        "exp.prototxt",
        "sig.prototxt",
    ),
    F(
        "surgery-weights-missing",
        "surgery {f}/exp.prototxt -o {f}/o.caffemodel --weights {f}/none.caffemodel",
        2,
        r"none\.caffemodel",
        "exp.prototxt",
    ),
    F(
        "surgery-out-exists",
        "surgery {f}/exp.prototxt -o {f}/notes.txt",
        2,
        EXISTS,
        "exp.prototxt",
        "notes.txt",
    ),
    F(
        "surgery-out-is-net",
        "surgery {f}/exp.prototxt -o {f}/exp.prototxt --force",
        2,
        INPUT,
        "exp.prototxt",
    ),
    F(
        "surgery-out-is-weights",
        "surgery {f}/exp.prototxt -o {f}/exp.caffemodel --weights {f}/exp.caffemodel --force",
        2,
        INPUT,
        "exp.prototxt",
        "exp.caffemodel",
    ),
    F("surgery-out-dir", "surgery {f}/exp.prototxt -o {f}", 2, DIRECTORY, "exp.prototxt"),
    F(
        "surgery-out-no-parent",
        "surgery {f}/exp.prototxt -o {f}/a/b/o.caffemodel",
        2,
        r"a/b",
        "exp.prototxt",
    ),
    # -- export-onnx
    F(
        "onnx-weights-other-net",
        "export-onnx {f}/exp.prototxt {f}/sig.caffemodel -o {f}/m.onnx",
        2,
        r"sig\.caffemodel",
        "exp.prototxt",
        "sig.caffemodel",
    ),
    F(
        "onnx-weights-truncated",
        "export-onnx {f}/exp.prototxt {f}/truncated.caffemodel -o {f}/m.onnx",
        2,
        r"truncated\.caffemodel",
        "exp.prototxt",
        "truncated.caffemodel",
    ),
    F(
        "onnx-weights-missing",
        "export-onnx {f}/exp.prototxt {f}/none.caffemodel -o {f}/m.onnx",
        2,
        r"none\.caffemodel",
        "exp.prototxt",
    ),
    F(
        "onnx-not-a-head",
        "export-onnx {f}/tiny.prototxt {f}/exp.caffemodel -o {f}/m.onnx",
        2,
        r"tiny\.prototxt|head",
        "tiny.prototxt",
        "exp.caffemodel",
    ),
    F(
        "onnx-out-exists",
        "export-onnx {f}/exp.prototxt {f}/exp.caffemodel -o {f}/notes.txt",
        2,
        EXISTS,
        "exp.prototxt",
        "exp.caffemodel",
        "notes.txt",
    ),
    F(
        "onnx-out-is-weights",
        "export-onnx {f}/exp.prototxt {f}/exp.caffemodel -o {f}/exp.caffemodel --force",
        2,
        INPUT,
        "exp.prototxt",
        "exp.caffemodel",
    ),
    F(
        "onnx-out-dir",
        "export-onnx {f}/exp.prototxt {f}/exp.caffemodel -o {f}",
        2,
        DIRECTORY,
        "exp.prototxt",
        "exp.caffemodel",
    ),
    F(
        "onnx-examples-0",
        "export-onnx {f}/exp.prototxt {f}/exp.caffemodel -o {f}/m.onnx --examples 0",
        2,
        BADCOUNT,
    ),
    F(
        "onnx-batch-0",
        "export-onnx {f}/exp.prototxt {f}/exp.caffemodel -o {f}/m.onnx --batch-check 0",
        2,
        BADCOUNT,
    ),
    F(
        "onnx-binary-net",
        "export-onnx {f}/binary.prototxt {f}/exp.caffemodel -o {f}/m.onnx",
        2,
        r"binary\.prototxt",
        "binary.prototxt",
        "exp.caffemodel",
    ),
    # -- validate-port: counts and options
    F("vp-examples-0", VP + " --port port_ok:make --examples 0", 2, BADCOUNT),
    F("vp-examples-negative", VP + " --port port_ok:make --examples -5", 2, BADCOUNT),
    F("vp-batch-0", VP + " --port port_ok:make --batch 0", 2, BADCOUNT),
    F("vp-batch-negative", VP + " --port port_ok:make --batch -2", 2, BADCOUNT),
    F("vp-seed-negative", VP + " --port port_ok:make --seed -1", 2, BADCOUNT),
    F("vp-bins-0", VP + " --port port_ok:make --head expectation --bins 0", 2, BADCOUNT),
    # -- validate-port: the net and the weights
    F(
        "vp-net-missing",
        "validate-port {f}/nope.prototxt --port port_ok:make",
        2,
        r"nope\.prototxt",
        "port_ok.py",
    ),
    F(
        "vp-net-binary",
        "validate-port {f}/binary.prototxt --port port_ok:make",
        2,
        r"binary\.prototxt",
        "binary.prototxt",
        "port_ok.py",
    ),
    F(
        "vp-net-latin1",
        "validate-port {f}/latin1.prototxt --port port_ok:make",
        2,
        r"latin1\.prototxt",
        "latin1.prototxt",
        "port_ok.py",
    ),
    F(
        "vp-net-empty",
        "validate-port {f}/empty.prototxt --port port_ok:make",
        2,
        r"(no layers|empty)",
        "empty.prototxt",
        "port_ok.py",
    ),
    F(
        "vp-net-malformed",
        "validate-port {f}/malformed.prototxt --port port_ok:make",
        2,
        r"malformed",
        "malformed.prototxt",
        "port_ok.py",
    ),
    F(
        "vp-net-no-input",
        "validate-port {f}/noinput.prototxt --port port_ok:make",
        2,
        r"(no Input|input)",
        "noinput.prototxt",
        "port_ok.py",
    ),
    F(
        "vp-net-duplicate-names",
        "validate-port {f}/dup.prototxt --port port_ok:make",
        2,
        r"twice|duplicate",
        "dup.prototxt",
        "port_ok.py",
    ),
    F(
        "vp-net-zero-dim",
        "validate-port {f}/zerodim.prototxt --port port_ok:make",
        2,
        r"(zero|0).*(dim|shape)|(dim|shape).*(zero|0)",
        "zerodim.prototxt",
        "port_ok.py",
    ),
    F(
        "vp-net-unknown-type",
        "validate-port {f}/unknown_type.prototxt --port port_ok:make",
        2,
        r"Softmaxx",
        "unknown_type.prototxt",
        "port_ok.py",
    ),
    F(
        "vp-head-no-softmax",
        "validate-port {f}/nosoftmax.prototxt --port port_ok:make --head expectation --bins 100",
        2,
        r"Softmax",
        "nosoftmax.prototxt",
        "port_ok.py",
    ),
    F(
        "vp-weights-other-net",
        "validate-port {f}/exp.prototxt --port port_ok:make --weights {f}/sig.caffemodel",
        2,
        r"sig\.caffemodel",
        "exp.prototxt",
        "sig.caffemodel",
        "port_ok.py",
    ),
    F(
        "vp-weights-truncated",
        "validate-port {f}/exp.prototxt --port port_ok:make --weights {f}/truncated.caffemodel",
        2,
        r"truncated\.caffemodel",
        "exp.prototxt",
        "truncated.caffemodel",
        "port_ok.py",
    ),
    F(
        "vp-weights-random",
        "validate-port {f}/exp.prototxt --port port_ok:make --weights {f}/random.caffemodel",
        2,
        r"random\.caffemodel",
        "exp.prototxt",
        "random.caffemodel",
        "port_ok.py",
    ),
    # -- validate-port: --map and --replay
    F(
        "vp-map-missing",
        VP + " --port port_ok:make --map {f}/none.json",
        2,
        r"none\.json",
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
    ),
    F(
        "vp-map-bad-json",
        VP + " --port port_ok:make --map {f}/map_bad_json.json",
        2,
        r"map_bad_json\.json",
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
        "map_bad_json.json",
    ),
    F(
        "vp-map-not-a-dict",
        VP + " --port port_ok:make --map {f}/map_list.json",
        2,
        r"map_list\.json",
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
        "map_list.json",
    ),
    F(
        "vp-map-typo",
        VP + " --port port_ok:make --map {f}/map_typo.json",
        2,
        r"fc10/0.*fc100/0",
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
        "map_typo.json",
    ),
    F(
        "vp-replay-missing",
        VP + " --port port_ok:make --replay {f}/none.npz",
        2,
        r"none\.npz",
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
    ),
    F(
        "vp-replay-garbage",
        VP + " --port port_ok:make --replay {f}/garbage.npz",
        2,
        r"garbage\.npz",
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
        "garbage.npz",
    ),
    F(
        "vp-replay-not-npz",
        VP + " --port port_ok:make --replay {f}/notes.txt",
        2,
        r"notes\.txt",
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
        "notes.txt",
    ),
    # -- validate-port: outputs
    F(
        "vp-json-exists",
        VP + " --port port_ok:make --json {f}/notes.txt",
        2,
        EXISTS,
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
        "notes.txt",
    ),
    F(
        "vp-json-is-net",
        VP + " --port port_ok:make --json {f}/exp.prototxt --force",
        2,
        INPUT,
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
    ),
    F(
        "vp-json-is-port-source",
        VP + " --port port_ok:make --json {f}/port_ok.py --force",
        2,
        INPUT,
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
    ),
    F(
        "vp-json-is-weights",
        VP + " --port port_ok:make --json {f}/exp.caffemodel --force",
        2,
        INPUT,
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
    ),
    F(
        "vp-json-dir",
        VP + " --port port_ok:make --json {f}",
        2,
        DIRECTORY,
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
    ),
    F(
        "vp-json-no-parent",
        VP + " --port port_ok:make --json {f}/x/y/r.json",
        2,
        r"x/y",
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
    ),
    F(
        "vp-save-failure-is-file",
        VP + " --port port_ok:make --save-failure {f}/notes.txt",
        2,
        r"notes\.txt",
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
        "notes.txt",
    ),
    # -- validate-port: the port
    F(
        "vp-port-no-colon",
        VP + " --port port_ok",
        2,
        r"MODULE:CALLABLE|port_ok",
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
    ),
    F(
        "vp-port-no-module",
        VP + " --port no_such_port_module:make",
        2,
        r"no_such_port_module",
        "exp.prototxt",
        "exp.caffemodel",
    ),
    F(
        "vp-port-no-callable",
        VP + " --port port_ok:nothing_here",
        2,
        r"nothing_here",
        "exp.prototxt",
        "exp.caffemodel",
        "port_ok.py",
    ),
    F(
        "vp-port-import-raises",
        VP + " --port port_import_raises:make",
        1,
        r"port_import_raises.*import-time failure",
        "exp.prototxt",
        "exp.caffemodel",
        "port_import_raises.py",
    ),
    F(
        "vp-port-factory-raises",
        VP + " --port port_factory_raises:make",
        1,
        r"factory failure",
        "exp.prototxt",
        "exp.caffemodel",
        "port_factory_raises.py",
    ),
    F(
        "vp-port-not-a-module",
        VP + " --port port_not_module:make",
        1,
        r"(nn\.Module|Module).*int|int.*Module",
        "exp.prototxt",
        "exp.caffemodel",
        "port_not_module.py",
    ),
    F(
        "vp-port-forward-raises",
        VP + " --port port_raises:make --examples 3",
        1,
        r"port blew up",
        "exp.prototxt",
        "exp.caffemodel",
        "port_raises.py",
    ),
    F(
        "vp-port-returns-nothing",
        VP + " --port port_empty:make --examples 3",
        1,
        r"(none of|no blob|nothing|0 blobs)",
        "exp.prototxt",
        "exp.caffemodel",
        "port_empty.py",
    ),
    F(
        "vp-port-returns-strings",
        VP + " --port port_strings:make --examples 3",
        1,
        r"str|tensor",
        "exp.prototxt",
        "exp.caffemodel",
        "port_strings.py",
    ),
    F(
        "vp-port-wrong-shape",
        VP + " --port port_shape:make --examples 3",
        1,
        r"pred_age",
        "exp.prototxt",
        "exp.caffemodel",
        "port_shape.py",
    ),
    F(
        "vp-port-segfault",
        VP + " --port port_segv:make --examples 3 --save-failure {f}/failures",
        1,
        r"(SIGSEGV|signal 11|segmentation).*example",
        "exp.prototxt",
        "exp.caffemodel",
        "port_segv.py",
        creates=("failures",),
    ),
    F(
        "vp-port-exits",
        VP + " --port port_exit:make --examples 3",
        1,
        r"exit.*example|example.*exit",
        "exp.prototxt",
        "exp.caffemodel",
        "port_exit.py",
    ),
    F(
        "vp-port-hangs",
        VP + " --port port_sleep:make --examples 3 --timeout 3",
        1,
        r"(within|time|limit).*example|example.*(within|time|limit)",
        "exp.prototxt",
        "exp.caffemodel",
        "port_sleep.py",
    ),
    # -- train
    F("train-steps-0", "train expectation --out {f}/run --steps 0", 2, BADCOUNT),
    F("train-steps-negative", "train expectation --out {f}/run --steps -1", 2, BADCOUNT),
    F("train-batch-0", "train expectation --out {f}/run --batch 0", 2, BADCOUNT),
    F("train-features-0", "train expectation --out {f}/run --features 0", 2, BADCOUNT),
    F("train-bins-0", "train expectation --out {f}/run --bins 0", 2, BADCOUNT),
    F("train-snapshot-0", "train expectation --out {f}/run --snapshot 0", 2, BADCOUNT),
    F("train-seed-negative", "train expectation --out {f}/run --seed -1", 2, BADCOUNT),
    F("train-out-is-file", "train expectation --out {f}/notes.txt", 2, r"notes\.txt", "notes.txt"),
    F(
        "train-out-not-empty",
        "train expectation --out {f}",
        2,
        r"not empty|exists",
        "notes.txt",
    ),
    F("train-lr-nan", "train expectation --out {f}/run --lr nan", 2, r"--lr.*(finite|nan)"),
    F("train-lr-inf", "train expectation --out {f}/run --lr inf", 2, r"--lr.*(finite|inf)"),
    F("train-momentum-nan", "train expectation --out {f}/run --momentum nan", 2, r"--momentum"),
    F("prototxt-sigma-nan", "prototxt sigmoid_scale --loss smooth_l1 --sigma nan", 2, r"--sigma"),
    F("prototxt-sigma-0", "prototxt sigmoid_scale --loss smooth_l1 --sigma 0", 2, r"--sigma"),
    F("train-sigma-negative", "train sigmoid_scale --out {f}/r --sigma -1", 2, r"--sigma"),
    F("vp-timeout-0", VP + " --port port_ok:make --timeout 0", 2, r"--timeout"),
    F("report-timeout-nan", "report --out {f}/r --timeout nan", 2, r"--timeout"),
    F(
        "train-unknown-solver",
        "train expectation --out {f}/run --solver LBFGS",
        2,
        r"invalid choice",
    ),
    # -- report
    F("report-out-is-file", "report --out {f}/notes.txt", 2, r"notes\.txt", "notes.txt"),
    F("report-out-has-report", "report --out {f}", 2, r"report\.json.*exists", "report.json"),
    F("report-examples-0", "report --out {f}/r --examples 0", 2, BADCOUNT),
    F("report-caffe-missing", "report --out {f}/r --caffe {f}/nocaffe", 2, r"nocaffe"),
    F("report-caffe-not-caffe", "report --out {f}/r --caffe {f}", 2, r"caffe"),
    F("report-unknown-profile", "report --profile fast", 2, r"invalid choice"),
    # -- check-build
    F("check-build-nothing", "check-build", 2, r"--caffe|--variant"),
    F("check-build-caffe-missing", "check-build --caffe {f}/nocaffe", 2, r"nocaffe"),
    F("check-build-examples-0", "check-build --variant default --examples 0", 2, BADCOUNT),
    F(
        "check-build-json-exists",
        "check-build --variant default --json {f}/notes.txt",
        2,
        EXISTS,
        "notes.txt",
    ),
    F(
        "check-build-json-dir",
        "check-build --variant default --json {f}",
        2,
        DIRECTORY,
    ),
    F(
        "check-build-golden-empty",
        "check-build --variant default --golden {f}",
        2,
        r"golden",
    ),
    F(
        "check-build-golden-damaged",
        "check-build --variant default --golden {f}",
        2,
        r"garbage\.npz",
        "garbage.npz",
    ),
    F("check-build-unknown-variant", "check-build --variant gpu", 2, r"invalid choice"),
    # -- golden
    F("golden-out-is-file", "golden --out {f}/notes.txt", 2, r"notes\.txt", "notes.txt"),
    # -- mutants
    F("mutants-max-examples-0", "mutants --max-examples 0", 2, BADCOUNT),
    F("mutants-max-examples-negative", "mutants --max-examples -1", 2, BADCOUNT),
    # -- caffe
    F("caffe-ensure-jobs-0", "caffe ensure --jobs 0", 2, BADCOUNT),
    F("caffe-info-missing", "caffe info --caffe {f}/nocaffe", 2, r"nocaffe"),
    F(
        "caffe-info-env-missing",
        "caffe info",
        2,
        r"CROSSVAL_CAFFE|nocaffe",
        env={"CROSSVAL_CAFFE": "{f}/nocaffe"},
        process=True,
    ),
    F(
        "caffe-ensure-cache-is-file",
        "caffe ensure --quiet",
        2,
        r"CROSSVAL_CACHE_DIR",
        "notes.txt",
        env={"CROSSVAL_CACHE_DIR": "{f}/notes.txt"},
        process=True,
    ),
    # conformance: a converter that cannot be loaded, a grid it cannot select, outputs
    F("conf-converter-no-colon", "conformance --converter nocolon", 2, r"MODULE:CALLABLE"),
    F("conf-converter-no-module", "conformance --converter nosuch:convert", 2, r"cannot import"),
    F(
        "conf-converter-no-callable",
        "conformance --converter crossval.conformance.reference:nothing",
        2,
        r"no callable 'nothing'",
    ),
    F(
        "conf-layers-unknown",
        "conformance --converter crossval.conformance.reference:convert --layers Pooling,Nope",
        2,
        r"'Nope' is neither a layer type",
    ),
    F(
        "conf-timeout-0",
        "conformance --converter crossval.conformance.reference:convert --timeout 0",
        2,
        r"--timeout",
    ),
    F(
        "conf-case-unknown",
        "conformance --converter crossval.conformance.reference:convert --case Nope/99",
        2,
        r"no such case",
    ),
    F(
        "conf-json-exists",
        "conformance --converter crossval.conformance.reference:convert --layers Pooling "
        "--json {f}/report.json",
        2,
        EXISTS,
        "report.json",
    ),
    F(
        "conf-out-not-empty",
        "conformance --converter crossval.conformance.reference:convert --layers Pooling --out {f}",
        2,
        r"not empty|exists",
        "notes.txt",
    ),
)


# -- the runner --------------------------------------------------------------------------


def _workers(tmpdir: Path) -> set[int]:
    """Pids of live Caffe workers started under `tmpdir` (a worker's log is open in its own
    directory inside it), so other test runs on the machine do not count. A worker is
    forked from a warm process (crossval.warmstart) whose command line names the server."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if b"crossval.caffe_side.server" not in cmd or state == "Z":
                continue
            opened = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if any(path.startswith(f"{tmpdir}/") for path in opened):
            pids.add(int(entry.name))
    return pids


def _snapshot(d: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(d.rglob("*"))
    }


@dataclass
class Outcome:
    code: int
    out: str


def _run_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Outcome:
    code = cli.main(argv)
    cap = capsys.readouterr()
    return Outcome(code, cap.out + cap.err)


def _run_process(argv: list[str], env: dict[str, str], cwd: Path) -> Outcome:
    proc = run_crossval(*argv, env=env, cwd=cwd, timeout=120)
    return Outcome(proc.returncode, proc.stdout + proc.stderr)


@pytest.fixture()
def case_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fuzz(
    case: Fuzz,
    artifacts: dict[str, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = tmp_path / "user"
    user.mkdir()
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    for name in case.files:
        (user / name).write_bytes(FILES[name](artifacts))
    before = _snapshot(user)
    argv = [a.replace("{f}", str(user)) for a in case.argv]
    env_extra = {k: v.replace("{f}", str(user)) for k, v in case.env.items()}
    pythonpath = ":".join(
        [
            str(user),
            str(ROOT),
            str(TESTS),
            *filter(None, os.environ.get("PYTHONPATH", "").split(":")),
        ]
    )
    if case.process:
        env = {**os.environ, "TMPDIR": str(systmp), "PYTHONPATH": pythonpath, **env_extra}
        outcome = _run_process(argv, env, user)
    else:
        monkeypatch.setenv("TMPDIR", str(systmp))
        monkeypatch.setenv("PYTHONPATH", pythonpath)
        for k, v in env_extra.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(tempfile, "tempdir", str(systmp))
        monkeypatch.syspath_prepend(str(user))
        monkeypatch.chdir(user)
        outcome = _run_in_process(argv, capsys)
    shown = f"[{case.id}] exit {outcome.code}:\n{outcome.out}"
    assert outcome.code == case.code, shown
    assert re.search(case.message, outcome.out, re.IGNORECASE | re.DOTALL), shown
    assert "Traceback" not in outcome.out, shown
    assert outcome.code != EXIT_INTERNAL, shown
    after = _snapshot(user)
    for name, content in before.items():
        assert after.get(name) == content, f"{shown}\nthe user's {name} was changed or removed"
    new = sorted(
        n for n in set(after) - set(before) if not any(n.startswith(c) for c in case.creates)
    )
    assert not new, f"{shown}\nleft in the user's directory: {new}"
    deadline = time.monotonic() + 10
    while _workers(systmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _workers(systmp), f"{shown}\nCaffe workers left running"
    left = sorted(str(p.relative_to(systmp)) for p in systmp.rglob("*"))
    assert not left, f"{shown}\nleft in the temporary directory: {left}"


def test_the_table_is_large_and_covers_every_command() -> None:
    assert len(CASES) >= 100
    ids = {c.id for c in CASES}
    assert len(ids) == len(CASES), "duplicate case ids"
    commands = {c.argv[0] for c in CASES if c.argv}
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) <= commands | {"caffe"}, set(sub.choices) - commands  # type: ignore[arg-type]


# -- faults that need a real process and a clock ------------------------------------------


def _start(argv: list[str], tmp: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp)
    env["PYTHONPATH"] = ":".join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    env.setdefault("GLOG_minloglevel", "2")
    return subprocess.Popen(
        [sys.executable, "-m", "crossval", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_worker(tmpdir: Path, timeout: float = 60) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = _workers(tmpdir)
        if new:
            return new
        time.sleep(0.1)
    raise AssertionError("no Caffe worker started")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_is_an_interruption(
    sig: signal.Signals, tmp_path: Path, caffe_install: provision.CaffeInstall
) -> None:
    systmp = tmp_path / "tmp"
    systmp.mkdir()
    out = tmp_path / "report"
    proc = _start(["report", "--out", str(out), "--profile", "dev"], systmp)
    _wait_for_worker(systmp)
    time.sleep(1.0)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, stdout + stderr
    assert "interrupted" in stderr and "Traceback" not in stderr + stdout
    deadline = time.monotonic() + 10
    while _workers(systmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _workers(systmp), "the worker outlived the interrupted run"
    assert not list(systmp.rglob("*")), list(systmp.rglob("*"))
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name or p.name.startswith(".")]


def test_sigkill_of_crossval_takes_the_worker_down(
    tmp_path: Path, caffe_install: provision.CaffeInstall
) -> None:
    systmp = tmp_path / "tmp"
    systmp.mkdir()
    proc = _start(["report", "--out", str(tmp_path / "r"), "--profile", "dev"], systmp)
    _wait_for_worker(systmp)
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while _workers(systmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _workers(systmp), "a worker outlived its SIGKILLed parent"


def test_two_surgeries_racing_for_one_new_path(artifacts: dict[str, bytes], tmp_path: Path) -> None:
    net = tmp_path / "exp.prototxt"
    net.write_bytes(artifacts["exp.prototxt"])
    out = tmp_path / "init.caffemodel"
    procs = [_start(["surgery", str(net), "-o", str(out)], tmp_path) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    loser = results[[p.returncode for p in procs].index(2)]
    # refused before it wrote ("exists") or at publishing, when the other run won the name
    assert "exists" in loser[1] or "was created by something else" in loser[1], loser
    assert out.read_bytes() == artifacts["exp.caffemodel"]


def test_full_disk_keeps_the_result_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caffe_install: provision.CaffeInstall
) -> None:
    """A prototxt written to a full file system: nothing left there, the text printed."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(small)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.fail("this test needs root to mount a 4 KiB tmpfs (CI runs as root)")
    try:
        (small / "filler").write_bytes(b"x" * 4096)
        code = cli.main(["prototxt", "expectation", "-o", str(small / "net.prototxt")])
        cap = capsys.readouterr()
        assert code == 2, cap.err
        assert "No space left" in cap.err or "full" in cap.err, cap.err
        assert 'name: "pred_age"' in cap.out, "the computed prototxt was lost"
        assert sorted(p.name for p in small.iterdir()) == ["filler"]
    finally:
        subprocess.run(["umount", str(small)], check=False)
