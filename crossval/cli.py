"""The `crossval` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

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
