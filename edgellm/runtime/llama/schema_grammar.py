"""JSON Schema → a llama.cpp grammar (GBNF) that every answer must follow.

llama-cpp-python's converter does the bulk; this module is what makes its output a
promise. ``check`` refuses, by name, every keyword the grammar cannot hold (the
converter drops many without a word: numeric ranges, ``multipleOf``, ``not``…);
numeric ranges are enforced here (ranges.py); ``type`` lists keep their
neighbouring keywords; and the compiled grammar is cached by the schema's hash.
What the grammar holds is checked again on the finished answer with a validator
(``validator``), so an answer that does not validate is never handed back.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

from jsonschema.exceptions import best_match

from edgellm.errors import InvalidRequest
from edgellm.runtime.llama import ranges
from edgellm.runtime.llama.pattern import PatternError
from edgellm.runtime.llama.pattern import to_gbnf as pattern_gbnf
from edgellm.runtime.types import Constraint

# keywords the grammar (with this module's additions) enforces
ENFORCED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs",
    "definitions", "minLength", "maxLength", "pattern", "format", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum",
}  # fmt: skip
# keywords that say something about a value without constraining it
ANNOTATIONS = {
    "title", "description", "default", "examples", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly", "discriminator",
}  # fmt: skip
FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
RANGE_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
CACHE_SIZE = 256  # compiled grammars kept, least recently used first out


def _subschemas(schema: dict[str, Any], path: str) -> Iterator[tuple[Any, str]]:
    for key in ("properties", "$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            yield sub, f"{path}.{key}.{name}"
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for i, sub in enumerate(schema.get(key) or []):
            yield sub, f"{path}.{key}[{i}]"
    items = schema.get("items")
    if isinstance(items, list):
        yield from ((sub, f"{path}.items[{i}]") for i, sub in enumerate(items))
    elif items is not None:
        yield items, f"{path}.items"
    if isinstance(schema.get("additionalProperties"), dict):
        yield schema["additionalProperties"], f"{path}.additionalProperties"


def check(schema: Any, path: str) -> None:
    """Refuse a schema that is not one, or uses what the grammar cannot enforce; the
    message names the keyword and where it is (``path`` names the schema itself)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, dict):
        raise InvalidRequest(f"{path} must be a JSON Schema object", param=path)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise InvalidRequest(
            f"{path}{where} is not a valid JSON Schema: {exc.message}", param=path
        ) from None
    stack = [(schema, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, bool):
            continue
        _check_node(node, where)
        stack.extend(_subschemas(node, where))


def _refuse(where: str, keyword: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"{where}.{keyword}: {why}", param=f"{where}.{keyword}")


def _check_node(node: dict[str, Any], where: str) -> None:
    for keyword in node:
        if keyword not in ENFORCED and keyword not in ANNOTATIONS:
            raise _refuse(
                where,
                keyword,
                f"edgellm cannot enforce {keyword!r} while decoding, so it "
                "refuses it rather than ignore it (see the README for the keywords it holds)",
            )
    fmt = node.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise _refuse(
            where,
            "format",
            f"format {fmt!r} is not one edgellm enforces ({', '.join(sorted(FORMATS))})",
        )
    if "pattern" in node:
        pattern = node["pattern"]
        if not (pattern.startswith("^") and pattern.endswith("$")):
            raise _refuse(
                where,
                "pattern",
                "patterns must be anchored as ^…$ (edgellm matches the whole string)",
            )
        try:
            pattern_gbnf(pattern)
        except PatternError as exc:
            raise _refuse(
                where, "pattern", f"{exc}; edgellm cannot hold it while decoding"
            ) from None
        for other in ("minLength", "maxLength", "format"):
            if other in node:
                raise _refuse(
                    where,
                    other,
                    "cannot be combined with pattern (write the length into the pattern)",
                )
    if "format" in node and ("minLength" in node or "maxLength" in node):
        raise _refuse(
            where,
            "minLength" if "minLength" in node else "maxLength",
            "cannot be combined with format",
        )
    if "prefixItems" in node and ("minItems" in node or "maxItems" in node):
        raise _refuse(
            where,
            "minItems" if "minItems" in node else "maxItems",
            "cannot be combined with prefixItems",
        )
    properties = node.get("properties") or {}
    if node.get("additionalProperties", False) is False or "properties" in node:
        missing = [name for name in node.get("required", []) if name not in properties]
        if missing:
            raise _refuse(
                where, "required", f"names {missing[0]!r}, which properties does not define"
            )
    ref = node.get("$ref")
    if ref is not None and not str(ref).startswith("#/"):
        raise _refuse(where, "$ref", "only references within the schema (#/…) are followed")
    if any(k in node for k in RANGE_KEYWORDS):
        _range(node, where)  # refuses what it cannot express


def _range(node: dict[str, Any], where: str) -> list[ranges.Alternative]:
    types = node.get("type")
    types = set(types) if isinstance(types, list) else {types}
    integer = "integer" in types and "number" not in types

    def bound(key: str) -> Fraction | None:
        value = node.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _refuse(where, key, "must be a number")
        return Fraction(value)

    lo, hi = bound("minimum"), bound("maximum")
    xlo, xhi = bound("exclusiveMinimum"), bound("exclusiveMaximum")
    lo_open = xlo is not None and (lo is None or xlo >= lo)
    hi_open = xhi is not None and (hi is None or xhi <= hi)
    lo = xlo if lo_open else lo
    hi = xhi if hi_open else hi
    if integer:
        import math

        first = None if lo is None else (math.floor(lo) + 1 if lo_open else math.ceil(lo))
        last = None if hi is None else (math.ceil(hi) - 1 if hi_open else math.floor(hi))
        if first is not None and last is not None and first > last:
            raise _refuse(where, "minimum", "the range holds no integer")
        return ranges.integers(first, last)
    if (lo is not None and lo.denominator != 1) or (hi is not None and hi.denominator != 1):
        key = "minimum" if lo is not None and lo.denominator != 1 else "maximum"
        raise _refuse(
            where,
            key,
            "edgellm enforces number ranges with whole-number bounds "
            "only (use an integer bound, or an integer type)",
        )
    if lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_open or hi_open))):
        raise _refuse(where, "minimum", "the range holds no number")
    return ranges.decimals(lo, hi, lo_open, hi_open)


