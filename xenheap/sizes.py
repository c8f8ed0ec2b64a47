"""Parsing and formatting of byte sizes ("1.5GiB", "512 KiB", 4096)."""

from __future__ import annotations

import numbers
import re
import reprlib
from decimal import Decimal
from fractions import Fraction

from xenheap.errors import InvalidArgument

__all__ = ["format_size", "parse_size"]

# Plain SI spellings (KB, MB, ...) are decimal; single letters and the "iB" forms are binary.
_UNITS: dict[str, int] = {"": 1, "b": 1}
for _exp, _letter in enumerate("kmgt", start=1):
    _UNITS[_letter] = 1024**_exp
    _UNITS[_letter + "ib"] = 1024**_exp
    _UNITS[_letter + "b"] = 1000**_exp

# No signs, exponents or underscores: a size is digits, an optional fraction, a unit.
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")

_FORMAT_UNITS = ("KiB", "MiB", "GiB", "TiB")
# From this many of the largest unit on, format_size switches to a power of ten.
_MAX_WHOLE = 10**15


def parse_size(value: int | str, *, what: str = "size") -> int:
    """Return ``value`` as a whole number of bytes.

    Accepts a non-negative integer, or a string such as ``"4096"``, ``"64K"``, ``"1.5 GiB"``
    or ``"2MB"`` (``K``/``KiB`` = 1024, ``KB`` = 1000; units are case-insensitive).
    Raises :class:`InvalidArgument`, naming ``what``, for anything else.
    """
    # Values are quoted abridged (reprlib): 5,000 digits stay one short line.
    # bool is an Integral but "True bytes" is surely a mistake.
    if isinstance(value, bool):
        raise InvalidArgument(f"{what} must be an integer or a size string, not bool {value!r}")
    if isinstance(value, numbers.Integral):
        nbytes = int(value)
        if nbytes < 0:
            raise InvalidArgument(f"{what} must not be negative, got {reprlib.repr(value)}")
        return nbytes
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be an integer or a size string, not "
                              f"{type(value).__name__} {reprlib.repr(value)}")
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        raise InvalidArgument(f"{what}: cannot parse {reprlib.repr(value)} as a size "
                              "(e.g. 4096, 64K, 1.5GiB)")
    number, unit = match.groups()
    multiplier = _UNITS.get(unit.lower())
    if multiplier is None:
        raise InvalidArgument(
            f"{what}: unknown unit {unit!r} in {reprlib.repr(value)} (use B, K/KiB, M/MiB, "
            "G/GiB, T/TiB, or KB/MB/GB/TB for powers of 1000)"
        )
    try:
        exact = Fraction(number) * multiplier
    except ValueError as exc:  # e.g. more digits than int() accepts
        raise InvalidArgument(f"{what}: cannot parse {reprlib.repr(value)} as a size") from exc
    if exact.denominator != 1:
        raise InvalidArgument(f"{what}: {reprlib.repr(value)} is not a whole number of bytes")
    return int(exact)


def format_size(nbytes: int) -> str:
    """Format a byte count for people: ``"12 B"``, ``"512 KiB"``, ``"1.0 GiB"``.

    Below 100 of a unit one decimal is shown, from 100 on none; from 10**15 TiB on, a power
    of ten: ``"1.00e+24 TiB"``.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral):
        raise InvalidArgument(f"format_size needs an integer, got {nbytes!r}")
    nbytes = int(nbytes)
    sign = "-" if nbytes < 0 else ""
    magnitude = abs(nbytes)
    if magnitude < 1024:
        return f"{sign}{magnitude} B"
    text = ""
    for exp, unit in enumerate(_FORMAT_UNITS, start=1):
        # Exact: a float cannot hold every int (it overflows, or rounds away digits).
        scaled = Fraction(magnitude, 1024**exp)
        whole = round(scaled)
        if round(scaled, 1) < 100:  # "100.0 KiB" reads as "100 KiB" does
            text = f"{float(scaled):.1f} {unit}"
        elif whole < _MAX_WHOLE:
            text = f"{whole} {unit}"
        else:  # more digits than anyone reads (or than str() of an int may have)
            text = f"{Decimal(whole):.2e} {unit}"
        # Rounding may reach 1024 (e.g. "1024 KiB"): then the next unit reads better.
        if whole < 1024 or exp == len(_FORMAT_UNITS):
            break
    return sign + text
