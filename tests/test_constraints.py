"""Budget and max-drop grammar: examples and property-based round trips."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recommender.constraints import Budget, MaxDrop, format_quantity, parse_budgets
from recommender.errors import ConstraintSyntaxError


@pytest.mark.parametrize("text,metric,limit", [
    ("5M-params", "params", 5e6),
    ("800k-params", "params", 8e5),
    ("1.5M-nonzero-params", "nonzero-params", 1.5e6),
    ("60M-flops", "flops", 60.0),          # stored in MFLOPs
    ("2G-flops", "flops", 2000.0),
    ("4MB", "size", 4.0),
    ("512kB", "size", 0.5),
    ("12ms", "latency", 12.0),
    ("0.5ms", "latency", 0.5),
])
def test_budget_examples(text, metric, limit):
    b = Budget.parse(text)
    assert b.metric == metric
    assert math.isclose(b.limit, limit)
    assert b.text == text


@pytest.mark.parametrize("text", ["", "5M", "params", "5X-params", "-5M-params", "5M-parms", "4 MiB",
                                  "12 s", "0-params", "0MB", "nan-params", "5M-params-extra"])
def test_budget_malformed_names_accepted_forms(text):
    with pytest.raises(ConstraintSyntaxError) as exc:
        Budget.parse(text)
    assert "accepted forms" in str(exc.value) or "positive" in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("text,value,relative,allowed", [
    ("2%", 2.0, False, 2.0), ("2pp", 2.0, False, 2.0), ("0.5%", 0.5, False, 0.5),
    ("5%rel", 5.0, True, 4.5),  # 5 % of a 90 % baseline = 4.5 points
])
def test_drop_examples(text, value, relative, allowed):
    d = MaxDrop.parse(text)
    assert (d.value, d.relative) == (value, relative)
    assert math.isclose(d.allowed_pp(0.90), allowed)


@pytest.mark.parametrize("text", ["", "two", "2%%", "-1%", "101%", "2 percent", "%"])
def test_drop_malformed(text):
    with pytest.raises(ConstraintSyntaxError):
        MaxDrop.parse(text)


def test_violation_sign_and_scale():
    b = Budget.parse("5M-params")
    assert b.violation({"params": 4e6}) < 0
    assert b.violation({"params": 5e6}) == 0
    assert math.isclose(b.violation({"params": 10e6}), 1.0)
    assert b.violation({"params": None}) == math.inf


def test_duplicate_metric_rejected_and_order_kept():
    bs = parse_budgets(["60M-flops", "5M-params"])
    assert [b.metric for b in bs] == ["flops", "params"]
    with pytest.raises(ConstraintSyntaxError):
        parse_budgets(["5M-params", "1M-params"])


counts = st.decimals(min_value="0.001", max_value="9999", places=3, allow_nan=False, allow_infinity=False)


@given(num=counts, mult=st.sampled_from(["", "k", "M", "G"]),
       metric=st.sampled_from(["params", "nonzero-params", "flops"]))
@settings(max_examples=200, deadline=None)
def test_count_budgets_parse_to_their_value(num, mult, metric):
    text = f"{num}{mult}-{metric}"
    b = Budget.parse(text)
    value = float(num) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[mult]
    expected = value / 1e6 if metric == "flops" else value
    assert b.metric == metric
    assert math.isclose(b.limit, expected, rel_tol=1e-9)


@given(num=counts, unit=st.sampled_from(["kB", "MB", "GB", "ms"]))
@settings(max_examples=100, deadline=None)
def test_size_and_latency_budgets(num, unit):
    b = Budget.parse(f"{num}{unit}")
    factor = {"kB": 1 / 1024, "MB": 1.0, "GB": 1024.0, "ms": 1.0}[unit]
    assert math.isclose(b.limit, float(num) * factor, rel_tol=1e-9)


@given(st.text(max_size=20))
@settings(max_examples=300, deadline=None)
def test_arbitrary_text_parses_or_raises_one_line(text):
    for parse in (Budget.parse, MaxDrop.parse):
        try:
            parse(text)
        except ConstraintSyntaxError as exc:
            assert "\n" not in str(exc)


@given(value=st.decimals(min_value="0", max_value="100", places=2), unit=st.sampled_from(["%", "pp", "%rel"]))
@settings(max_examples=100, deadline=None)
def test_drop_round_trip(value, unit):
    d = MaxDrop.parse(f"{value}{unit}")
    assert math.isclose(d.value, float(value))
    assert d.relative == (unit == "%rel")
    base = 0.8
    assert math.isclose(d.allowed_pp(base), float(value) * (base if d.relative else 1.0))


def test_format_quantity():
    assert format_quantity(4.21e6, "params") == "4.21M params"
    assert format_quantity(None, "ms") == "n/a"
    assert format_quantity(61.3, "MFLOPs") == "61.3 MFLOPs"
