"""Durations, sizes and rates: good values, bad values with clear messages, no surprises."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.units import Rate, format_duration, format_size, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("24h", 86400.0),
        ("1d", 86400.0),
        (" 2s ", 2.0),
        ("0ms", 0.0),
        ("0s", 0.0),
        ("0", 0.0),
        (0, 0.0),
        (0.0, 0.0),
        ("10 s", 10.0),
        (".5s", 0.5),
    ],
)
def test_parse_duration_good(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("5x", "bad duration '5x': use a number with a unit: ms, s, m, h, d"),
        ("5", "a number needs a unit"),
        (5, "a number needs a unit"),
        (2.5, "a number needs a unit"),
        ("-1s", "must not be negative"),
        (-1, "must not be negative"),
        ("", "empty duration"),
        ("   ", "empty duration"),
        ("nan", "bad duration"),
        ("inf", "bad duration"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        ("1.5.2s", "bad duration"),
        ("2 sec", "bad duration"),
        ("2S", "bad duration"),
        (True, "bad duration"),
    ],
)
def test_parse_duration_bad(value: object, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_parse_duration_rejects_other_types() -> None:
    values: tuple[object, ...] = (None, [], {}, b"2s")
    for value in values:
        with pytest.raises(ValueError, match="bad duration"):
            parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512B", 512),
        ("10KiB", 10 * 1024),
        ("10MiB", 10 * 1024**2),
        ("1GiB", 1024**3),
        ("10KB", 10_000),
        ("10MB", 10_000_000),
        ("1GB", 1_000_000_000),
        ("1.5KiB", 1536),
        ("1024", 1024),
        (0, 0),
        (4096, 4096),
        ("10mib", 10 * 1024**2),
    ],
)
def test_parse_size_good(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("-1KiB", "must not be negative"),
        (-1, "must not be negative"),
        ("10XB", "bad size '10XB'"),
        ("ten MiB", "bad size"),
        ("", "empty size"),
        ("1.5", "whole number"),
        (True, "bad size"),
        ("99999999999999999999GiB", "too large"),
    ],
)
def test_parse_size_bad(value: object, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)  # type: ignore[arg-type]
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "count", "per", "per_second"),
    [
        ("100/s", 100, 1, 100.0),
        ("30/m", 30, 60, 0.5),
        ("3600/h", 3600, 3600, 1.0),
        ("0.5/s", 0.5, 1, 0.5),
        ("10 / s", 10, 1, 10.0),
    ],
)
def test_parse_rate_good(text: str, count: float, per: float, per_second: float) -> None:
    rate = parse_rate(text)
    assert rate == Rate(count, per)
    assert rate.per_second == pytest.approx(per_second)
    assert rate.interval == pytest.approx(1 / per_second)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("0/s", "rate must be positive"),
        ("0.0/m", "rate must be positive"),
        ("-5/s", "rate must be positive"),
        ("100", "use N/s, N/m or N/h"),
        ("100/x", "use N/s, N/m or N/h"),
        ("/s", "bad rate"),
        ("", "empty rate"),
        (100, "bad rate"),
    ],
)
def test_parse_rate_bad(value: object, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rate(value)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_rate_is_frozen_and_prints_back() -> None:
    rate = parse_rate("30/m")
    with pytest.raises(AttributeError):
        rate.count = 1  # type: ignore[misc]
    assert str(rate) == "30/m"
    assert parse_rate(str(rate)) == rate


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.25, "250ms"), (2, "2s"), (1.5, "1.5s"), (300, "5m"), (90, "90s"), (86400, "24h")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


def test_format_size() -> None:
    assert format_size(10 * 1024**2) == "10MiB"
    assert format_size(1000) == "1000B"
    assert parse_size(format_size(1536)) == 1536


@given(st.text(max_size=40))
def test_parsers_raise_only_value_error_on_any_text(text: str) -> None:
    for parse in (parse_duration, parse_size, parse_rate):
        try:
            value = parse(text)
        except ValueError:
            continue
        if isinstance(value, Rate):
            assert value.per_second > 0 and math.isfinite(value.per_second)
        else:
            assert value >= 0 and math.isfinite(value)


@given(st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.lists(st.integers(), max_size=2)))
def test_parsers_raise_only_value_error_on_any_scalar(value: object) -> None:
    for parse in (parse_duration, parse_size, parse_rate):
        try:
            parse(value)  # type: ignore[arg-type]
        except ValueError:
            pass


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from([("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400)]),
)
def test_durations_scale_by_unit(n: int, unit: tuple[str, float]) -> None:
    assert parse_duration(f"{n}{unit[0]}") == pytest.approx(n * unit[1])
