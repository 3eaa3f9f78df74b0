"""Numeric ranges as grammar rules: JSON integers (and decimals) between two bounds,
digit by digit, as llama.cpp's C++ schema converter does and the Python one that
llama-cpp-python ships does not (it drops ``minimum``/``maximum`` without a word).

A range becomes alternatives of digit-class sequences: 17..342 is
``[1] [7-9] | [2-9] [0-9] | [1-2] [0-9]{2} | [3] [0-3] [0-9] | [3] [4] [0-2]``.
The same structure renders as GBNF (for the sampler) and as a regular expression
(for the tests, which check it against Python's own comparisons).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

MORE_DIGITS = 15  # how many digits an unbounded range may add (the converter's own limit)


@dataclass(frozen=True)
class Digits:
    """A digit class ``[lo-hi]`` repeated ``least`` to ``most`` times."""

    lo: int
    hi: int
    least: int = 1
    most: int = 1


Sequence = tuple[Digits, ...]


def _same_length(x: str, y: str) -> list[Sequence]:
    """Digit strings of len(x) from x to y (x <= y, same length)."""
    if not x:
        return [()]
    x0, y0, rest = int(x[0]), int(y[0]), len(x) - 1
    tail = (Digits(0, 9, rest, rest),) if rest else ()
    if x0 == y0:
        return [(Digits(x0, x0), *s) for s in _same_length(x[1:], y[1:])]
    out: list[Sequence] = []
    first = x0
    if x[1:] != "0" * rest:  # x0 followed by x's rest up to all nines
        out += [(Digits(x0, x0), *s) for s in _same_length(x[1:], "9" * rest)]
        first = x0 + 1
    last = y0 if y[1:] == "9" * rest else y0 - 1
    if first <= last:
        out.append((Digits(first, last), *tail))
    if y[1:] != "9" * rest:  # y0 followed by all zeros up to y's rest
        out += [(Digits(y0, y0), *s) for s in _same_length("0" * rest, y[1:])]
    return out


def whole_numbers(lo: int, hi: int | None) -> list[Sequence]:
    """Decimal forms (no sign, no leading zeros) of lo..hi, 0 <= lo; hi None: unbounded."""
    if hi is not None and hi < lo:
        return []
    out: list[Sequence] = []
    shortest = len(str(lo))
    longest = len(str(hi)) if hi is not None else shortest
    for length in range(shortest, longest + 1):
        a = max(lo, 10 ** (length - 1) if length > 1 else 0)
        b = min(hi, 10**length - 1) if hi is not None else 10**length - 1
        if a <= b:
            out += _same_length(str(a), str(b))
    if hi is None:  # every number with more digits
        out.append((Digits(1, 9), Digits(0, 9, shortest, shortest), Digits(0, 9, 0, MORE_DIGITS)))
    return out


@dataclass(frozen=True)
class Alternative:
    negative: bool
    digits: Sequence
    fraction: str = "none"  # "none", "any" (optional), "zero" (optional, all zeros), "nonzero"


def integers(lo: int | None, hi: int | None) -> list[Alternative]:
    """Every integer in lo..hi (None: unbounded), as signed alternatives."""
    out: list[Alternative] = []
    if hi is None or hi >= 0:
        out += [Alternative(False, s) for s in whole_numbers(max(lo or 0, 0), hi)]
    if lo is None or lo < 0:  # magnitudes of the negatives, never "-0"
        least = max(1, -hi) if hi is not None and hi < 0 else 1
        out += [Alternative(True, s) for s in whole_numbers(least, None if lo is None else -lo)]
    return out


def decimals(
    lo: Fraction | None, hi: Fraction | None, lo_open: bool, hi_open: bool
) -> list[Alternative]:
    """Every decimal in the range (whole bounds only; open ends exclusive), as an
    integer part and a fraction: v = I + f with 0 <= f < 1 for v >= 0, and the same
    on the magnitude for v < 0."""
    for bound in (lo, hi):
        if bound is not None and bound.denominator != 1:
            raise ValueError("only whole-number bounds")
    out: list[Alternative] = []
    # the non-negative part: magnitudes m in [L, H] with L >= 0
    if hi is None or hi > 0 or (hi == 0 and not hi_open):
        start, start_open = (0, False) if lo is None or lo < 0 else (int(lo), lo_open)
        out += _magnitudes(False, start, start_open, None if hi is None else int(hi), hi_open)
    # the negative part: magnitudes in [-H, -L], where m > 0
    if lo is None or lo < 0:
        least, least_open = (int(-hi), hi_open) if hi is not None and hi < 0 else (0, True)
        out += _magnitudes(True, least, least_open, None if lo is None else int(-lo), lo_open)
    return out


def _magnitudes(
    negative: bool, low: int, low_open: bool, high: int | None, high_open: bool
) -> list[Alternative]:
    """Magnitudes m = I + f in the range low..high (open ends exclusive)."""
    out: list[Alternative] = []
    first = low + 1 if low_open else low  # I from here on takes any fraction
    last = None if high is None else high - 1  # ... up to here
    if last is None or first <= last:
        out += [Alternative(negative, s, "any") for s in whole_numbers(first, last)]
    if low_open and (high is None or low < high):  # I == low: only above it
        out += [Alternative(negative, s, "nonzero") for s in whole_numbers(low, low)]
    if high is not None and not high_open and high >= first:  # I == high: high itself only
        out += [Alternative(negative, s, "zero") for s in whole_numbers(high, high)]
    return out


# --- rendering ---------------------------------------------------------------------------
_FRACTIONS_GBNF = {
    "none": "",
    "any": ' ("." [0-9]{1,15})?',
    "zero": ' ("." [0]{1,15})?',
    "nonzero": ' "." [0]{0,14} [1-9] [0-9]{0,14}',
}
_FRACTIONS_RE = {
    "none": "",
    "any": r"(\.[0-9]{1,15})?",
    "zero": r"(\.0{1,15})?",
    "nonzero": r"\.0{0,14}[1-9][0-9]{0,14}",
}


def _piece(d: Digits, regex: bool) -> str:
    cls = f"[{d.lo}]" if d.lo == d.hi else f"[{d.lo}-{d.hi}]"
    if (d.least, d.most) == (1, 1):
        return cls
    count = f"{{{d.least}}}" if d.least == d.most else f"{{{d.least},{d.most}}}"
    return cls + count if regex else f"{cls}{count}"


def gbnf(alternatives: list[Alternative]) -> str:
    """The alternatives as one GBNF expression (no trailing space rule)."""
    if not alternatives:
        raise ValueError("an empty range")
    parts = []
    for a in alternatives:
        digits = " ".join(_piece(d, False) for d in a.digits if d.most > 0)
        parts.append(('"-" ' if a.negative else "") + digits + _FRACTIONS_GBNF[a.fraction])
    return "(" + " | ".join(parts) + ")"


def regex(alternatives: list[Alternative]) -> str:
    """The same alternatives as a regular expression to full-match (for the tests)."""
    parts = []
    for a in alternatives:
        digits = "".join(_piece(d, True) for d in a.digits if d.most > 0)
        parts.append(("-" if a.negative else "") + digits + _FRACTIONS_RE[a.fraction])
    return "(" + "|".join(parts) + ")"