# a character of a JSON string: anything but a control character, " or \, or an escape
JSON_CHAR = (
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] '
    r"[0-9a-fA-F])"
)


def _converter() -> Any:
    from llama_cpp import llama_grammar

    class Converter(llama_grammar.SchemaConverter):
        def _add_primitive(self, name: str, rule: Any) -> Any:
            if name == "char":  # the converter's lets control characters through: not JSON
                rule = llama_grammar.BuiltinRule(JSON_CHAR, [])
            return super()._add_primitive(name, rule)

        def _visit_pattern(self, pattern: str, name: str) -> Any:
            # the converter's copies the pattern nearly verbatim (see pattern.py)
            return self._add_rule(name, '"\\"" ' + pattern_gbnf(pattern) + ' "\\"" space')

        def visit(self, schema: Any, name: str) -> Any:
            if not isinstance(schema, dict):
                return super().visit(schema, name)
            rule_name = name + "-" if name in llama_grammar.RESERVED_NAMES else name or "root"
            kind = schema.get("type")
            if "$ref" not in schema and ("enum" in schema or "const" in schema) and kind:
                # the converter splits a type list before it reads enum or const
                return super().visit({k: v for k, v in schema.items() if k != "type"}, name)
            if isinstance(kind, list) and not ("anyOf" in schema or "oneOf" in schema):
                # ... and drops every other keyword when it does: keep them with each type
                alternatives = [{**schema, "type": t} for t in kind]
                return self._add_rule(rule_name, self._generate_union_rule(name, alternatives))
            if kind in ("integer", "number") and any(k in schema for k in RANGE_KEYWORDS):
                rule = ranges.gbnf(_range(schema, "schema")) + " space"
                return self._add_rule(rule_name, rule)
            return super().visit(schema, name)

    return Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


_cache: OrderedDict[str, str] = OrderedDict()
_cache_lock = threading.Lock()


def schema_hash(schema: Any) -> str:
    return hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()


def to_grammar(schema: dict[str, Any], path: str = "schema") -> str:
    """The GBNF for a schema, checked (InvalidRequest naming what edgellm cannot
    hold), from the cache when it is there: a schema seen before costs a hash."""
    key = schema_hash(schema)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    check(schema, path)
    converter = _converter()
    try:
        resolved = converter.resolve_refs(copy.deepcopy(schema), "schema")
        converter.visit(resolved, "")
    except (AssertionError, ValueError, KeyError, RecursionError) as exc:
        raise InvalidRequest(f"{path} cannot be turned into a grammar: {exc}", param=path) from None
    grammar = str(converter.format_grammar())
    with _cache_lock:
        _cache[key] = grammar
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return grammar


def any_json_object() -> str:
    """The grammar of ``{"type": "json_object"}``: any JSON object."""
    return to_grammar({"type": "object"})


def validator(schema: dict[str, Any]) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema)


def answer_problem(constraint: Constraint, text: str) -> str | None:
    """Why a finished answer does not hold its constraint (None: it does). A plain
    grammar is held by the sampler alone; JSON is parsed and validated here too."""
    if constraint.schema is None and not constraint.json_object:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"it is not JSON ({exc})"
    if constraint.json_object:
        return None if isinstance(value, dict) else "it is not a JSON object"
    assert constraint.schema is not None
    return schema_problem(constraint.schema, value)


def schema_problem(schema: dict[str, Any], value: Any, what: str = "answer") -> str | None:
    """Where and why ``value`` fails ``schema`` (None: it validates)."""
    error = best_match(validator(schema).iter_errors(value))
    if error is None:
        return None
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return f"at {what}{where}: {error.message}"
