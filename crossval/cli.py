"""The `crossval` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import CrossvalError


def _caffe_ensure(args: argparse.Namespace) -> int:
    from . import provision

    install = provision.ensure(args.caffe, quiet=args.quiet, jobs=args.jobs)
    where = "cached" if install.cached else install.origin
    print(f"pycaffe ({where}): {install.python_path}")
    return 0


def _caffe_info(args: argparse.Namespace) -> int:
    from . import provision
    from .provision import info

    install = provision.locate(args.caffe)
    data = info.collect(install)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(info.format_text(data))
    return 0


def _surgery(args: argparse.Namespace) -> int:
    from .surgery import surgery
    from .worker import CaffeWorker

    with CaffeWorker() as worker:
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


def _prototxt(args: argparse.Namespace) -> int:
    from .worker import CaffeWorker

    opts: dict[str, object] = {"features": args.features, "batch": args.batch}
    if args.head == "expectation":
        opts["bins"] = args.bins
        if args.ip_name:
            opts["ip_name"] = args.ip_name
    if not args.deploy:
        opts["loss"] = args.loss
        if args.loss == "smooth_l1":
            opts["sigma"] = args.sigma
    with CaffeWorker() as worker:
        text = worker.call("prototxt", head=args.head, **opts)
    if args.output:
        out = Path(args.output)
        if out.exists() and not args.force:
            raise CrossvalError(f"{out} exists; not overwriting it (use --force)")
        out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from .onnx_export import export_caffe_head
    from .worker import CaffeWorker

    with CaffeWorker() as worker:
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
        type=int,
        default=None,
        help="parallel compile jobs (default: number of CPUs)",
    )
    ensure.set_defaults(func=_caffe_ensure)

    info = caffe_sub.add_parser("info", help="describe the Caffe in use")
    add_caffe_option(info)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_caffe_info)

    proto = sub.add_parser("prototxt", help="write one of the seed's heads as a Caffe net")
    proto.add_argument("head", choices=["sigmoid_scale", "expectation"])
    proto.add_argument("--features", type=int, default=512, help="features in pool5 (512)")
    proto.add_argument("--batch", type=int, default=1)
    proto.add_argument("--bins", type=int, default=100, help="K, expectation head (100)")
    proto.add_argument("--ip-name", default=None, help="InnerProduct name (default fc<K>)")
    proto.add_argument(
        "--loss", default="euclidean", choices=["euclidean", "smooth_l1", "softmax_with_loss"]
    )
    proto.add_argument("--sigma", type=float, default=1.0, help="SmoothL1 sigma")
    proto.add_argument("--deploy", action="store_true", help="no loss, no label input")
    proto.add_argument("-o", "--output", default=None, help="file (default: stdout)")
    proto.add_argument("--force", action="store_true", help="overwrite --output")
    proto.set_defaults(func=_prototxt)

    surg = sub.add_parser(
        "surgery", help="set the pred_age kernel to arange(K) and save initial weights"
    )
    surg.add_argument("prototxt", help="the train_val (or deploy) net")
    surg.add_argument("-o", "--output", required=True, help="init_weights.caffemodel to write")
    surg.add_argument("--layer", default="pred_age", help="the fixed Convolution (pred_age)")
    surg.add_argument("--weights", default=None, help="start from these weights")
    surg.add_argument("--force", action="store_true", help="overwrite an existing output")
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
        "--examples", type=int, default=20, help="generated inputs checked against Caffe (20)"
    )
    onnx_cmd.add_argument(
        "--batch-check", type=int, default=8, help="batch of those inputs (8; every 4th is 1)"
    )
    onnx_cmd.add_argument(
        "--opset", type=int, default=None, help="ONNX opset (default: the exporter's)"
    )
    onnx_cmd.add_argument("--force", action="store_true", help="overwrite an existing output")
    onnx_cmd.set_defaults(func=_export_onnx)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CrossvalError as exc:
        print(f"crossval: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("crossval: interrupted", file=sys.stderr)
        return 130
