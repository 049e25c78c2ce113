"""Bounds of the neuron (elementwise) layers (see crossval.tolerances.layers).

Each bound is the float32 error of Caffe's own sequence of operations (read from its CPU
code) and of a direct port, whichever is larger, per element at the layer's actual inputs;
the float64 reference is taken as exact. Constants Caffe derives from the layer's float
parameters (ln(base), power * scale, 1 / ln(base), base^shift) are themselves rounded to
float32 and their error is carried.
"""

from __future__ import annotations

import numpy as np

from crossval.reference.layers import LayerSpec
from crossval.reference.layers.neuron import f32

from . import ETA32, F64, LIBM_ULPS, TABLE, U32, U64, Rule, gamma
from . import sigmoid as _sigmoid_bound
from . import sigmoid_grad as _sigmoid_grad_bound
from .layers import COPY, LAYER_BOUNDS, Arrays, LayerBound

u, L, E = U32, LIBM_ULPS, ETA32

RULES = (
    Rule(
        "layer_exact_or_one_rounding",
        "a layer that selects, copies or multiplies by one constant (ReLU, PReLU's forward "
        "and bottom diff)",
        "u |y| + ETA32: at most one rounding of the result (none when it only selects)",
    ),
    Rule(
        "layer_prelu_grad",
        "PReLU diffs: g_x = g (x > 0 ? 1 : a_c), g_a = sum over x <= 0 of g x",
        "g_x one rounding (u |g_x|); g_a an n-term sum of products over the elements sharing "
        "the slope: gamma(n) sum |g x| + n ETA32",
    ),
    Rule(
        "layer_elu",
        "y = alpha (exp(x) - 1) for x <= 0 (y = x exactly above)",
        "|alpha| (LIBM_ULPS u max(e^x, |e^x - 1|) + u |e^x - 1| + ETA32) + u |y| + ETA32: "
        "Caffe rounds exp(x) (LIBM_ULPS ulps of e^x, or ETA32 where it underflows) and then "
        "subtracts 1, which keeps that absolute error where e^x - 1 cancels near 0; a port's "
        "expm1 has LIBM_ULPS ulps of e^x - 1; then the product by alpha",
    ),
    Rule(
        "layer_elu_grad",
        "g_x = g (alpha + y) for x <= 0 (Caffe forms alpha + y from its stored top), g above",
        "|g| (e_y + u |alpha + y|) + u |g_x| + ETA32, e_y the forward bound: the stored y "
        "carries its own error into alpha + y, which cancels as x -> -inf",
    ),
    Rule(
        "layer_tanh",
        "y = tanh(x)",
        "LIBM_ULPS u |y| + ETA32",
    ),
    Rule(
        "layer_tanh_grad",
        "g_x = g (1 - y^2) from the stored y",
        "|g| (2 |y| e_y + e_y^2 + u y^2 + u |1 - y^2|) + u |g_x| + ETA32, e_y the forward "
        "bound: y's error through 1 - y^2 (which cancels as |y| -> 1), the square, the "
        "subtraction and the product",
    ),
    Rule(
        "layer_bnll",
        "y = log(1 + exp(x)) (Caffe: x + log(1 + exp(-x)) above 0, exp in float, the rest "
        "in double)",
        "(2 LIBM_ULPS + 1) u |y| + 2^-53 + 2 ETA32: exp's relative error e moves log(1 + e) "
        "by at most e/(1 + e) LIBM_ULPS u <= y LIBM_ULPS u, since log(1 + e) >= e/(1 + e); a "
        "port's log1p adds its own LIBM_ULPS ulps; one final rounding; Caffe rounds 1 + e to "
        "double (2^-53 absolute, which the log keeps: x = -39 gives exactly 0 where y is "
        "1e-17); ETA32 for an exp that underflows (x < -87)",
    ),
    Rule(
        "layer_bnll_grad",
        "g_x = g e / (e + 1), e = exp(min(x, 50))",
        "2 (LIBM_ULPS + 3) u |g_x| + 2 |g| ETA32 + ETA32: Caffe's exp (LIBM_ULPS, damped by "
        "1/(1+e)), product, division and rounding; a port differentiating x + log1p(exp(-x)) "
        "computes g - g s with g s <= g/2, whose errors are relative to |g| <= 2 |g_x|",
    ),
    Rule(
        "layer_power",
        "y = (shift + scale x)^power (Caffe: t = scale x, t += shift, powf(t, power), each "
        "step skipped when it is the identity; a constant when power * scale = 0)",
        "t's error e_t = u |scale x| + u |t| (0 for a step that is exact in float32, which is "
        "checked at the actual values), carried through the power exactly: "
        "max |(|t| +- e_t)^power - |t|^power|, then powf's LIBM_ULPS ulps and ETA32",
    ),
    Rule(
        "layer_power_grad",
        "Caffe's diff: 0 if power * scale = 0; g power scale if power = 1; g (2 scale^2 x + "
        "2 scale shift) if power = 2; g power y / x if shift = 0 (NaN at x = 0); else g "
        "(power scale) y / t",
        "|g| e_D + u |g_x| + ETA32, with e_D the first-order error of each branch's "
        "operations from the stored y (e_y, the forward bound) and t (e_t): 2u |2 s^2 x| + "
        "u |2 s shift| + u |D| for power 2; |power| (e_y / |x| + u |y / x|) + u |D| at shift "
        "0; |ds| (e_y + |y| e_t / |t|) / (|t| - e_t) + 3u |D| otherwise. Where Caffe's "
        "value is NaN the bound is 0, so only a NaN matches it",
    ),
    Rule(
        "layer_exp",
        "y = base^(shift + scale x) computed as outer exp(inner x), inner = ln(base) scale, "
        "outer = base^shift, each rounded to float32 (base -1: e, ln exact)",
        "y (exp(delta) (1 + LIBM_ULPS u) (1 + (LIBM_ULPS + 1) u) (1 + u) - 1) + (|outer| + 1) "
        "ETA32, with delta = (LIBM_ULPS + 3) u (|inner x| + |ln(base) shift|) the error of "
        "the rounded exponent, which exp turns into a relative error: Caffe's inner x "
        "(ln(base) LIBM_ULPS ulps, two products), or a port's exp(ln(base) (shift + scale "
        "x)) (the sum's rounding, relative to |ln(base)| (|scale x| + |shift|), found by "
        "such a port at x = 63); 0 when base is e, scale 1 and shift 0; then exp's, outer's "
        "and the product's roundings",
    ),
    Rule(
        "layer_exp_grad",
        "g_x = g y inner from the stored y",
        "|g inner| e_y + (LIBM_ULPS + 3) u |g_x| + (|inner| + 1) ETA32: y's error, inner's "
        "rounding and the two products",
    ),
    Rule(
        "layer_log",
        "y = ln(shift + scale x) / ln(base) (Caffe: t as in Power, logf, times the rounded "
        "1 / ln(base))",
        "|1/ln base| (r + LIBM_ULPS u (|ln t| + r)) + ((LIBM_ULPS + 1) u + u) |y| + ETA32, "
        "with r = -ln(1 - e_t / |t|) the change of ln t over t's error e_t (as in Power)",
    ),
    Rule(
        "layer_log_grad",
        "g_x = g scale / (ln(base) t) (Caffe: powf(t, -1) times the rounded scale / ln base)",
        "|g| |c| (e_t / (|t| (|t| - e_t)) + LIBM_ULPS u / |t|) + ((LIBM_ULPS + 1) u + 2 u) "
        "|g_x| + ETA32, c = scale / ln(base): 1/t's change over t's error, powf's error, "
        "c's rounding and the products",
    ),
)
TABLE.update({r.name: r for r in RULES})


