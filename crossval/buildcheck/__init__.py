"""`crossval check-build`: regression-check one or more Caffe builds.

Each build is checked in four steps, and stops at the first that makes it unusable:

1. it imports (in a child process) and registers every layer type the heads' nets use;
2. the golden vectors (``golden``): stored cases with the float64 reference's blobs, loss and
   the gradient of every blob and param, each compared within the tolerance table's bound;
3. the matrix of ``crossval report`` (heads x losses on generated cases, Caffe's gradient
   checker, training for every solver, ONNX);
4. for a head x loss whose matrix rows fail, its generated cases again, blob by blob.

A failing case is pinned to a layer: the first layer in forward order whose top is wrong
(its forward), else the first layer in backward order whose bottom diffs or param diffs are
wrong while its top diffs are right (its backward).

Several builds are also compared with each other on the golden cases: each is within the
bound of the same float64 values, so two agree within twice the bound.

Exit status: 0 every build clean, 1 a regression, 2 a build unusable (the largest wins).

Modules: ``check`` (one case: values, localisation), ``build`` (one build's four steps),
``command`` (several builds, the report, the exit status).
"""

from __future__ import annotations

from .build import BuildResult, check_build, needed_layer_types
from .check import (
    CLEAN,
    EXIT,
    REGRESSION,
    UNUSABLE,
    BuildChecker,
    CaseCheck,
    Value,
    compare_pair,
)
from .command import PairResult, compare_builds, describe_build, run

__all__ = [
    "CLEAN",
    "EXIT",
    "REGRESSION",
    "UNUSABLE",
    "BuildChecker",
    "BuildResult",
    "CaseCheck",
    "PairResult",
    "Value",
    "check_build",
    "compare_builds",
    "compare_pair",
    "describe_build",
    "needed_layer_types",
    "run",
]
