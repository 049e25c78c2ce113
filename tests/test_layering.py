"""The package's layering: the import graph runs one way (reference -> core -> checks and
generation -> commands -> entry points), every bound is computed in crossval/tolerances, and
importing crossval changes nothing in the process."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "crossval"
TOLERANCES = PACKAGE / "tolerances"

# The unit-roundoff constants and the error-growth factor: only the tolerance package
# computes bounds from them.
ROUNDOFF_NAMES = frozenset({"U32", "ETA32", "LIBM_ULPS", "gamma"})
# 2**-k literals of float32's unit roundoff, machine epsilon and smallest denormal.
ROUNDOFF_EXPONENTS = frozenset({24, 23, 149})


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a `from ... import` names, a relative one resolved against `package`."""
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    return base


def _tolerance_aliases(tree: ast.Module, module: str) -> tuple[set[str], set[str]]:
    """Names under which `module` binds the tolerance package, and names it imports from it."""
    aliases: set[str] = set()
    imported: set[str] = set()
    package = module.rsplit(".", 1)[0] if "." in module else module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "crossval.tolerances" or a.name.startswith("crossval.tolerances."):
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            for a in node.names:
                full = f"{base}.{a.name}"
                if not (full + ".").startswith("crossval.tolerances."):
                    continue
                if a.name in ROUNDOFF_NAMES:  # a constant or gamma itself
                    imported.add(a.asname or a.name)
                else:  # the package or one of its modules
                    aliases.add(a.asname or a.name)
    return aliases, imported


