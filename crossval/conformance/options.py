"""`crossval conformance`'s options (light: no torch until the command runs)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Profile:
    """How many cases per layer type, and examples per zoo net."""

    name: str
    per_type: int
    zoo_examples: int


PROFILES = {"ci": Profile("ci", 3, 2), "thorough": Profile("thorough", 10, 6)}


def add_arguments(p: argparse.ArgumentParser, positive_float: Callable[[str], float]) -> None:
    p.add_argument(
        "--converter",
        required=True,
        metavar="MODULE:CALLABLE",
        help="convert(prototxt_path, caffemodel_path) -> torch.nn.Module; the module's "
        "forward(**input_blobs) -> {blob: tensor} (module importable from the current "
        "directory or PYTHONPATH)",
    )
    p.add_argument(
        "--layers",
        default=None,
        metavar="TYPE,...",
        help="layer types of the grid to run, and 'zoo' or 'zoo:NAME' for the zoo nets "
        "(default: every type and every zoo net)",
    )
    p.add_argument(
        "--profile",
        choices=list(PROFILES),
        default="ci",
        help="; ".join(
            f"{p.name}: {p.per_type} cases per layer type, {p.zoo_examples} examples per zoo net"
            for p in PROFILES.values()
        ),
    )
    p.add_argument(
        "--case",
        action="append",
        metavar="ID",
        help="run only this case (e.g. Pooling/2, zoo/resnet_block); may be given again",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"time the converter's code may take per case (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the table as JSON")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="keep each case that does not pass: its prototxt, caffemodel and replay command",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --json or --out files")