def _exact_or_one_rounding_forward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays
) -> list[F64]:
    """See TABLE['layer_exact_or_one_rounding']."""
    return [U32 * np.abs(t) + ETA32 for t in tops]


def _relu_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """g_x = g_y or slope * g_y: one rounding, see TABLE['layer_exact_or_one_rounding']."""
    slope = abs(float(spec.param("relu_param")["negative_slope"]))
    g = np.abs(top_diffs[0]) * np.where(bottoms[0] > 0, 1.0, slope)
    return [U32 * g + ETA32], []


LAYER_BOUNDS["ReLU"] = LayerBound(
    "layer_exact_or_one_rounding",
    _exact_or_one_rounding_forward,
    "layer_exact_or_one_rounding",
    _relu_backward,
)


LAYER_BOUNDS["Dropout"] = COPY  # TABLE['layer_copy']
LAYER_BOUNDS["AbsVal"] = COPY


def _prelu_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """See TABLE['layer_prelu_grad']."""
    x, g, a = bottoms[0], top_diffs[0], blobs[0]
    shared = bool(spec.param("prelu_param")["channel_shared"])
    slope = np.abs(a).reshape(()) if shared else np.abs(a).reshape((1, -1) + (1,) * (x.ndim - 2))
    gx = np.abs(g) * np.where(x > 0, 1.0, slope)
    terms = np.abs(g * x) * (x <= 0)
    if shared:
        n, mag = x.size, terms.sum().reshape(np.shape(a))
    else:
        n = x.size // x.shape[1]
        mag = terms.sum(axis=tuple(i for i in range(x.ndim) if i != 1))
    return [U32 * gx + ETA32], [gamma(n) * mag + n * ETA32]


