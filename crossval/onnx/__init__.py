"""Both heads as ONNX models: exported from the PyTorch reference, validated, run under
onnxruntime and ``onnx.reference``, and checked against Caffe before anything is written.

- ``spec.py``: ``HeadSpec``, what a head's ONNX file holds (input, outputs, fixed constant),
  and the commands' errors.
- ``export.py``: ``export``, the reference head (``reference/heads.py``) through
  ``torch.onnx.export`` (the dynamo exporter, its default) with a dynamic batch axis; the input
  is named after the Caffe input blob (``pool5``) and the outputs after the Caffe blobs
  (``<ip>``, ``pred01``/``prob``, ``pred_age``); opset, exporter and head go in
  ``metadata_props``. The graph is exported from placeholder weights; ``with_weights`` writes
  real ones into the two learnable initializers, so one export per net shape serves any weights.
- ``validate.py``: ``validate``, ``onnx.checker`` (full check), strict shape inference with
  the batch axis symbolic, the learnable initializers feeding the InnerProduct node, and the
  fixed constant (the Scale's 99, or the arange(K) kernel) an initializer or Constant, bit for
  bit, and never a graph input a runtime could override.
- ``runtime.py``: ``Runtime``, a model loaded in onnxruntime or the ONNX reference evaluator,
  and its blobs against the float64 reference.
- ``caffe_head.py``: ``load_caffe_head``, a Caffe head (deploy prototxt + caffemodel)
  identified as one of the two heads, with its weights.
- ``command.py``: ``export_caffe_head`` (``crossval export-onnx``), the head exported, checked
  against Caffe on generated inputs (within ``tolerances.cross`` of the forward bounds), then
  written atomically.
"""

from __future__ import annotations

from .caffe_head import CaffeHead, load_caffe_head
from .command import ExportReport, check_against_caffe, export_caffe_head
from .export import export, exporter_versions, opset_of, with_weights
from .runtime import RUNTIMES, Runtime, forward_comparisons, reference64
from .spec import (
    BATCH_AXIS,
    EXPORTER,
    OUTPUT,
    HeadSpec,
    OnnxCheckFailed,
    OnnxInputError,
    OnnxModelInvalid,
)
from .validate import constants, fixed_constant, load_model, validate

__all__ = [
    "BATCH_AXIS",
    "EXPORTER",
    "OUTPUT",
    "RUNTIMES",
    "CaffeHead",
    "ExportReport",
    "HeadSpec",
    "OnnxCheckFailed",
    "OnnxInputError",
    "OnnxModelInvalid",
    "Runtime",
    "check_against_caffe",
    "constants",
    "export",
    "export_caffe_head",
    "exporter_versions",
    "fixed_constant",
    "forward_comparisons",
    "load_caffe_head",
    "load_model",
    "opset_of",
    "reference64",
    "validate",
    "with_weights",
]
