"""The `crossval` command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

from .errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CrossvalError,
    clear_interrupt,
    on_interrupt,
    quiet_interrupts,
    raise_if_interrupted,
)
from .inputs import finite_float, nonnegative_int, positive_float, positive_int


def _usable_cache_dir() -> None:
    """CROSSVAL_CACHE_DIR, when set, must be a directory crossval can write in."""
    import tempfile

    from .inputs import InputError

    given = os.environ.get("CROSSVAL_CACHE_DIR")
    if not given:
        return
    path = Path(given).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"CROSSVAL_CACHE_DIR={given} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".crossval-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(
            f"CROSSVAL_CACHE_DIR={given} cannot be used for the build: {exc.strerror or exc}"
        ) from None


class _Names:
    """The names of table `attribute` of module `module` as argparse choices, read from the
    table when argparse first needs them (to check a value or print the help), so that
    building the parser imports no torch. Every choice list of a head, loss, solver or
    profile is one of these; `extra` names follow the table's."""

    def __init__(self, module: str, attribute: str, *extra: str) -> None:
        self._module = module
        self._attribute = attribute
        self._extra = extra
        self._names: tuple[str, ...] | None = None

    def _get(self) -> tuple[str, ...]:
        if self._names is None:
            table: Iterable[str] = getattr(import_module(self._module), self._attribute)
            self._names = (*table, *self._extra)
        return self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __contains__(self, name: object) -> bool:
        return name in self._get()

    def __len__(self) -> int:
        return len(self._get())


_SOLVERS = "crossval.reference.solvers"  # the solver choices' tables


