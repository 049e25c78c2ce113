"""The Comparison result type and the bit-exact comparison, on small hand-built arrays."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.typing import NDArray

from crossval.compare import Comparison, exact

INF = float("inf")
NAN = float("nan")
FMAX = float(np.finfo(np.float64).max)
ONE_ULP_ABOVE_1 = float(np.nextafter(np.float32(1), np.float32(2)))  # 1 + 2**-23

# The module docstring's grammar, the rule allowed after "elements over" (the text carries it).
GRAMMAR = re.compile(
    r"^(?P<check>[^:\n]+): (?P<blob>[^\[=\n]+)(?P<index>\[\d+(?:, \d+)*\])?=(?P<actual>\S+), "
    r"(?P<verdict>but|and) should be roughly (?P<desired>\S+) "
    r"\(\|err\| (?P<abs>\S+) (?P<cmp>>|<=) (?P<bound>\S+) allowed, rel (?P<rel>\S+), "
    r"(?P<ulp>\S+) ulp; (?P<k>\d+) of (?P<n>\d+) elements over(?:; (?P<rule>[^\n]*))?\) "
    r"\[(?P<case>[^\n]*)\]$"
)


def parse(c: Comparison) -> dict[str, str]:
    text = str(c)
    assert "\n" not in text, f"not one line: {text!r}"
    m = GRAMMAR.match(text)
    assert m is not None, f"does not follow the grammar: {text!r}"
    return {k: v for k, v in m.groupdict().items() if v is not None}


def cmp(actual: object, desired: object, bound: object, case: str = "") -> Comparison:
    return Comparison(
        "forward torch~ref64",
        "pred_age",
        np.asarray(actual, dtype=np.float64),
        np.asarray(desired, dtype=np.float64),
        np.asarray(bound, dtype=np.float64),
        "test rule",
        case,
    )


def f32(*bits: int) -> NDArray[np.float32]:
    out: NDArray[np.float32] = np.array(bits, dtype=np.uint32).view(np.float32)
    return out


# ---------------------------------------------------------------- Comparison: numbers


def test_scalar_bound() -> None:
    c = cmp([1.0, 2.0, 3.5, 4.0], [1.0, 2.5, 3.0, 4.0], 0.25)
    assert c.err.tolist() == [0.0, 0.5, 0.5, 0.0]
    assert c.over.tolist() == [False, True, True, False]
    assert c.mismatches == 2
    assert not c.passed
    assert c.worst == (1,)  # the first of the two equally bad elements
    assert c.ratio == 2.0
    assert c.max_abs == 0.5
    # float32 spacing at 2.5 and at 3.0 is 2**-22: 0.5 is 2**21 ulp.
    assert c.max_ulp == 2.0**21


def test_per_element_bound() -> None:
    c = cmp([1.0, 2.0, 3.5, 4.0], [1.0, 2.5, 3.0, 4.0], [0.0, 1.0, 0.125, 0.0])
    assert c.over.tolist() == [False, False, True, False]
    assert c.mismatches == 1
    assert c.worst == (2,)
    assert c.ratio == 4.0
    assert c.max_abs == 0.5


def test_error_equal_to_bound_passes() -> None:
    c = cmp([1.5, -2.0], [1.0, -2.25], 0.5)
    assert c.passed
    assert c.mismatches == 0
    assert c.worst == (0,)
    assert c.ratio == 1.0


def test_identical_with_zero_bound_passes() -> None:
    c = cmp([0.0, -3.0, 7.25], [0.0, -3.0, 7.25], 0.0)
    assert c.passed
    assert c.ratio == 0.0
    assert c.max_abs == 0.0
    assert c.max_ulp == 0.0


def test_any_error_over_zero_bound_is_infinitely_over() -> None:
    c = cmp([1.0, 2.0], [1.0, 2.0 + 2.0**-40], 0.0)
    assert not c.passed
    assert c.worst == (1,)
    assert c.ratio == INF


def test_worst_is_a_full_index() -> None:
    desired = np.array([[1.0], [2.0], [3.0], [40.0], [5.0]])
    actual = desired.copy()
    actual[3, 0] = 50.0
    actual[1, 0] = 2.25
    c = cmp(actual, desired, 0.5)
    assert c.worst == (3, 0)
    assert c.mismatches == 1
    assert c.ratio == 20.0


def test_worst_is_by_ratio_not_by_absolute_error() -> None:
    c = cmp([10.0, 1.0], [0.0, 0.0], [100.0, 0.5])
    assert c.worst == (1,)
    assert c.ratio == 2.0
    assert c.max_abs == 10.0


def test_one_ulp() -> None:
    c = cmp([ONE_ULP_ABOVE_1, -ONE_ULP_ABOVE_1, 2.0**-149], [1.0, -1.0, 0.0], 0.0)
    assert c.mismatches == 3
    assert c.max_ulp == 1.0


def test_empty() -> None:
    c = cmp(np.zeros((0, 3)), np.zeros((0, 3)), 0.0)
    assert c.passed
    assert c.mismatches == 0
    assert c.worst == ()
    assert c.ratio == 0.0
    assert c.max_abs == 0.0
    assert c.max_ulp == 0.0
    assert parse(c)["n"] == "0"


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError) as exc:
        cmp(np.zeros((2, 3)), np.zeros((3, 2)), 0.0)
    msg = str(exc.value)
    assert "pred_age" in msg and "(2, 3)" in msg and "(3, 2)" in msg, msg


# ---------------------------------------------------------------- Comparison: NaN and inf


@pytest.mark.parametrize("bound", [0.0, FMAX], ids=["bound 0", "bound max"])
@pytest.mark.parametrize(
    ("actual", "desired", "over"),
    [
        (NAN, 1.0, True),
        (1.0, NAN, True),
        (NAN, INF, True),
        (NAN, NAN, False),
        (INF, INF, False),
        (-INF, -INF, False),
        (INF, -INF, True),
        (-INF, INF, True),
        (INF, 1.0, True),
        (1.0, -INF, True),
    ],
)
def test_special_values(actual: float, desired: float, over: bool, bound: float) -> None:
    c = cmp([2.0, actual], [2.0, desired], bound)
    assert c.over.tolist() == [False, over]
    assert c.mismatches == int(over)
    assert c.passed is not over
    if over:
        assert c.worst == (1,)
        assert c.max_abs == INF
        assert c.ratio == INF
        assert parse(c)["verdict"] == "but"
    else:
        assert c.max_abs == 0.0
        assert c.ratio == 0.0


def test_nan_mismatch_with_finite_ulp_elsewhere() -> None:
    c = cmp([NAN, ONE_ULP_ABOVE_1], [1.0, 1.0], 1.0)
    assert c.mismatches == 1
    assert c.worst == (0,)
    assert c.max_abs == INF
    assert c.max_ulp == 1.0  # non-finite elements are left out of the ulp count


@given(
    st.lists(
        st.tuples(
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(min_value=0.0, max_value=FMAX),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_passed_ratio_and_worst_agree(rows: list[tuple[float, float, float]]) -> None:
    actual, desired, bound = (list(col) for col in zip(*rows, strict=True))
    c = cmp(actual, desired, bound)
    assert c.passed == (c.mismatches == 0)
    assert c.passed == (c.ratio <= 1.0), f"passed={c.passed} but ratio={c.ratio}"
    assert c.mismatches == int(np.count_nonzero(c.over))
    if not c.passed:
        assert c.over[c.worst], "worst is not an element over its bound"
    assert parse(c)["verdict"] == ("and" if c.passed else "but")


# ---------------------------------------------------------------- Comparison: text


def test_text_failing() -> None:
    desired = np.array([[1.0], [2.0], [3.0], [40.0], [5.0]])
    actual = desired.copy()
    actual[3, 0] = 50.0
    c = Comparison(
        "forward torch~ref64",
        "pred_age",
        actual,
        desired,
        np.full(desired.shape, 0.5),
        "fwd bound",
        "head=expectation K=101 [x]",
    )
    text = str(c)
    assert text.startswith("forward torch~ref64: pred_age[3, 0]=50, but should be roughly 40 (")
    assert "1 of 5 elements over" in text
    assert text.endswith(" [head=expectation K=101 [x]]")
    p = parse(c)
    assert p["check"] == "forward torch~ref64"
    assert p["blob"] == "pred_age"
    assert p["index"] == "[3, 0]"
    assert float(p["actual"]) == 50.0
    assert float(p["desired"]) == 40.0
    assert float(p["abs"]) == 10.0
    assert p["cmp"] == ">"
    assert float(p["bound"]) == 0.5
    assert float(p["rel"]) == 0.25
    assert p["ulp"] == f"{c.max_ulp:.3g}"
    assert (p["k"], p["n"]) == ("1", "5")
    assert p["case"] == "head=expectation K=101 [x]"


def test_text_passing() -> None:
    c = cmp([1.0, 2.0, 3.25], [1.0, 2.0, 3.0], 0.25, case="K=100")
    text = str(c)
    assert "but should be roughly" not in text
    p = parse(c)
    assert p["verdict"] == "and"
    assert p["cmp"] == "<="
    assert p["index"] == "[2]"
    assert float(p["actual"]) == 3.25
    assert (p["k"], p["n"]) == ("0", "3")
    assert p["case"] == "K=100"


def test_text_two_mismatches() -> None:
    c = cmp([1.0, 2.0, 3.5, 4.0], [1.0, 2.5, 3.0, 4.0], 0.25, case="c")
    text = str(c)
    assert "pred_age[1]=2, but should be roughly 2.5" in text
    assert "2 of 4 elements over" in text
    assert text.endswith("[c]")


def test_text_scalar_has_no_index() -> None:
    c = Comparison("loss caffe~ref64", "loss", np.float64(1.5), np.float64(1.0), 0.25, "r")
    assert c.worst == ()
    p = parse(c)
    assert str(c).startswith("loss caffe~ref64: loss=1.5, but should be roughly 1 (")
    assert "index" not in p
    assert (p["k"], p["n"]) == ("1", "1")
    assert p["case"] == ""


def test_text_nan_actual() -> None:
    c = cmp([0.0, NAN], [0.0, 3.0], 1.0, case="nan")
    p = parse(c)
    assert p["index"] == "[1]"
    assert p["actual"] == "nan"
    assert float(p["desired"]) == 3.0
    assert p["abs"] == "inf"
    assert p["verdict"] == "but"


# ---------------------------------------------------------------- exact


SPECIALS = f32(
    0x00000000,
    0x80000000,
    0x00000001,
    0x7F7FFFFF,
    0x7F800000,
    0xFF800000,
    0x7FC00000,
    0x7FC12345,
    0x7F800001,
)


def test_exact_identical_passes() -> None:
    with np.errstate(invalid="ignore"):  # casting the signalling NaN raises "invalid"
        specials64 = SPECIALS.astype(np.float64)
    for a in (SPECIALS, specials64, np.arange(6.0).reshape(2, 3)):
        c = exact("transfer", "fc1/0", a, a.copy(), "case")
        assert c.passed, str(c)
        assert c.mismatches == 0
        assert c.ratio == 0.0
        assert c.max_abs == 0.0


def test_exact_non_contiguous_input() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert exact("t", "b", a[:, ::2], a[:, ::2].copy()).passed
    assert not exact("t", "b", a[:, ::2], a[:, 1::2]).passed


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_catches_signed_zero(dtype: type[np.floating]) -> None:
    a = np.array([1.0, 0.0, 2.0], dtype=dtype)
    d = np.array([1.0, -0.0, 2.0], dtype=dtype)
    for x, y in ((a, d), (d, a)):
        c = exact("transfer", "fc1/0", x, y, "signed zero")
        assert not c.passed
        assert c.mismatches == 1
        assert c.worst == (1,)
        text = str(c)
        assert "transfer: fc1/0[1]=" in text
        assert "but should be exactly" in text
        assert "1 of 3 elements over" in text
        assert text.endswith("[signed zero]")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_catches_one_ulp(dtype: type[np.floating]) -> None:
    one = dtype(1.0)
    a = np.array([one, np.nextafter(one, dtype(2.0))], dtype=dtype)
    d = np.array([one, one], dtype=dtype)
    c = exact("transfer", "w", a, d)
    assert not c.passed
    assert c.mismatches == 1
    assert c.worst == (1,)
    if dtype is np.float32:
        assert c.max_ulp == 1.0


def test_exact_catches_denormals_and_nan_payloads() -> None:
    a = f32(0x00000001, 0x7FC00000, 0x7FC00001, 0x7F800001, 0x7FC00000)
    d = f32(0x00000000, 0x7FC00000, 0x7FC00000, 0x7FC00001, 0xFFC00000)
    c = exact("transfer", "w", a, d)
    assert c.over.tolist() == [True, False, True, True, True]
    assert c.mismatches == 4


@pytest.mark.parametrize(
    ("a_dtype", "d_dtype"), [(np.float32, np.float64), (np.float64, np.float32)]
)
def test_exact_catches_dtype(a_dtype: type[np.floating], d_dtype: type[np.floating]) -> None:
    values = [0.5, -2.0, 3.0]
    c = exact(
        "fixed torch", "pred_age.weight", np.array(values, a_dtype), np.array(values, d_dtype)
    )
    assert not c.passed
    assert c.mismatches == 3
    names = (np.dtype(a_dtype).name, np.dtype(d_dtype).name)
    assert all(n in c.rule for n in names), c.rule
    assert all(n in str(c) for n in names), str(c)


def test_exact_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        exact("t", "b", np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))


@given(
    st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.booleans()),
        min_size=1,
        max_size=8,
    )
)
def test_exact_is_a_byte_comparison(rows: list[tuple[int, int, bool]]) -> None:
    a_bits = np.array([a for a, _, _ in rows], dtype=np.uint32)
    d_bits = np.array([a if same else d for a, d, same in rows], dtype=np.uint32)
    c = exact("transfer", "w", a_bits.view(np.float32), d_bits.view(np.float32))
    differs = a_bits != d_bits
    assert c.over.tolist() == differs.tolist()
    assert c.mismatches == int(differs.sum())
    assert c.passed == (a_bits.tobytes() == d_bits.tobytes())
