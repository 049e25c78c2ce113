"""Layers that combine, split or reshape blobs: Eltwise, Concat, Slice, Split, Flatten,
Reshape, Crop, Softmax."""

from __future__ import annotations