def _choice(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    """`parser.add_argument` with lazy `choices` (a `_Names`): a placeholder metavar while
    argparse checks the argument, so that the names are not read then; the help shows them."""
    action = parser.add_argument(*flags, metavar="NAME", **kwargs)
    action.metavar = None


def _single_threaded() -> None:
    """The commands that run the heads' checks start single-threaded (see
    `checks.single_threaded`); importing crossval does not change torch's settings."""
    from .checks import single_threaded

    single_threaded()


def _caffe_ensure(args: argparse.Namespace) -> int:
    from . import provision

    _usable_cache_dir()

    install = provision.ensure(args.caffe, quiet=args.quiet, jobs=args.jobs, variant=args.variant)
    where = "cached" if install.cached else install.origin
    what = f", variant {install.variant}" if install.variant not in ("", "default") else ""
    print(f"pycaffe ({where}{what}): {install.python_path}")
    return 0


def _caffe_info(args: argparse.Namespace) -> int:
    from . import provision
    from .provision import info

    install = provision.locate(args.caffe, variant=args.variant)
    data = info.collect(install)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(info.format_text(data))
    return 0


def _surgery(args: argparse.Namespace) -> int:
    from .surgery import surgery
    from .worker import CaffeWorker

    with CaffeWorker(timeout=args.timeout) as worker:
        result = surgery(
            worker,
            Path(args.prototxt),
            Path(args.output),
            layer=args.layer,
            weights=Path(args.weights) if args.weights else None,
            force=args.force,
        )
    print(result)
    return 0


_ZOO_NETS = (
    "levi_hassner_age",
    "levi_hassner_age_v1",
    "caffenet_age",
    "googlenet_block",
    "resnet_block",
)


def _prototxt(args: argparse.Namespace) -> int:
    from . import outputs
    from .worker import CaffeWorker

    target = outputs.target(args.output, "-o", force=args.force) if args.output else None

    opts: dict[str, object] = {"features": args.features, "batch": args.batch}
    head = False
    if args.head in ("dex_vgg16", "tiny_cnn"):  # whole nets: deploy only
        opts = {"batch": args.batch, "bins": args.bins}
        if args.size:
            opts["size"] = args.size
    elif args.head in _ZOO_NETS:  # the zoo's age nets: their own bins (8)
        opts = {"batch": args.batch}
        if args.size:
            opts["size"] = args.size
    else:  # one of the heads
        from .heads import HEADS, LOSSES

        head, row = True, HEADS[args.head]
        if row.has_bins:
            opts["bins"] = args.bins
        if row.renamable and args.ip_name:
            opts["ip_name"] = args.ip_name
    if head and not args.deploy:
        opts["loss"] = args.loss
        if LOSSES[args.loss].has_sigma:
            opts["sigma"] = args.sigma
    with CaffeWorker(timeout=args.timeout) as worker:
        text = worker.prototxt(args.head, **opts)
    if target is not None:
        outputs.write_text(target, text)
    else:
        sys.stdout.write(text)
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from . import outputs

    inputs = [args.prototxt, args.weights]
    outputs.target(args.output, "-o", force=args.force, inputs=inputs)  # before torch loads
    from .onnx import export_caffe_head
    from .worker import CaffeWorker

    with CaffeWorker(timeout=args.timeout) as worker:
        report = export_caffe_head(
            worker,
            Path(args.prototxt),
            Path(args.weights),
            Path(args.output),
            examples=args.examples,
            batch=args.batch_check,
            opset=args.opset,
            force=args.force,
        )
    print(report)
    return 0


def _validate_port(args: argparse.Namespace) -> int:
    # crossval.validate (torch) is imported by validate_isolated while its child starts.
    from . import outputs
    from .isolation import validate_isolated

    inputs = [args.net, args.weights, args.map, args.replay, _port_source(args.port)]
    json_out = (
        outputs.target(args.json, "--json", force=args.force, inputs=inputs) if args.json else None
    )
    save_failure = (
        outputs.directory(args.save_failure, "--save-failure", force=args.force, inputs=inputs)
        if args.save_failure
        else None
    )

    mapping: dict[str, str] = {}
    if args.map:
        try:
            mapping = json.loads(Path(args.map).read_text())
        except (OSError, ValueError) as exc:
            raise CrossvalError(f"--map {args.map}: {exc}") from None
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(x, str) for k, x in mapping.items()
        ):
            raise CrossvalError(f'--map {args.map}: expected {{"layer/index": "state_dict key"}}')
    # What needs no PyTorch is refused here, before the child is started (it checks again).
    from .inputs import InputError, read_prototxt

    read_prototxt(Path(args.net))
    if args.weights and not Path(args.weights).is_file():
        raise InputError(f"no caffemodel at {args.weights}")
    if ":" not in args.port:
        raise InputError(f"--port {args.port!r}: expected MODULE:CALLABLE, e.g. myport:make")
    # The port runs in a child process: its crash, exit or hang is a finding, not ours.
    report = validate_isolated(
        Path(args.net),
        args.port,
        timeout=args.timeout,
        weights=Path(args.weights) if args.weights else None,
        mapping=mapping,
        head=args.head,
        bins=args.bins,
        examples_n=args.examples,
        seed=args.seed,
        batch=args.batch,
        save_failure=save_failure,
        replay=Path(args.replay) if args.replay else None,
        argv=args.argv,
        generate=args.generate,
        layer_plugins=args.layer_plugin or [],
    )
    print(report.text())
    if json_out is not None:
        from .portcheck.command import write_json

        write_json(report, json_out)
    return report.exit_code


def _conformance(args: argparse.Namespace) -> int:
    from .conformance.command import main as conformance

    return conformance(args)


def _port_source(spec: str) -> str | None:
    """The file of the port's module, found without importing anything (its import may
    crash): it is one of validate-port's inputs."""
    import os

    parts = spec.partition(":")[0].split(".")
    for base in [os.getcwd(), *sys.path]:
        stem = Path(base or ".", *parts)
        for candidate in (stem.with_name(stem.name + ".py"), stem / "__init__.py"):
            if candidate.is_file():
                return str(candidate)
    return None


def _train(args: argparse.Namespace) -> int:
    from . import outputs

    out = outputs.directory(args.out, "--out", force=args.force, empty=True).path
    from crossval.reference.solvers import SolverConfig

    from .strategies import build_batches, build_case
    from .training import TrainCase, train_report
    from .worker import CaffeWorker

    _single_threaded()

    shape = dict(
        batch=args.batch,
        features=args.features,
        bins=args.bins,
        spread=args.spread,
        sigma=args.sigma,
    )
    case = build_case(args.head, args.loss, seed=args.seed, **shape)
    seeds = range(args.seed + 1, args.seed + 1 + args.steps)
    batches = build_batches(args.head, args.loss, seeds, **shape)
    try:
        cfg = SolverConfig(
            type=args.solver,
            base_lr=args.lr,
            lr_policy=args.lr_policy,
            gamma=args.gamma,
            stepsize=args.stepsize,
            max_iter=max(args.steps, 1),
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            regularization_type=args.regularization,
            clip_gradients=args.clip,
        )
    except ValueError as exc:
        raise CrossvalError(str(exc)) from None
    tc = TrainCase(case, batches, cfg)
    with CaffeWorker(timeout=args.timeout) as worker:
        ok, text = train_report(worker, tc, out, args.snapshot)
    print(text)
    return 0 if ok else 1