LAYER_BOUNDS["PReLU"] = LayerBound(
    "layer_exact_or_one_rounding",
    _exact_or_one_rounding_forward,
    "layer_prelu_grad",
    _prelu_backward,
)


def _elu_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """See TABLE['layer_elu']."""
    alpha = abs(f32(spec.param("elu_param")["alpha"]))
    x, y = bottoms[0], tops[0]
    ex = np.exp(np.minimum(x, 0.0))
    neg = alpha * (L * u * np.maximum(ex, np.abs(ex - 1)) + u * np.abs(ex - 1) + E) + u * np.abs(y)
    return [np.where(x > 0, 0.0, neg) + E]


def _elu_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """See TABLE['layer_elu_grad']."""
    alpha = f32(spec.param("elu_param")["alpha"])
    x, y, g = bottoms[0], tops[0], top_diffs[0]
    (e_y,) = _elu_forward(spec, bottoms, blobs, tops)
    d = alpha + y
    neg = np.abs(g) * (e_y + u * np.abs(d)) + u * np.abs(g * d)
    return [np.where(x > 0, 0.0, neg) + E], []


LAYER_BOUNDS["ELU"] = LayerBound("layer_elu", _elu_forward, "layer_elu_grad", _elu_backward)


def _sigmoid_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """See TABLE['sigmoid']."""
    return [_sigmoid_bound(tops[0])]


def _sigmoid_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """See TABLE['sigmoid_grad'], with e_y from TABLE['sigmoid']."""
    y, g = tops[0], top_diffs[0]
    return [_sigmoid_grad_bound(g, y, np.zeros_like(g), _sigmoid_bound(y))], []


LAYER_BOUNDS["Sigmoid"] = LayerBound("sigmoid", _sigmoid_forward, "sigmoid_grad", _sigmoid_backward)


def _tanh_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """See TABLE['layer_tanh']."""
    return [L * u * np.abs(tops[0]) + E]


def _tanh_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """See TABLE['layer_tanh_grad']."""
    y, g = tops[0], top_diffs[0]
    (e_y,) = _tanh_forward(spec, bottoms, blobs, tops)
    d = 1 - y * y
    out = np.abs(g) * (2 * np.abs(y) * e_y + e_y * e_y + u * y * y + u * np.abs(d))
    return [out + u * np.abs(g * d) + E], []


LAYER_BOUNDS["TanH"] = LayerBound("layer_tanh", _tanh_forward, "layer_tanh_grad", _tanh_backward)


