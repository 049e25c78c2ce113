"""Loss layers: EuclideanLoss, SoftmaxWithLoss, SigmoidCrossEntropyLoss, and the SmoothL1
Python layer the seed's answer suggests."""

from __future__ import annotations