def _mutants(args: argparse.Namespace) -> int:
    import time

    from .mutants.killtable import kill_table
    from .worker import CaffeWorker

    _single_threaded()

    start = time.monotonic()
    with CaffeWorker(timeout=args.timeout) as worker:
        table = kill_table(worker, max_examples=args.max_examples)
    print(table.markdown())
    print(f"\n({args.max_examples} examples at most per mutant; {time.monotonic() - start:.1f} s)")
    return 0 if table.ok else 1


def _report(args: argparse.Namespace) -> int:
    from . import outputs

    outputs.directory(args.out, "--out", force=args.force)  # at once, before torch loads
    from . import provision
    from .provision import info
    from .report import FILES, run, table
    from .worker import CaffeWorker

    _single_threaded()

    out = outputs.directory(args.out, "--out", force=args.force, names=FILES)
    install = provision.locate(args.caffe)
    described = info.collect(install)
    with CaffeWorker(install, timeout=args.timeout) as worker:
        ok, rows = run(worker, args.profile, out, examples=args.examples, caffe_info=described)
    print(table(rows))
    print(f"\n{'every check passes' if ok else 'FAILURES'}; report in {args.out}")
    return 0 if ok else 1


def _check_build(args: argparse.Namespace) -> int:
    from . import outputs

    if args.json:  # at once; buildcheck.run checks again before the builds run
        outputs.target(args.json, "--json", force=args.force)
    if args.out:
        outputs.directory(args.out, "--out", force=args.force)
    from . import buildcheck, golden, provision

    _single_threaded()
    paths = [str(provision.locate(variant=v).python_path) for v in args.variant or ()]
    paths += args.caffe or []
    if not paths:
        raise CrossvalError("check-build needs at least one --caffe PATH or --variant NAME")
    return buildcheck.run(
        paths,
        profile=args.profile,
        examples=args.examples,
        json_out=Path(args.json) if args.json else None,
        out=Path(args.out) if args.out else None,
        force=args.force,
        golden_dir=Path(args.golden) if args.golden else golden.GOLDEN_DIR,
    )