def _bnll_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """See TABLE['layer_bnll']."""
    return [(2 * L + 1) * u * np.abs(tops[0]) + U64 + 2 * E]


def _bnll_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """See TABLE['layer_bnll_grad']."""
    x, g = bottoms[0], top_diffs[0]
    with np.errstate(over="ignore"):
        s = 1.0 / (1.0 + np.exp(-np.minimum(x, 50.0)))
    return [2 * (L + 3) * u * np.abs(g * s) + 2 * np.abs(g) * E + E], []


LAYER_BOUNDS["BNLL"] = LayerBound("layer_bnll", _bnll_forward, "layer_bnll_grad", _bnll_backward)


def _affine_input(x: F64, scale: float, shift: float) -> tuple[F64, F64]:
    """t = scale x + shift as Caffe forms it (scale, then shift, each skipped when it is the
    identity) and its float32 error bound: u per rounding that actually happens (a step
    whose exact result is a float32 needs none)."""
    sx = x * scale  # exact in float64: a product of two float32 values
    t = sx + shift
    e_t = np.zeros_like(x)
    if scale != 1:
        e_t = e_t + np.where(np.float32(sx) == sx, 0.0, u * np.abs(sx))
    if shift != 0:
        s32 = sx.astype(np.float32).astype(np.float64)
        exact = (np.float32(s32 + shift) == s32 + shift) & (s32 == sx)
        e_t = e_t + np.where(exact, 0.0, u * np.abs(t))
    return t, e_t


def _pow_spread(a: F64, e: F64, p: float) -> F64:
    """max |b^p - a^p| over |b - a| <= e, b >= 0, for a = |t| >= 0."""
    with np.errstate(all="ignore"):
        hi = np.abs((a + e) ** p - a**p)
        inside = e < a
        lo = np.where(inside, np.abs(np.maximum(a - e, 0.0) ** p - a**p), a**p if p > 0 else np.inf)
    out: F64 = np.where(e == 0, 0.0, np.maximum(hi, lo))
    return out


def _power_params(spec: LayerSpec) -> tuple[float, float, float]:
    p = spec.param("power_param")
    return f32(p["power"]), f32(p["scale"]), f32(p["shift"])


def _power_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """See TABLE['layer_power']."""
    power, scale, shift = _power_params(spec)
    x, y = bottoms[0], tops[0]
    if power * scale == 0:
        return [np.full(np.shape(y), 0.0 if power == 0 else L * u * abs(float(y.flat[0])) + E)]
    t, e_t = _affine_input(x, scale, shift)
    if power == 1:
        return [e_t + E]
    e_base = _pow_spread(np.abs(t), e_t, power)
    with np.errstate(invalid="ignore"):
        out = e_base + L * u * (np.abs(y) + e_base) + E
    return [np.where(np.isnan(out), 0.0, out)]


def _power_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """See TABLE['layer_power_grad']."""
    power, scale, shift = _power_params(spec)
    x, y, g = bottoms[0], tops[0], top_diffs[0]
    ds = power * scale
    if ds == 0:
        return [np.zeros_like(x)], []
    if power == 1:
        return [u * np.abs(g * ds) + E], []
    ag = np.abs(g)
    with np.errstate(all="ignore"):
        if power == 2:
            d = ds * (scale * x + shift)
            e_d = 2 * u * np.abs(ds * scale * x) + u * np.abs(ds * shift) + u * np.abs(d)
        else:
            (e_y,) = _power_forward(spec, bottoms, blobs, tops)
            if shift == 0:
                q = y / x
                d = power * q
                e_d = abs(power) * (e_y / np.abs(x) + u * np.abs(q)) + u * np.abs(d)
            else:
                t, e_t = _affine_input(x, scale, shift)
                q = y / t
                d = ds * q
                room = np.abs(t) - e_t
                e_q = np.where(room > 0, (e_y + np.abs(q) * e_t) / room, np.inf)
                e_d = abs(ds) * e_q + 3 * u * np.abs(d)
        out = ag * e_d + u * np.abs(g * d) + E
    return [np.where(np.isnan(out), 0.0, out)], []


