"""JSON Schema ``pattern`` to GBNF, for the text between a JSON string's quotes.

llama-cpp-python's converter copies a pattern into the grammar nearly verbatim: a
``"`` or ``\\`` comes out raw (the answer is not JSON), ``.`` and ``[^…]`` let control
characters through (not JSON either), and ``\\d``, ``\\w``, ``\\s`` become literal
backslash escapes. This module parses the pattern itself and emits a grammar
whose every string is valid JSON string content that decodes to a match:

- literals are written as JSON encodes them (``"`` as ``\\"``, a tab as ``\\t``);
- ``.`` and negated classes (``[^…]``, ``\\D``, ``\\W``, ``\\S``) never produce a
  control character, ``"`` or ``\\`` (a subset of what they match: every answer
  still matches the pattern, and JSON needs no escapes);
- ``\\d`` is ``[0-9]``, ``\\w`` ``[A-Za-z0-9_]``, ``\\s`` a space, tab, newline or
  carriage return;
- ``* + ? {n} {n,} {n,m}`` (also lazy, which matches the same strings here), groups
  ``( )`` and ``(?: )``, alternation ``|``.

Anything else (lookarounds, backreferences, ``\\b``, inner anchors, Unicode classes)
raises ``PatternError`` with what it met, and the request is a 400.
"""

from __future__ import annotations

import json
import re

MAX_REPEAT = 1000
COUNTS = re.compile(r"\{(\d+)(,(\d*))?\}")
CONTROLS = (0x00, 0x1F)
UNSAFE = [CONTROLS, (0x22, 0x22), (0x5C, 0x5C)]  # what JSON strings must escape
DIGIT = [(0x30, 0x39)]
WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
SPACE = [(0x09, 0x0A), (0x0D, 0x0D), (0x20, 0x20)]
CLASS_ESCAPES = {"d": DIGIT, "w": WORD, "s": SPACE}
CONTROL_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}


class PatternError(ValueError):
    pass


def to_gbnf(pattern: str) -> str:
    """The GBNF of the JSON string content matching ``^…$`` ``pattern``."""
    escaped_end = (len(pattern) - len(pattern[:-1].rstrip("\\")) - 1) % 2  # ``\$``
    if not (pattern.startswith("^") and pattern.endswith("$")) or escaped_end:
        raise PatternError("patterns must be anchored as ^…$")
    parser = _Parser(pattern[1:-1])
    expr = parser.alternation()
    if parser.i != len(parser.text):
        raise PatternError(f"unexpected {parser.text[parser.i]!r} at {parser.i + 1}")
    return expr


def _literal(char: str) -> str:
    """A GBNF literal of ``char`` as JSON writes it inside a string."""
    encoded = json.dumps(char, ensure_ascii=False)[1:-1]
    return '"' + encoded.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _hex(code: int) -> str:
    return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"


def _ranges(intervals: list[tuple[int, int]]) -> str:
    return "".join(_hex(lo) if lo == hi else f"{_hex(lo)}-{_hex(hi)}" for lo, hi in intervals)