def _golden(args: argparse.Namespace) -> int:
    from . import outputs

    outputs.directory(args.out, "--out", force=args.force)  # at once, before torch loads
    from . import golden
    from .layercheck import golden as layer_golden
    from .worker import CaffeWorker

    _single_threaded()

    written = golden.write(Path(args.out), force=args.force)
    with CaffeWorker() as worker:  # Caffe parses each layer's params
        layers = layer_golden.write(worker, Path(args.out) / layer_golden.SUBDIR, args.force)
    print(
        f"wrote {len(written)} golden files of the heads to {args.out} and {len(layers)} of "
        f"single layers to {Path(args.out) / layer_golden.SUBDIR}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossval",
        description="Cross-framework verification of Caffe nets against a PyTorch reference.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    caffe = sub.add_parser("caffe", help="provision and describe the Caffe under test")
    caffe_sub = caffe.add_subparsers(dest="caffe_command", required=True)

    def add_caffe_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--caffe",
            metavar="PATH",
            default=None,
            help="use the pycaffe in PATH (the directory holding the `caffe` "
            "package) instead of the provisioned one; also CROSSVAL_CAFFE",
        )

    def add_variant_option(p: argparse.ArgumentParser) -> None:
        from .provision.variants import VARIANTS

        p.add_argument(
            "--variant",
            default="default",
            choices=list(VARIANTS),
            help="which build of the pinned source: "
            + "; ".join(f"{v.name}: {v.purpose}" for v in VARIANTS.values()),
        )

    def add_timeout_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--timeout",
            type=positive_float,
            default=None,
            metavar="SECONDS",
            help="time limit of each Caffe call (and of each call into a port); reaching it "
            "stops the call and names it (default: 120 s and more, scaled by the net's size)",
        )

    ensure = caffe_sub.add_parser(
        "ensure", help="build (once, cached) and check pycaffe for this interpreter"
    )
    add_caffe_option(ensure)
    ensure.add_argument(
        "-q", "--quiet", action="store_true", help="few plain lines of progress (for CI logs)"
    )
    ensure.add_argument(
        "-j",
        "--jobs",
        type=positive_int,
        default=None,
        help="parallel compile jobs (default: number of CPUs)",
    )
    add_variant_option(ensure)
    ensure.set_defaults(func=_caffe_ensure)

    info = caffe_sub.add_parser("info", help="describe the Caffe in use")
    add_caffe_option(info)
    add_variant_option(info)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_caffe_info)

    proto = sub.add_parser("prototxt", help="write one of the seed's heads as a Caffe net")
    _choice(
        proto,
        "head",
        choices=_Names("crossval.names", "HEAD_NAMES", "dex_vgg16", "tiny_cnn", *_ZOO_NETS),
        help="a seed head, or a whole net (DEX-style VGG-16, a tiny CNN, the zoo's age nets)",
    )
    proto.add_argument("--size", type=positive_int, default=None, help="image size of a whole net")
    proto.add_argument("--features", type=positive_int, default=512, help="features in pool5 (512)")
    proto.add_argument("--batch", type=positive_int, default=1)
    proto.add_argument("--bins", type=positive_int, default=100, help="K, expectation head (100)")
    proto.add_argument("--ip-name", default=None, help="InnerProduct name (default fc<K>)")
    _choice(proto, "--loss", default="euclidean", choices=_Names("crossval.names", "LOSS_NAMES"))
    proto.add_argument("--sigma", type=positive_float, default=1.0, help="SmoothL1 sigma")
    proto.add_argument("--deploy", action="store_true", help="no loss, no label input")
    proto.add_argument("-o", "--output", default=None, help="file (default: stdout)")
    proto.add_argument("--force", action="store_true", help="overwrite --output")
    add_timeout_option(proto)
    proto.set_defaults(func=_prototxt)

    surg = sub.add_parser(
        "surgery", help="set the pred_age kernel to arange(K) and save initial weights"
    )
    surg.add_argument("prototxt", help="the train_val (or deploy) net")
    surg.add_argument("-o", "--output", required=True, help="init_weights.caffemodel to write")
    surg.add_argument("--layer", default="pred_age", help="the fixed Convolution (pred_age)")
    surg.add_argument("--weights", default=None, help="start from these weights")
    surg.add_argument("--force", action="store_true", help="overwrite an existing output")
    add_timeout_option(surg)
    surg.set_defaults(func=_surgery)

    onnx_cmd = sub.add_parser(
        "export-onnx",
        help="convert a Caffe head (deploy prototxt + caffemodel) to an ONNX model, checked "
        "against Caffe before it is written",
    )
    onnx_cmd.add_argument("prototxt", help="the head's deploy net")
    onnx_cmd.add_argument("weights", help="its caffemodel (e.g. a trained snapshot)")
    onnx_cmd.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    onnx_cmd.add_argument(
        "--examples",
        type=positive_int,
        default=20,
        help="generated inputs checked against Caffe (20)",
    )
    onnx_cmd.add_argument(
        "--batch-check",
        type=positive_int,
        default=8,
        help="batch of those inputs (8; every 4th is 1)",
    )
    onnx_cmd.add_argument(
        "--opset", type=positive_int, default=None, help="ONNX opset (default: the exporter's)"
    )
    onnx_cmd.add_argument("--force", action="store_true", help="overwrite an existing output")
    add_timeout_option(onnx_cmd)
    onnx_cmd.set_defaults(func=_export_onnx)

    vp = sub.add_parser(
        "validate-port",
        help="check a PyTorch port of a Caffe net against Caffe; name where it first diverges",
    )
    vp.add_argument("net", help="the Caffe net (deploy or train_val prototxt)")
    vp.add_argument(
        "--port",
        required=True,
        metavar="MODULE:CALLABLE",
        help="returns the torch.nn.Module; forward(**input_blobs) -> {blob: tensor}",
    )
    vp.add_argument("--weights", default=None, help="caffemodel (default: generated weights)")
    vp.add_argument(
        "--generate",
        action="store_true",
        help="with --weights: generate learnable weights per example anyway, "
        "taking only the fixed (lr_mult 0) params from the file",
    )
    vp.add_argument("--map", default=None, help='JSON {"layer/index": "state_dict key"}')
    _choice(
        vp,
        "--head",
        choices=_Names("crossval.net", "HEAD_APPENDERS"),
        default=None,
        help="append one of the seed's heads to the net (expectation: pred_age on its Softmax)",
    )
    vp.add_argument("--bins", type=positive_int, default=None, help="K for --head expectation")
    vp.add_argument(
        "--layer-plugin",
        metavar="MODULE",
        action="append",
        help="a module registering the reference and bounds of your own Caffe Python layers "
        "(crossval.portcheck.plugins); may be given again",
    )
    vp.add_argument("--examples", type=positive_int, default=25, help="generated examples (25)")
    vp.add_argument("--seed", type=nonnegative_int, default=0, help="hypothesis seed (0)")
    vp.add_argument(
        "--batch", type=positive_int, default=None, help="batch size (default: max(N, 2))"
    )
    vp.add_argument("--json", default=None, metavar="OUT.json", help="also write the report")
    vp.add_argument(
        "--save-failure",
        default=None,
        metavar="DIR",
        help="save the minimal failing example (.npz) with its replay command",
    )
    vp.add_argument(
        "--replay", default=None, metavar="FILE.npz", help="run only the example saved in FILE.npz"
    )
    add_timeout_option(vp)
    vp.add_argument(
        "--force", action="store_true", help="replace an existing --json or saved failure"
    )
    vp.set_defaults(func=_validate_port)

    from .conformance.options import add_arguments as conformance_arguments

    cf = sub.add_parser(
        "conformance",
        help="a converter's Caffe-semantics conformance table: every layer type's cases "
        "and the zoo nets, each through validate-port's checks",
    )
    conformance_arguments(cf, positive_float)
    cf.set_defaults(func=_conformance)

    rp = sub.add_parser(
        "report", help="run the whole matrix against the Caffe in use; table, JSON, MD, plots"
    )
    rp.add_argument(
        "--caffe",
        metavar="PATH",
        default=None,
        help="a pycaffe of your own (default: the provisioned one)",
    )
    _choice(
        rp,
        "--profile",
        choices=_Names("crossval.profiles", "PROFILES"),
        default="ci",
        help="examples per property: dev 25, ci 200, thorough 5000",
    )
    rp.add_argument(
        "--examples", type=positive_int, default=None, help="override the profile's count"
    )
    rp.add_argument("--out", default="crossval-report", help="directory for the files")
    rp.add_argument("--force", action="store_true", help="replace report files already there")
    add_timeout_option(rp)
    rp.set_defaults(func=_report)

    from .provision.variants import VARIANTS

    cb = sub.add_parser(
        "check-build",
        help="regression-check Caffe builds: golden vectors, the report matrix, side by side",
    )
    cb.add_argument(
        "--caffe",
        metavar="PATH",
        action="append",
        help="a pycaffe to check (the directory holding the `caffe` package); give it again "
        "for each further build, to compare them side by side",
    )
    cb.add_argument(
        "--variant",
        metavar="NAME",
        action="append",
        choices=list(VARIANTS),
        help="a cached build variant (crossval caffe ensure --variant NAME) to check; "
        "these come first, then the --caffe builds",
    )
    _choice(
        cb,
        "--profile",
        choices=_Names("crossval.profiles", "PROFILES"),
        default="ci",
        help="generated examples per property: dev 25, ci 200, thorough 5000",
    )
    cb.add_argument(
        "--examples", type=positive_int, default=None, help="override the profile's count"
    )
    cb.add_argument("--json", default=None, metavar="OUT.json", help="write the results as JSON")
    cb.add_argument(
        "--out", default=None, metavar="DIR", help="keep each build's report files in DIR/build-N"
    )
    cb.add_argument(
        "--golden", default=None, metavar="DIR", help="golden vectors (default: the package's)"
    )
    cb.add_argument(
        "--force", action="store_true", help="replace an existing --json or --out report files"
    )
    cb.set_defaults(func=_check_build)

    gd = sub.add_parser(
        "golden", help="write the golden vectors from the float64 reference (never edit them)"
    )
    gd.add_argument("--out", required=True, metavar="DIR")
    gd.add_argument("--force", action="store_true", help="replace golden files already there")
    gd.set_defaults(func=_golden)

    tr = sub.add_parser(
        "train",
        help="the seed's training workflow in Caffe, checked against PyTorch step by step",
    )
    _choice(tr, "head", choices=_Names("crossval.names", "HEAD_NAMES"))
    _choice(tr, "--loss", default="euclidean", choices=_Names("crossval.names", "LOSS_NAMES"))
    tr.add_argument("--out", required=True, help="directory for the workflow's files")
    _choice(tr, "--solver", default="SGD", choices=_Names(_SOLVERS, "SOLVER_TYPES"))
    tr.add_argument("--steps", type=positive_int, default=10)
    tr.add_argument("--lr", type=finite_float, default=0.01)
    _choice(
        tr,
        "--lr-policy",
        default="fixed",
        choices=_Names(_SOLVERS, "LR_POLICIES"),
    )
    tr.add_argument("--gamma", type=finite_float, default=0.1)
    tr.add_argument("--stepsize", type=positive_int, default=5)
    tr.add_argument("--momentum", type=finite_float, default=0.0)
    tr.add_argument("--weight-decay", type=finite_float, default=0.0)
    _choice(
        tr,
        "--regularization",
        default="L2",
        choices=_Names(_SOLVERS, "REGULARIZATIONS"),
    )
    tr.add_argument("--clip", type=finite_float, default=-1.0, help="clip_gradients (off: -1)")
    tr.add_argument("--snapshot", type=positive_int, default=5, help="snapshot every N steps (5)")
    tr.add_argument("--batch", type=positive_int, default=8)
    tr.add_argument("--features", type=positive_int, default=64)
    tr.add_argument("--bins", type=positive_int, default=100)
    tr.add_argument(
        "--spread", type=finite_float, default=3.0, help="initial logit/activation spread"
    )
    tr.add_argument("--sigma", type=positive_float, default=1.0, help="SmoothL1 sigma")
    tr.add_argument("--seed", type=nonnegative_int, default=0)
    tr.add_argument("--force", action="store_true", help="write into a non-empty --out")
    add_timeout_option(tr)
    tr.set_defaults(func=_train)

    mut = sub.add_parser(
        "mutants",
        help="run every mutant (realistic port bug) through the checks: the kill table",
    )
    mut.add_argument(
        "--max-examples",
        type=positive_int,
        default=200,
        help="examples per mutant before it counts as surviving (200, the ci profile)",
    )
    add_timeout_option(mut)
    mut.set_defaults(func=_mutants)
    return parser


