"""The seed answer's two heads as Caffe nets, written with pycaffe's NetSpec.

Layer names and parameters are the answer's: ``fc1`` -> ``pred01`` (Sigmoid) -> ``pred_age``
(Scale, lr_mult 0, constant filler 99); ``fc100`` -> ``prob`` (Softmax) -> ``pred_age``
(Convolution, num_output 1, bias_term false, lr_mult 0, no kernel_size). The features blob is
the answer's ``pool5``; the label blobs are ``true_age`` (N x 1) and ``label`` (N).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import caffe
from caffe import layers as L

SMOOTH_L1_MODULE = "crossval.caffe_side.layers"

LOSSES = ("euclidean", "smooth_l1", "softmax_with_loss")


def _loss(n: Any, loss: str, pred: Any, logits: Any, batch: int, opts: dict[str, Any]) -> None:
    if loss == "euclidean":
        n.true_age = L.Input(shape=dict(dim=[batch, 1]))
        n.loss = L.EuclideanLoss(pred, n.true_age)
    elif loss == "smooth_l1":
        n.true_age = L.Input(shape=dict(dim=[batch, 1]))
        n.loss = L.Python(
            pred,
            n.true_age,
            loss_weight=1,
            python_param=dict(
                module=SMOOTH_L1_MODULE,
                layer="SmoothL1Loss",
                param_str=json.dumps({"sigma": float(opts.get("sigma", 1.0))}),
            ),
        )
    elif loss == "softmax_with_loss":
        if logits is None:
            raise ValueError("softmax_with_loss needs the expectation head's logits")
        n.label = L.Input(shape=dict(dim=[batch]))
        loss_param: dict[str, Any] = {}
        if opts.get("normalization") is not None:
            loss_param["normalization"] = getattr(caffe.params.Loss, opts["normalization"])
        if opts.get("ignore_label") is not None:
            loss_param["ignore_label"] = int(opts["ignore_label"])
        n.loss = L.SoftmaxWithLoss(logits, n.label, loss_param=loss_param)
    else:
        raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")


def sigmoid_scale(
    features: int, batch: int = 1, scale: float = 99.0, loss: str | None = None, **opts: Any
) -> str:
    """Prototxt of the sigmoid-scale head; with `loss`, the train variant."""
    n = caffe.NetSpec()
    n.pool5 = L.Input(shape=dict(dim=[batch, features]))
    n.fc1 = L.InnerProduct(n.pool5, num_output=1, **_ip_params(opts))
    n.pred01 = L.Sigmoid(n.fc1)
    n.pred_age = L.Scale(
        n.pred01,
        param=dict(lr_mult=opts.get("fixed_lr_mult", 0)),
        scale_param=dict(bias_term=False, filler=dict(type="constant", value=scale)),
    )
    if loss is not None:
        if loss == "softmax_with_loss":
            raise ValueError("the sigmoid-scale head has no logits for softmax_with_loss")
        _loss(n, loss, n.pred_age, None, batch, opts)
    return _finish(n, train=loss is not None, force_backward=opts.get("force_backward", True))


def expectation(
    features: int,
    batch: int = 1,
    bins: int = 100,
    ip_name: str | None = None,
    loss: str | None = None,
    **opts: Any,
) -> str:
    """Prototxt of the expectation head; with `loss`, the train variant."""
    ip_name = ip_name or f"fc{bins}"
    n = caffe.NetSpec()
    n.pool5 = L.Input(shape=dict(dim=[batch, features]))
    logits = L.InnerProduct(n.pool5, num_output=bins, **_ip_params(opts))
    setattr(n, ip_name, logits)
    n.prob = L.Softmax(logits)
    n.pred_age = L.Convolution(
        n.prob,
        param=dict(lr_mult=opts.get("fixed_lr_mult", 0)),
        convolution_param=dict(num_output=1, bias_term=False),
    )
    if loss is not None:
        _loss(n, loss, n.pred_age, logits, batch, opts)
    return _finish(n, train=loss is not None, force_backward=opts.get("force_backward", True))


def _ip_params(opts: dict[str, Any]) -> dict[str, Any]:
    """`ip_mults`: ((lr_mult, decay_mult) of the weight, (lr_mult, decay_mult) of the bias)."""
    mults = opts.get("ip_mults")
    if not mults:
        return {}
    return {"param": [dict(lr_mult=lr, decay_mult=dm) for lr, dm in mults]}


def _finish(n: Any, train: bool, force_backward: bool = True) -> str:
    proto = n.to_proto()
    if train and force_backward:
        # Input blobs get diffs only when asked: the checks compare d(loss)/d(pool5). A net
        # for a solver leaves it off, as a real train_val does (Caffe then computes no diff
        # for lr_mult-0 params, which keeps them out of gradient clipping's norm).
        proto.force_backward = True
    return str(proto)


BUILDERS: dict[str, Callable[..., str]] = {
    "sigmoid_scale": sigmoid_scale,
    "expectation": expectation,
}

# The other nets the suite builds (a DEX-style VGG-16 age net, a tiny CNN of standard layers).
from crossval.caffe_side.zoo import ZOO  # noqa: E402

BUILDERS.update(ZOO)
