"""The names of the head and loss rows (``heads.HEADS``, ``heads.LOSSES``), importable
without torch: the command line checks a name before it loads anything heavy. The tables
are built in this order and refuse to import if their names differ from these."""

from __future__ import annotations

HEAD_NAMES = ("sigmoid_scale", "expectation")
LOSS_NAMES = ("euclidean", "smooth_l1", "softmax_with_loss")