def _dotted(node: ast.expr) -> str:
    """`a.b.c` of a chain of names and attributes; '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def bound_arithmetic(source: str, module: str) -> list[str]:
    """Uses of the unit-roundoff constants, gamma or a 2**-24-like literal in `source`."""
    tree = ast.parse(source)
    aliases, imported = _tolerance_aliases(tree, module)
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ROUNDOFF_NAMES
            and _dotted(node.value) in aliases
        ):
            found.append(f"line {line}: {_dotted(node.value)}.{node.attr}")
        elif isinstance(node, ast.Name) and node.id in imported:
            found.append(f"line {line}: {node.id}")
        elif (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Pow)
            and isinstance(node.left, ast.Constant)
            and node.left.value == 2
            and isinstance(node.right, ast.UnaryOp)
            and isinstance(node.right.op, ast.USub)
            and isinstance(node.right.operand, ast.Constant)
            and node.right.operand.value in ROUNDOFF_EXPONENTS
        ):
            found.append(f"line {line}: 2**-{node.right.operand.value}")
        elif isinstance(node, ast.Attribute) and node.attr == "eps":
            inner = node.value
            if isinstance(inner, ast.Call) and getattr(inner.func, "attr", "") == "finfo":
                found.append(f"line {line}: finfo(...).eps")
    return found


def offenders(package: Path = PACKAGE) -> dict[str, list[str]]:
    out = {}
    for path in sorted(package.rglob("*.py")):
        if TOLERANCES in path.parents:
            continue
        rel = path.relative_to(package.parent)
        module = ".".join(rel.with_suffix("").parts)
        if found := bound_arithmetic(path.read_text(), module):
            out[str(rel)] = found
    return out


def test_bounds_are_computed_only_in_the_tolerance_package() -> None:
    found = offenders()
    assert not found, "bound arithmetic outside crossval/tolerances: " + "; ".join(
        f"{path} ({', '.join(uses)})" for path, uses in found.items()
    )


def test_the_scan_sees_each_kind_of_use() -> None:
    """The scan is shown failing: each form of a bound computed outside the package."""
    planted = {
        "from . import tolerances as tol\ne = tol.U32 * abs(x)\n": "tol.U32",
        "from .tolerances import gamma\ne = gamma(4) * s\n": "gamma",
        "import crossval.tolerances\ne = crossval.tolerances.ETA32\n": "crossval.tolerances.ETA32",
        "from .. import tolerances\ne = tolerances.LIBM_ULPS\n": "tolerances.LIBM_ULPS",
        "e = 2.0**-24 * abs(x)\n": "2**-24",
        "import numpy as np\ne = np.finfo(np.float32).eps\n": "finfo(...).eps",
    }
    for source, use in planted.items():
        module = "crossval.sub.planted" if "from .." in source else "crossval.planted"
        found = bound_arithmetic(source, module)
        assert any(use in f for f in found), (source, found)
    # A solver's own `gamma` (the learning-rate policy's) is not the error-growth factor.
    assert bound_arithmetic("lr = cfg.gamma ** 2\n", "crossval.training") == []


def test_import_changes_no_torch_setting() -> None:
    """Importing the package's modules leaves torch's thread count alone (runs set it)."""
    code = (
        "import torch; n = torch.get_num_threads(); "
        "import crossval.checks, crossval.training, crossval.report, crossval.cli; "
        "print(n, torch.get_num_threads())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == out[1], out


# ---- the import graph -------------------------------------------------------------------

# Each unit (a top-level module or subpackage of crossval) and its layer. A unit may import
# its own layer or a lower one, never a higher one; a new module must be placed here.
LAYERS: dict[str, tuple[str, ...]] = {
    "reference": ("reference",),
    "core": (
        "__init__", "errors", "names", "profiles", "outputs", "provision", "examplegen",
        "heads", "tolerances", "compare", "transfer", "worker", "warmstart", "caffe_side", "net",
        "inputs",
    ),
    "checks and generation": (
        "checks", "batched", "strategies", "localize", "golden", "layercheck",
    ),
    "commands": (
        "onnx", "training", "buildcheck", "mutants", "portcheck", "conformance", "report",
        "surgery", "isolation",
    ),
    "entry points": ("cli", "__main__", "pytest_plugin"),
}  # fmt: skip
RANK = {unit: i for i, units in enumerate(LAYERS.values()) for unit in units}


def _unit(module: str) -> str:
    """crossval.a.b -> a; crossval -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """The crossval modules `source` (the module `module`) imports, relative imports resolved."""
    package = module if is_package else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            # `from crossval import heads` imports crossval.heads
            if base == "crossval" or (node.level and not node.module):
                found.update(f"{base}.{a.name}" for a in node.names)
            else:
                found.add(base)
    return {m for m in found if m.startswith("crossval.")}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Unit -> the other units it imports (the reference is one unit and imports none)."""
    edges: dict[str, set[str]] = {}
    # crossval/reference is a symlink to the top-level reference/ folder: walked explicitly
    paths = {*package.rglob("*.py"), *(package / "reference").rglob("*.py")}
    for path in sorted(paths):
        rel = path.relative_to(package.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        module = ".".join(parts)
        unit = _unit(module) if len(parts) > 1 else "__init__"
        for target in imports_of(path.read_text(), module, rel.name == "__init__"):
            if (other := _unit(target)) != unit:
                edges.setdefault(unit, set()).add(other)
        edges.setdefault(unit, set())
    return edges


def layering_faults(edges: dict[str, set[str]]) -> list[str]:
    """Units with no layer, arrows running up a layer, and cycles between units."""
    faults = [f"{u} has no layer in LAYERS" for u in sorted(edges) if u not in RANK]
    for unit, targets in sorted(edges.items()):
        for target in sorted(targets):
            if unit in RANK and target in RANK and RANK[target] > RANK[unit]:
                faults.append(f"{unit} ({_layer(unit)}) imports {target} ({_layer(target)})")
    seen: set[str] = set()

    def visit(unit: str, path: tuple[str, ...]) -> None:
        if unit in path:
            faults.append("cycle: " + " -> ".join((*path[path.index(unit) :], unit)))
            return
        if unit in seen:
            return
        for target in sorted(edges.get(unit, ())):
            visit(target, (*path, unit))
        seen.add(unit)

    for unit in sorted(edges):
        visit(unit, ())
    return faults


def _layer(unit: str) -> str:
    return list(LAYERS)[RANK[unit]]


def test_the_import_graph_runs_one_way() -> None:
    edges = import_graph()
    assert {"reference", "heads", "portcheck", "cli"} <= set(edges), sorted(edges)
    assert edges["reference"] == set(), edges["reference"]
    faults = layering_faults(edges)
    assert not faults, "; ".join(faults)


def test_the_layering_check_sees_each_fault() -> None:
    """Shown failing: an arrow up a layer, a cycle within one, a unit with no layer, and a
    relative import resolved to the unit it names."""
    assert imports_of("from ..tolerances import gamma\n", "crossval.onnx.spec", False) == {
        "crossval.tolerances"
    }
    assert imports_of("from . import heads\n", "crossval.checks", False) == {"crossval.heads"}
    up = {"heads": {"report"}, "report": set()}
    assert layering_faults(up) == ["heads (core) imports report (commands)"]
    cycle = {"onnx": {"training"}, "training": {"onnx"}}
    assert any(f.startswith("cycle: ") for f in layering_faults(cycle)), layering_faults(cycle)
    assert layering_faults({"newthing": set()}) == ["newthing has no layer in LAYERS"]