LAYER_BOUNDS["Power"] = LayerBound(
    "layer_power", _power_forward, "layer_power_grad", _power_backward
)


def _exp_constants(spec: LayerSpec) -> tuple[float, float, float, float]:
    """(inner, outer, delta per unit of exponent magnitude, |ln(base) shift|)."""
    p = spec.param("exp_param")
    base, scale, shift = f32(p["base"]), f32(p["scale"]), f32(p["shift"])
    natural = base == -1
    inner = (1.0 if natural else float(np.log(base))) * scale
    outer = 1.0 if shift == 0 else float(np.exp(shift) if natural else np.power(base, shift))
    delta = 0.0 if natural and scale == 1 and shift == 0 else (L + 3) * u
    return inner, outer, delta, abs(shift * (1.0 if natural else float(np.log(base))))


def _exp_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """See TABLE['layer_exp']."""
    inner, outer, delta, offset = _exp_constants(spec)
    x, y = bottoms[0], tops[0]
    rel = np.exp(delta * (np.abs(inner * x) + offset)) * (1 + L * u) * (1 + (L + 1) * u) * (1 + u)
    rel = rel - 1
    return [rel * np.abs(y) + (abs(outer) + 1) * E]


def _exp_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """See TABLE['layer_exp_grad']."""
    inner, _, _, _ = _exp_constants(spec)
    (e_y,) = _exp_forward(spec, bottoms, blobs, tops)
    y, g = tops[0], top_diffs[0]
    gx = np.abs(g * y * inner)
    return [np.abs(g * inner) * e_y + (L + 3) * u * gx + (abs(inner) + 1) * E], []


LAYER_BOUNDS["Exp"] = LayerBound("layer_exp", _exp_forward, "layer_exp_grad", _exp_backward)


def _log_constants(spec: LayerSpec) -> tuple[float, float, float, float]:
    """(scale, shift, 1 / ln base, rounding of the base-derived constants)."""
    p = spec.param("log_param")
    base, scale, shift = f32(p["base"]), f32(p["scale"]), f32(p["shift"])
    natural = base == -1
    inv = 1.0 if natural else 1.0 / float(np.log(base))
    return scale, shift, inv, 0.0 if natural else (L + 1) * u


def _log_forward(spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays) -> list[F64]:
    """See TABLE['layer_log']."""
    scale, shift, inv, e_c = _log_constants(spec)
    x, y = bottoms[0], tops[0]
    t, e_t = _affine_input(x, scale, shift)
    with np.errstate(all="ignore"):
        at = np.abs(t)
        r = np.where(e_t < at, -np.log1p(-e_t / at), np.inf)
        lt = np.abs(np.log(at))
        out = abs(inv) * (r + L * u * (lt + r)) + (e_c + (u if inv != 1 else 0.0)) * np.abs(y) + E
    return [np.where(np.isnan(out), 0.0, out)]


def _log_backward(
    spec: LayerSpec, bottoms: Arrays, blobs: Arrays, tops: Arrays, top_diffs: Arrays
) -> tuple[list[F64 | None], list[F64 | None]]:
    """See TABLE['layer_log_grad']."""
    scale, shift, inv, e_c = _log_constants(spec)
    x, g = bottoms[0], top_diffs[0]
    t, e_t = _affine_input(x, scale, shift)
    c = scale * inv
    with np.errstate(all="ignore"):
        at = np.abs(t)
        e_r = np.where(e_t < at, e_t / (at * (at - e_t)), np.inf) + L * u / at
        gx = np.abs(g * c / t)
        out = np.abs(g * c) * e_r + (e_c + 2 * u) * gx + E
    return [np.where(np.isnan(out), 0.0, out)], []


LAYER_BOUNDS["Log"] = LayerBound("layer_log", _log_forward, "layer_log_grad", _log_backward)