def _minus(intervals: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for lo, hi in intervals:
        pieces = [(lo, hi)]
        for clo, chi in cut:
            pieces = [
                part
                for plo, phi in pieces
                for part in ((plo, min(phi, clo - 1)), (max(plo, chi + 1), phi))
                if part[0] <= part[1]
            ]
        out += pieces
    return out


def _positive(intervals: list[tuple[int, int]]) -> str:
    """A class: its JSON-safe characters as one GBNF class, the rest escaped."""
    options = []
    safe = _minus(intervals, UNSAFE)
    if safe:
        options.append(f"[{_ranges(safe)}]")
    for lo, hi in intervals:
        for code in range(max(lo, 0), min(hi, 0x5C) + 1):
            if code <= CONTROLS[1] or code in (0x22, 0x5C):
                options.append(_literal(chr(code)))
    if not options:
        raise PatternError("a character class that matches nothing")
    return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"


def _negated(intervals: list[tuple[int, int]]) -> str:
    return f"[^{_ranges(intervals + UNSAFE)}]"


def _escaped(char: str) -> str:
    """The character ``\\char`` stands for: a control character, or punctuation."""
    if char in CONTROL_ESCAPES:
        return CONTROL_ESCAPES[char]
    if char.isalnum():
        raise PatternError(f"the escape \\{char} is not supported")
    return char


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.i = text, 0

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def take(self) -> str:
        if self.i >= len(self.text):
            raise PatternError("the pattern ends too soon")
        char = self.text[self.i]
        self.i += 1
        return char

    def alternation(self) -> str:
        options = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"

    def sequence(self) -> str:
        items = []
        while self.peek() not in ("", "|", ")"):
            items.append(self.quantified(self.atom()))
        return " ".join(items) if items else '""'

    def quantified(self, atom: str) -> str:
        char = self.peek()
        if char in ("*", "+", "?"):
            self.i += 1
            suffix = char
        elif counts := COUNTS.match(self.text, self.i):
            self.i = counts.end()
            lo, hi = int(counts[1]), int(counts[3]) if counts[3] else None
            if not counts[2]:
                hi = lo
            if lo > MAX_REPEAT or (hi is not None and not lo <= hi <= MAX_REPEAT):
                raise PatternError(f"a repetition {counts[0]} outside 0…{MAX_REPEAT}")
            suffix = f"{{{lo}}}" if lo == hi else f"{{{lo},{'' if hi is None else hi}}}"
        else:
            return atom
        if self.peek() == "?":  # lazy: the same strings match the whole pattern
            self.i += 1
        elif self.peek() == "+":
            raise PatternError("possessive quantifiers are not supported")
        if self.peek() in ("*", "+", "?") or COUNTS.match(self.text, self.i):
            raise PatternError(f"a quantifier after a quantifier at {self.i + 1}")
        return f"({atom}){suffix}"

    def atom(self) -> str:
        char = self.take()
        if char == "(":
            if self.peek() == "?":
                if self.text.startswith("?:", self.i):
                    self.i += 2
                else:
                    raise PatternError("lookarounds and named groups are not supported")
            inner = self.alternation()
            if self.take() != ")":
                raise PatternError("an unclosed group")
            return f"({inner})"
        if char == "[":
            return self.char_class()
        if char == ".":
            return _negated([(0x0A, 0x0A), (0x0D, 0x0D)])
        if char == "\\":
            return self.escape()
        if char in "^$":
            raise PatternError(f"{char!r} inside the pattern (only ^…$ around it)")
        if char in "*+?{":
            raise PatternError(f"nothing to repeat before {char!r} at {self.i}")
        if char in ")]}":
            raise PatternError(f"an unmatched {char!r} at {self.i}")
        return _literal(char)

    def escape(self) -> str:
        char = self.take()
        if char in CLASS_ESCAPES:
            return _positive(CLASS_ESCAPES[char])
        if char.lower() in CLASS_ESCAPES:
            return _negated(CLASS_ESCAPES[char.lower()])
        return _literal(_escaped(char))

    def class_char(self) -> int:
        char = self.take()
        return ord(_escaped(self.take()) if char == "\\" else char)

    def char_class(self) -> str:
        negated = self.peek() == "^"
        self.i += negated
        intervals: list[tuple[int, int]] = []
        first = True
        while first or self.peek() != "]":
            first = False
            escaped = self.text[self.i + 1 : self.i + 2]
            if self.peek() == "\\" and escaped in CLASS_ESCAPES:
                intervals += CLASS_ESCAPES[escaped]
                self.i += 2
                continue
            lo = self.class_char()
            if self.peek() == "-" and self.text[self.i + 1 : self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.class_char()
                if hi < lo:
                    raise PatternError(f"the range {chr(lo)}-{chr(hi)} runs backwards")
                intervals.append((lo, hi))
            else:
                intervals.append((lo, lo))
        self.take()  # the ]
        return _negated(intervals) if negated else _positive(intervals)
