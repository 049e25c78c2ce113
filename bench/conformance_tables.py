"""The tables of docs/conformance.md: `crossval conformance` over the whole grid with the
project's reference converter and with the deliberately faulty demo converter
(tests/converters/faulty.py), and the run time of a full run per profile.

    python bench/conformance_tables.py [--profile ci|thorough] [--converter reference|faulty|both]

Prints Markdown: per converter the summary per layer type, the rows that do not pass, the
score and the run time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from crossval.conformance import command  # noqa: E402
from crossval.worker import CaffeWorker  # noqa: E402

CONVERTERS = {
    "reference": "crossval.conformance.reference:convert",
    "faulty": "converters.faulty:convert",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=["ci", "thorough"], default="ci")
    ap.add_argument("--converter", choices=[*CONVERTERS, "both"], default="both")
    args = ap.parse_args()
    names = list(CONVERTERS) if args.converter == "both" else [args.converter]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} by `python bench/conformance_tables.py "
        f"--profile {args.profile}` (2 shared cores)",
        "",
    ]
    with CaffeWorker() as worker:
        for name in names:
            result = command.run(worker, CONVERTERS[name], profile=args.profile)
            lines += [
                f"### `{CONVERTERS[name]}`, profile {args.profile}",
                "",
                f"{result.score()}; {len(result.rows)} cases in {result.seconds:.0f} s",
                "",
                result.summary_table(),
                "",
            ]
            bad = [r for r in result.rows if r.outcome.verdict != "pass"]
            if bad:
                lines += ["| case | parameters | verdict | detail |", "|---|---|---|---|"]
                for r in bad:
                    detail = r.outcome.detail
                    detail = detail if len(detail) <= 160 else detail[:157] + "..."
                    cells = [r.id, r.params, r.outcome.verdict, detail]
                    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
                lines.append("")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
