"""Tests of xenheap.sizes: parse_size and format_size."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenheap.errors import InvalidArgument
from xenheap.sizes import format_size, parse_size

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        (" 4096 ", 4096),
        ("12B", 12),
        ("12 b", 12),
        ("1K", KIB),
        ("1k", KIB),
        ("1KiB", KIB),
        ("1kib", KIB),
        ("1KB", 1000),
        ("1kb", 1000),
        ("64M", 64 * MIB),
        ("64 MiB", 64 * MIB),
        ("64MB", 64 * 10**6),
        ("2G", 2 * GIB),
        ("2GiB", 2 * GIB),
        ("2GB", 2 * 10**9),
        ("1T", TIB),
        ("1TiB", TIB),
        ("1TB", 10**12),
        ("1.5GiB", 3 * GIB // 2),
        ("1.5 G", 3 * GIB // 2),
        (".5K", 512),
        ("2.K", 2 * KIB),
        ("0.25MiB", MIB // 4),
        ("1.5KB", 1500),
        ("\t3 MiB\n", 3 * MIB),
    ],
)
def test_parse_size_strings(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_ints() -> None:
    assert parse_size(0) == 0
    assert parse_size(12345) == 12345
    assert parse_size(np.int64(4096)) == 4096
    assert type(parse_size(np.int64(4096))) is int


@pytest.mark.parametrize(
    "bad",
    [
        -1,
        "-1",
        "-1K",
        "+5",
        "",
        "   ",
        "abc",
        "K",
        "1 2",
        "1e3",
        "0x10",
        "1_000",
        "1.5",  # not a whole number of bytes
        "0.1K",  # 102.4 bytes
        "1.5B",
        "1PB",
        "1Ki",
        "1 KiBs",
        "1.2.3",
        True,
        False,
        1.0,
        2.5,
        np.float64(4.0),
        None,
        b"4096",
        [4096],
        "9" * 5000,  # more digits than int() parses
    ],
)
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(bad)  # type: ignore[arg-type]


def test_parse_size_error_names_what_and_value() -> None:
    with pytest.raises(InvalidArgument, match="arena_size") as info:
        parse_size("12 parsecs", what="arena_size")
    assert "12 parsecs" in str(info.value)
    with pytest.raises(InvalidArgument, match="quota") as info:
        parse_size(-7, what="quota")
    assert "-7" in str(info.value)
    with pytest.raises(ValueError):  # InvalidArgument is a ValueError too
        parse_size("nope")


@pytest.mark.parametrize(
    ("nbytes", "expected"),
    [
        (0, "0 B"),
        (12, "12 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (512 * KIB, "512 KiB"),
        (MIB, "1.0 MiB"),
        (GIB, "1.0 GiB"),
        (3 * GIB // 2, "1.5 GiB"),
        (99 * MIB, "99.0 MiB"),
        (100 * MIB, "100 MiB"),
        (1023 * KIB + 1000, "1.0 MiB"),  # rounding up to 1024 KiB moves to the next unit
        (2048 * TIB, "2048 TiB"),
        (-12, "-12 B"),
        (-2 * GIB, "-2.0 GiB"),
    ],
)
def test_format_size(nbytes: int, expected: str) -> None:
    assert format_size(nbytes) == expected


@pytest.mark.parametrize(
    ("nbytes", "expected"),
    [
        ((10**15 - 1) * TIB, "999999999999999 TiB"),  # the largest shown whole
        (999999999999999999999999 * TIB, "1.00e+24 TiB"),  # not a float's 999...983222784
        (10**400, "9.09e+387 TiB"),  # beyond any float
        (-(10**400), "-9.09e+387 TiB"),
    ],
)
def test_format_size_of_huge_sizes(nbytes: int, expected: str) -> None:
    assert format_size(nbytes) == expected


def test_format_size_of_more_digits_than_str_takes() -> None:
    """Python refuses to turn an int of over 4300 digits into a string: not needed here."""
    assert format_size(10**5000) == "9.09e+4987 TiB"


@pytest.mark.parametrize("bad", [1.5, "12", None, True])
def test_format_size_rejects_non_int(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        format_size(bad)  # type: ignore[arg-type]


_BINARY = {"K": KIB, "KiB": KIB, "M": MIB, "MiB": MIB, "G": GIB, "GiB": GIB, "T": TIB, "TiB": TIB}
_DECIMAL = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1, "": 1}


@given(
    count=st.integers(min_value=0, max_value=10**6),
    unit=st.sampled_from(sorted({**_BINARY, **_DECIMAL})),
    space=st.sampled_from(["", " ", "  "]),
    lower=st.booleans(),
)
def test_parse_size_units_roundtrip(count: int, unit: str, space: str, lower: bool) -> None:
    text = f"{count}{space}{unit.lower() if lower else unit}"
    assert parse_size(text) == count * {**_BINARY, **_DECIMAL}[unit]


@given(mantissa=st.integers(min_value=1, max_value=1023), exp=st.integers(min_value=0, max_value=4))
def test_format_then_parse_is_exact_for_round_sizes(mantissa: int, exp: int) -> None:
    nbytes = mantissa * 1024**exp
    assert parse_size(format_size(nbytes)) == nbytes


@given(st.integers(min_value=0, max_value=2**50))
def test_format_then_parse_is_close(nbytes: int) -> None:
    text = format_size(nbytes)
    # format_size rounds: three significant digits at least, so within 5 %.
    number, unit = text.split()
    back = round(float(number) * {"B": 1, **_BINARY}[unit])
    assert abs(back - nbytes) <= 0.05 * nbytes
    assert parse_size(str(nbytes)) == nbytes


def test_parse_size_quotes_a_long_value_abridged() -> None:
    with pytest.raises(InvalidArgument, match=r"^size: cannot parse '999.*\.\.\..*999' as") as info:
        parse_size("9" * 5000)
    assert len(str(info.value)) < 100


def test_format_size_shows_no_decimal_from_100_of_a_unit_after_rounding() -> None:
    assert format_size(102359) == "100 KiB"  # 99.96 KiB
    assert format_size(102348) == "99.9 KiB"
