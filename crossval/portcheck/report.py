"""validate-port's report on the engine: the verdict over the examples, its text, and the
exit status (0 pass, 1 a finding about the port, or about Caffe on this net)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from ..worker import CaffeWorker
from .engine import ExampleVerdict, Finding, PortChecker, PortExample


@dataclass
class PortReport:
    net: str
    port: str
    examples_run: int = 0
    fault: Finding | None = None  # the port's first finding (in the first failing example)
    findings: list[Finding] = field(default_factory=list)  # that example's, port and Caffe
    caffe_findings: list[Finding] = field(default_factory=list)
    local_layers: list[str] = field(default_factory=list)
    segment_layers: list[str] = field(default_factory=list)
    not_returned: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    worst: float = 0.0  # largest err/bound over every comparison that passed everywhere

    @property
    def exit_code(self) -> int:
        return 1 if self.fault is not None or self.caffe_findings else 0

    def text(self) -> str:
        lines = [f"validate-port {self.port} against {self.net}: {self.examples_run} examples"]
        lines += self.notes
        lines.append(
            f"verified layer by layer: {', '.join(self.local_layers) or 'none'}; only inside "
            f"a segment: {', '.join(self.segment_layers) or 'none'}; blobs the port did not "
            f"return: {', '.join(self.not_returned) or 'none'}"
        )
        if self.fault is None:
            lines.append(
                f"MATCH: every layer within its bound (largest err/bound {self.worst:.3g})"
            )
        else:
            lines.append(f"MISMATCH at {self.fault}")
            others = [f for f in self.findings if f is not self.fault and f.side == "port"]
            if others:
                lines.append(f"other findings in that example ({len(others)}):")
                lines += [f"  {f}" for f in others[:8]]
        for f in self.caffe_findings[:8]:
            lines.append(f"CAFFE: {f}")
        return "\n".join(lines)


def check_port(
    worker: CaffeWorker,
    prototxt: str,
    port: nn.Module,
    examples: Iterable[PortExample],
    *,
    net_name: str = "net",
    port_name: str = "port",
    mapping: dict[str, str] | None = None,
    weights: str = "",
    generate: bool = True,
) -> PortReport:
    """Run `examples` until the first that has a finding (port or Caffe). With `weights` (a
    caffemodel) and `generate` false, the learnable params are the caffemodel's."""
    checker = PortChecker(worker, prototxt, port, mapping, weights, generate)
    report = PortReport(net_name, port_name, notes=list(checker.notes))
    local: dict[str, None] = {}
    inside: dict[str, None] = {}
    missing: dict[str, None] = {}
    for ex in examples:
        v: ExampleVerdict = checker.run(ex)
        report.examples_run += 1
        local.update(dict.fromkeys(v.local_layers))
        inside.update(dict.fromkeys(v.segment_layers))
        missing.update(dict.fromkeys(v.not_returned))
        report.notes += [n for n in v.notes if n not in report.notes]
        fault = checker.fault(v)
        if fault is not None or v.caffe_findings:
            report.fault, report.findings = fault, v.findings
            report.caffe_findings = v.caffe_findings
            break
        report.worst = max([report.worst, *(c.ratio for c in v.comparisons)])
    report.local_layers, report.segment_layers = list(local), list(inside)
    report.not_returned = list(missing)
    return report


def generated(n: int, seed: int = 0, batch: int = 2) -> list[PortExample]:
    """`n` examples: the first at scale 1, then inputs from 1e-3 to 1e3 and weights from 0.1
    to 10 times their fan-in scale (log-uniform), as validate-port's search draws them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = [PortExample(seed, 1.0, 1.0, batch)]
    for _ in range(n - 1):
        out.append(
            PortExample(
                int(rng.integers(0, 2**32 - 1)),
                float(10 ** rng.uniform(-3, 3)),
                float(10 ** rng.uniform(-1, 1)),
                batch,
            )
        )
    return out