def _internal_error(exc: Exception) -> int:
    """One line for the user; the whole traceback in a file whose path it gives."""
    import tempfile
    import time
    import traceback

    from . import outputs

    text = "".join(traceback.format_exception(exc))
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.time_ns() % 10**9:09d}"
    name = f"crossval-traceback-{stamp}.txt"
    try:
        path = outputs.write_bytes(
            outputs.target(Path(tempfile.gettempdir()) / name, "traceback"), text.encode()
        )
        where = f"traceback in {path}"
    except CrossvalError as failed:
        where = f"the traceback could not be saved: {failed}"
    message = (str(exc).strip().splitlines() or [""])[0]
    print(f"crossval: internal error: {type(exc).__name__}: {message} ({where})", file=sys.stderr)
    return EXIT_INTERNAL


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 pass, 1 a finding about the thing under test, 2 bad usage or input,
    3 an internal error of crossval (traceback saved to a file), 130 interrupted."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what a replay line repeats
    except SystemExit as exc:  # argparse has printed the usage error (or the help)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func

    in_main = threading.current_thread() is threading.main_thread()
    previous = {}
    unraisable = sys.unraisablehook
    if in_main:
        clear_interrupt()
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_interrupt)
        sys.unraisablehook = quiet_interrupts(unraisable)
    try:
        code = func(args)
        raise_if_interrupted()
        return code
    except CrossvalError as exc:
        print(f"crossval: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("crossval: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        return _internal_error(exc)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if in_main:
            sys.unraisablehook = unraisable
            clear_interrupt()  # the caller (a test calling main) goes on undisturbed


def entry() -> int:
    """The `crossval` command: `main`, and a signal that lands while main restores its
    handlers (after its own except) is an interruption too, never a traceback."""
    try:
        return main()
    except KeyboardInterrupt:
        print("crossval: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
