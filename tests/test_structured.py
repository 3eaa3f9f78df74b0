"""Structured output: JSON Schema (OpenAI's json_schema, llama.cpp's json_object with
a schema, plain json_object) and GBNF grammars constrain decoding token by token, so
every answer parses and validates, whatever the model. Numeric ranges are enforced
by rules of our own (checked here against Python's comparisons), keywords that
cannot be enforced are refused by name, and the real model answers through the
openai SDK's parse()."""

from __future__ import annotations

import itertools
import json
import re
import threading
from enum import StrEnum
from fractions import Fraction
from typing import Any, Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from edgellm.errors import InvalidRequest
from edgellm.runtime.llama import ranges, schema_grammar
from edgellm.runtime.types import GenerationRequest

from conftest import MODEL, Daemon, alone_and_beside, in_threads

ASK = [{"role": "user", "content": "Describe a small order from a shop as JSON."}]


# --- ranges, against Python's own comparisons --------------------------------------------
BOUNDS = [None, -1000, -101, -100, -99, -17, -10, -9, -1, 0, 1, 3, 9, 10, 17, 99, 100, 101, 342]


def test_integer_ranges_hold_exactly_the_integers_in_them() -> None:
    values = [*range(-1300, 1300), 99999, -99999, 10**15, -(10**15)]
    for lo, hi in itertools.product(BOUNDS, BOUNDS):
        if lo is not None and hi is not None and lo > hi:
            continue
        pattern = re.compile(ranges.regex(ranges.integers(lo, hi)))
        for v in values:
            inside = (lo is None or v >= lo) and (hi is None or v <= hi)
            assert bool(pattern.fullmatch(str(v))) == inside, (lo, hi, v)
        for form in ("-0", "00", "01", "-01", "+1", "1.0"):  # never JSON's other spellings
            assert not pattern.fullmatch(form), (lo, hi, form)


def test_decimal_ranges_hold_exactly_the_numbers_in_them() -> None:
    texts = {f"{i}{f}" for i in range(-120, 121) for f in ("", ".0", ".5", ".05", ".999", ".001")}
    for lo, hi in itertools.product([None, -100, -10, -1, 0, 1, 10, 17, 100], repeat=2):
        for lo_open, hi_open in itertools.product([False, True], repeat=2):
            if (
                lo is not None
                and hi is not None
                and (lo > hi or (lo == hi and (lo_open or hi_open)))
            ):
                continue
            a, b = (None if x is None else Fraction(x) for x in (lo, hi))
            pattern = re.compile(ranges.regex(ranges.decimals(a, b, lo_open, hi_open)))
            for text in texts:
                v = Fraction(text)
                if text.startswith("-") and v == 0:
                    continue  # "-0…" is never produced, either way
                above = lo is None or (v > lo if lo_open else v >= lo)
                below = hi is None or (v < hi if hi_open else v <= hi)
                assert bool(pattern.fullmatch(text)) == (above and below), (lo, hi, text)


# --- patterns: every string the grammar allows is JSON that matches -------------------------
def _gbnf_regex(gbnf: str) -> re.Pattern[str]:
    """pattern.py's GBNF as a Python regex over the JSON text between the quotes (it
    uses literals, classes in \\u escapes, groups, | and quantifiers, which Python
    writes the same way, but for the literals' quoting)."""
    out, i = [], 0
    while i < len(gbnf):
        char = gbnf[i]
        if char == '"':
            end = i + 1
            while gbnf[end] != '"':
                end += 2 if gbnf[end] == "\\" else 1
            text = re.sub(r"\\(.)", r"\1", gbnf[i + 1 : end])
            out.append(re.escape(text))
            i = end + 1
        elif char == "[":
            end = gbnf.index("]", i)
            out.append(gbnf[i : end + 1])
            i = end + 1
        else:
            out.append("" if char == " " else char)
            i += 1
    return re.compile("".join(out))


PATTERNS = [
    (r"^\d{3}-\d{4}$", ["123-4567", "000-0000"]),
    (r'^[a-z"\\]{1,6}$', ["ab", 'a"b', "a\\b"]),
    (r"^.{1,8}$", ["hello", "a b c", "\u00e9t\u00e9"]),
    (r"^[^,]{1,6}\s\w{1,4}$", ["ab cd", "x\ty_1"]),
    (r"^(ab|c)+x?$", ["ab", "cabx", "ccc"]),
    (r"^\w+@\w+\.com$", ["a@b.com"]),
    (r"^[\d.,-]+$", ["1,234.5", "-1"]),
    (r"^\t\n\\\.$", ["\t\n\\."]),
    (r"^a{2,}?b{0,3}$", ["aa", "aaab"]),
    (r"^\D\W\S$", ["a b", "x!y"]),
]
PROBES = ['a"b', "a\\b", "a\nb", "\x01", "ab,cd", " x", "123-456", "\u00e9", "x" * 9, ""]


@pytest.mark.parametrize("pattern,examples", PATTERNS, ids=[p for p, _ in PATTERNS])
def test_a_patterns_grammar_gives_only_json_strings_that_match(
    pattern: str, examples: list[str]
) -> None:
    from edgellm.runtime.llama.pattern import to_gbnf

    allowed = _gbnf_regex(to_gbnf(pattern))
    for text in examples:  # what it is for: these are allowed, written as JSON writes them
        assert re.fullmatch(pattern, text)
        assert allowed.fullmatch(json.dumps(text, ensure_ascii=False)[1:-1]), (pattern, text)
    for text in examples + PROBES:
        for written in {json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1], text}:
            if allowed.fullmatch(written):  # what the grammar lets through parses and matches
                value = json.loads(f'"{written}"')
                assert re.fullmatch(pattern, value), (pattern, written)


# --- what is refused, by name -----------------------------------------------------------
REFUSED = [
    ({"type": "integer", "multipleOf": 3}, "schema.multipleOf"),
    ({"not": {"type": "string"}}, "schema.not"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "schema.uniqueItems"),
    (
        {"type": "object", "properties": {"a": {"type": "string", "format": "email"}}},
        "schema.properties.a.format",
    ),
    ({"type": "number", "minimum": 0.5}, "schema.minimum"),
    ({"type": "string", "pattern": "abc"}, "schema.pattern"),
    ({"type": "string", "pattern": "^(?=a)b$"}, "schema.pattern"),
    ({"type": "string", "pattern": "^a\\bc$"}, "schema.pattern"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "schema.maxLength"),
    ({"type": "object", "properties": {}, "required": ["x"]}, "schema.required"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "schema.patternProperties"),
    ({"$ref": "https://example.com/s.json"}, "schema.$ref"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "schema.minimum"),
    ({"type": "nope"}, "schema"),
    ([1, 2], "schema"),
]


@pytest.mark.parametrize("schema,param", REFUSED, ids=[p for _, p in REFUSED])
def test_what_the_grammar_cannot_hold_is_refused_by_name(schema: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        schema_grammar.check(schema, "schema")
    assert refused.value.param == param and refused.value.message


# --- the real model through the socket ----------------------------------------------------
class Line(BaseModel):
    item: Literal["apple", "pear", "plum"]
    quantity: int = Field(ge=1, le=12)
    price: float = Field(ge=0, le=100)


class City(BaseModel):
    name: str
    country: str


class Order(BaseModel):
    customer: str = Field(max_length=24)
    lines: list[Line] = Field(min_length=1, max_length=3)
    rush: bool
    note: str | None = Field(default=None, max_length=16)


def test_the_openai_sdks_parse_returns_a_validated_object(daemon: Daemon) -> None:
    sdk = daemon.openai()
    schema = Order.model_json_schema()
    for seed in (1, 2, 3):
        done = sdk.chat.completions.parse(
            model=MODEL, messages=ASK, response_format=Order, seed=seed, max_tokens=400
        )
        choice = done.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        order = choice.message.parsed
        assert isinstance(order, Order) and 1 <= len(order.lines) <= 3
        jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_json_object_and_llama_cpps_schema_shape(daemon: Daemon) -> None:
    sdk = daemon.openai()
    anything = sdk.chat.completions.create(
        model=MODEL, messages=ASK, response_format={"type": "json_object"}, seed=4, max_tokens=300
    )
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content or ""), dict)
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "enum": ["yes", "no"]},
            "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["answer", "confidence"],
    }
    with daemon.http() as h:
        body = {
            "messages": ASK,
            "seed": 5,
            "max_tokens": 60,
            "response_format": {"type": "json_object", "schema": schema},
        }
        r = h.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)


def test_a_grammar_constrains_both_endpoints_and_a_bad_one_is_a_400(daemon: Daemon) -> None:
    grammar = 'root ::= "yes" | "no" | "maybe"'
    with daemon.http() as h:
        for path, body in [
            ("/v1/completions", {"prompt": "Is the sky blue? Answer:"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Sky blue?"}]}),
        ]:
            for seed in (1, 2):
                r = h.post(path, json={**body, "grammar": grammar, "seed": seed, "max_tokens": 8})
                assert r.status_code == 200, r.text
                choice = r.json()["choices"][0]
                text = choice.get("text", (choice.get("message") or {}).get("content"))
                assert text in ("yes", "no", "maybe") and choice["finish_reason"] == "stop"
        bad = h.post(
            "/v1/completions", json={"prompt": "x", "grammar": "root ::= (", "max_tokens": 4}
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "grammar"
        assert "grammar does not compile" in bad.json()["error"]["message"]
        for fmt, param in [
            (
                {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "integer", "multipleOf": 2}},
                },
                "response_format.json_schema.schema.multipleOf",
            ),
            ({"type": "json_object", "schema": {"type": "nope"}}, "response_format.schema"),
            ({"type": "json_schema"}, "response_format.json_schema"),
        ]:
            r = h.post("/v1/chat/completions", json={"messages": ASK, "response_format": fmt})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        both = {"messages": ASK, "grammar": grammar, "response_format": {"type": "json_object"}}
        assert h.post("/v1/chat/completions", json=both).status_code == 400
        assert h.get("/health").json()["status"] == "ready"  # and it goes on serving


def test_running_out_of_tokens_mid_object_says_length(daemon: Daemon) -> None:
    with daemon.http() as h:
        body = {
            "messages": ASK,
            "max_tokens": 5,
            "seed": 1,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "order", "schema": Order.model_json_schema()},
            },
        }
        r = h.post("/v1/chat/completions", json=body).json()
        assert r["choices"][0]["finish_reason"] == "length"
        assert r["choices"][0]["message"]["content"].startswith("{")


class Reading(BaseModel):
    sensor: Literal["temp", "humidity"]
    value: float = Field(ge=-40, le=85)
    ok: bool
    note: str | None = Field(default=None, max_length=10)


class Item(BaseModel):
    sku: str = Field(pattern=r"^[A-Z]{2}[0-9]{3}$")
    count: int = Field(ge=0, le=500)


class Inventory(BaseModel):
    items: list[Item] = Field(min_length=1, max_length=2)


class Colour(StrEnum):
    red = "red"
    amber = "amber"
    green = "green"


class Light(BaseModel):
    colour: Colour
    seconds: int = Field(gt=0, lt=60)


SCHEMAS: list[dict[str, Any]] = [
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    {"type": "boolean"},
    {"type": "string", "enum": ["red", "green", "blue"]},
    {"type": "string", "maxLength": 8},
    {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
    {"type": "string", "format": "date"},
    {
        "type": "array",
        "items": {"type": "integer", "minimum": 10, "maximum": 20},
        "minItems": 2,
        "maxItems": 4,
    },
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": ["string", "null"], "maxLength": 5}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    {"anyOf": [{"type": "integer", "minimum": 100}, {"type": "string", "maxLength": 4}]},
    {
        "$defs": {
            "p": {
                "type": "object",
                "properties": {"x": {"type": "integer", "maximum": -1}},
                "required": ["x"],
            }
        },
        "type": "array",
        "items": {"$ref": "#/$defs/p"},
        "maxItems": 2,
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"const": "t"}, "maxItems": 2}},
        "required": ["tags"],
    },
    Line.model_json_schema(),
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["name", "age"],
            }
        },
        "required": ["user"],
    },
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 6}},
        "required": ["a"],
    },
    {"oneOf": [{"type": "boolean"}, {"type": "integer", "minimum": 5, "maximum": 9}]},
    {
        "type": "object",
        "properties": {
            "kind": {"const": "point"},
            "x": {"type": "integer", "minimum": -50, "maximum": 50},
        },
        "required": ["kind", "x"],
    },
    {"type": "number", "minimum": -10, "maximum": 10},
    {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
    {"type": "string", "minLength": 3, "maxLength": 6},
    {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
    {"type": "string", "format": "date-time"},
    {"type": "string", "format": "uuid"},
    {"enum": [1, "two", None, True]},
    {"type": "null"},
    {
        "type": "array",
        "items": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "maxItems": 3,
        },
        "maxItems": 3,
    },
    {
        "$defs": {"c": {"type": "string", "enum": ["x", "y"]}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/c"}, "b": {"$ref": "#/$defs/c"}},
        "required": ["a", "b"],
    },
    {
        "type": "array",
        "prefixItems": [
            {"type": "string", "maxLength": 4},
            {"type": "integer", "minimum": 1, "maximum": 3},
        ],
        "items": False,
    },
    {
        "anyOf": [
            {
                "type": "object",
                "properties": {"cat": {"type": "string", "maxLength": 8}},
                "required": ["cat"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"dog": {"type": "integer", "maximum": 20, "minimum": 0}},
                "required": ["dog"],
                "additionalProperties": False,
            },
        ]
    },
    # patterns through edgellm's own translation (the converter's let \d, " and
    # control characters through as they stand: answers that were not JSON)
    {"type": "string", "pattern": r"^\d{3}-\d{4}$"},
    {"type": "string", "pattern": r'^[a-z"\\]{1,6}$'},
    {"type": "string", "pattern": r"^.{1,8}$"},
    {"type": "string", "pattern": r"^[^,]{1,6}\s\w{1,4}$"},
    Reading.model_json_schema(),
    Inventory.model_json_schema(),
    Light.model_json_schema(),
]


def test_every_answer_validates_across_schemas_and_seeds(wide_daemon: Daemon) -> None:
    """Each schema under three seeds, as n=3 choices (seeds s, s+1, s+2), every other
    schema streamed; two requests at a time in the daemon's six slots."""
    assert len(SCHEMAS) >= 30
    failures: list[str] = []
    checked = 0
    lock = threading.Lock()

    def ask(chunk: list[int]) -> None:
        nonlocal checked
        sdk = wide_daemon.openai()
        for i in chunk:
            fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i]}}
            args = dict(model=MODEL, messages=ASK, max_tokens=200, response_format=fmt)
            answers: list[tuple[int, str, str | None]] = []
            if i % 2:
                pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
                finish: dict[int, str | None] = {}
                for c in sdk.chat.completions.create(stream=True, n=3, seed=3 * i, **args):
                    for choice in c.choices:
                        pieces[choice.index].append(choice.delta.content or "")
                        finish[choice.index] = choice.finish_reason or finish.get(choice.index)
                answers += [(3 * i + k, "".join(pieces[k]), finish.get(k)) for k in range(3)]
            else:
                r = sdk.chat.completions.create(n=3, seed=3 * i, **args)
                answers += [
                    (3 * i + c.index, c.message.content or "", c.finish_reason) for c in r.choices
                ]
            for seed, text, reason in answers:
                problem = None
                if reason != "stop":
                    problem = f"finished with {reason}"
                else:
                    try:
                        jsonschema.validate(json.loads(text), SCHEMAS[i])
                    except (ValueError, jsonschema.ValidationError) as exc:
                        problem = str(exc).splitlines()[0]
                with lock:
                    checked += 1
                    if problem:
                        failures.append(f"schema {i} seed {seed}: {problem}: {text!r}")

    failures += in_threads(ask, len(SCHEMAS), 2)
    assert failures == [] and checked == 3 * len(SCHEMAS)


def test_constrained_greedy_output_is_the_same_alone_and_beside_others(daemon: Daemon) -> None:
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "order", "schema": Order.model_json_schema()},
    }
    mine = {"messages": ASK, "temperature": 0, "max_tokens": 300, "response_format": fmt}
    neighbours = [
        {"messages": ASK, "temperature": 0.9, "seed": 3, "max_tokens": 120},
        {
            "messages": ASK,
            "seed": 4,
            "max_tokens": 120,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "line", "schema": Line.model_json_schema()},
            },
        },
        {
            "prompt": "Once upon a time",
            "seed": 5,
            "max_tokens": 120,
            "grammar": 'root ::= [a-z ]+ "."',
        },
    ]

    def ask(body: dict[str, Any]) -> str:
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        with daemon.http() as h:
            choice = h.post(path, json=body).json()["choices"][0]
            return str(choice.get("text") or choice["message"]["content"])

    alone, together, _ = alone_and_beside(ask, mine, neighbours)
    assert together == alone
    json.loads(alone)  # and it is the JSON it was made to be


def test_langchain_and_instructor_get_validated_objects(daemon: Daemon) -> None:
    """Two clients nobody here wrote, as their users call them."""
    import instructor

    chat = daemon.langchain(max_tokens=400, seed=1)
    line = chat.with_structured_output(Line, method="json_schema").invoke(
        "One line of a fruit order, as JSON."
    )
    assert isinstance(line, Line) and 1 <= line.quantity <= 12
    # instructor's JSON_SCHEMA mode sends llama.cpp's shape (json_object with a schema)
    client = instructor.from_openai(daemon.openai(), mode=instructor.Mode.JSON_SCHEMA)
    order = client.chat.completions.create(
        model=MODEL, messages=ASK, response_model=Order, max_tokens=400, seed=2, max_retries=0
    )
    assert isinstance(order, Order) and 1 <= len(order.lines) <= 3
    # JSON mode: instructor puts the schema in the system prompt and asks for
    # json_object; the grammar holds the JSON, the model (greedy) fills in the fields
    json_mode = instructor.from_openai(daemon.openai(), mode=instructor.Mode.JSON)
    paris = "Paris is a city in France. Give the city and its country as JSON."
    city = json_mode.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": paris}],
        response_model=City,
        max_tokens=100,
        temperature=0,
        max_retries=0,
    )
    assert isinstance(city, City) and city.name == "Paris"


# --- sampling parity ------------------------------------------------------------------------
def _complete(d: Daemon, **body: Any) -> httpx.Response:
    with d.http() as h:
        return h.post("/v1/completions", json={"temperature": 0, "max_tokens": 40, **body})


def test_logit_bias_bans_tokens_and_penalties_change_greedy_output(
    daemon: Daemon, model_file: Any
) -> None:
    from llama_cpp import Llama

    vocab = Llama(str(model_file), vocab_only=True, verbose=False)
    with_e = [
        t
        for t in range(vocab.n_vocab())
        if "e" in vocab.detokenize([t]).decode("utf-8", "replace").lower()
    ]
    prompt = "Here are three sentences about the sea:"
    free = _complete(daemon, prompt=prompt).json()["choices"][0]["text"]
    assert "e" in free.lower()
    banned = _complete(daemon, prompt=prompt, logit_bias={str(t): -100 for t in with_e})
    assert banned.status_code == 200, banned.text
    text = banned.json()["choices"][0]["text"]
    assert text and "e" not in text.lower()  # no token holding an e was ever chosen
    loop = "the cat the cat the cat the cat the cat"
    plain = _complete(daemon, prompt=loop).json()["choices"][0]["text"]
    for field in ("frequency_penalty", "presence_penalty"):
        penalised = _complete(daemon, prompt=loop, **{field: 2.0}).json()["choices"][0]["text"]
        assert penalised != plain, field
    for body, param in [
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"logit_bias": {"999999999": -100}}, "logit_bias"),
        ({"store": True}, "store"),
    ]:
        r = _complete(daemon, prompt="x", **body)
        assert r.status_code == 400 and param in r.json()["error"]["message"], (body, r.text)


def test_fields_that_change_nothing_are_taken(daemon: Daemon) -> None:
    sdk = daemon.openai()
    r = sdk.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=4,
        temperature=0,
        user="u1",
        store=False,
        metadata={"team": "edge"},
        service_tier="auto",
        parallel_tool_calls=False,
    )
    plain = sdk.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0)
    assert r.choices[0].message.content == plain.choices[0].message.content


# --- the grammar sampler's shortcuts change no greedy token ---------------------------------
def test_greedy_under_a_grammar_is_greedy_over_what_the_grammar_allows(
    model_file: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sampler checks the chain's pick, then a shortlist, before the whole
    vocabulary (grammar_sampler.py). Against the plain way — the grammar filters
    every candidate, then greedy — the answers are the same, token for token."""
    from llama_cpp._internals import LlamaSampler

    from edgellm.config import ModelSettings
    from edgellm.runtime.llama import backend, grammar_sampler
    from edgellm.runtime.llama.engine import LlamaEngine
    from edgellm.runtime.source import ModelRecord
    from edgellm.runtime.types import Constraint, Finished, Sampling

    used: list[dict[str, int]] = []
    close = grammar_sampler.GrammarSampler.close

    def counted(self: grammar_sampler.GrammarSampler) -> None:
        used.append(dict(self.steps))
        close(self)

    monkeypatch.setattr(grammar_sampler.GrammarSampler, "close", counted)

    def plain(
        self: Any, p: Sampling, seed: int, grammar: str | None = None, *_: Any, **kw: Any
    ) -> Any:
        chain = LlamaSampler()
        g = self._c.llama_sampler_init_grammar(self.vocab, (grammar or "").encode(), b"root")
        self._c.llama_sampler_chain_add(chain.sampler, g)
        chain.add_greedy()
        return chain

    record = ModelRecord(name=MODEL, format="gguf", sha256="", size=0, context_length=8192)
    engine = LlamaEngine(record, str(model_file), ModelSettings(n_ctx=1024, n_parallel=1))
    engine.start()

    def answer(schema: dict[str, Any]) -> str:
        done = threading.Event()
        parts: list[str] = []

        def sink(event: Any) -> None:
            if isinstance(event, Finished):
                done.set()
            elif hasattr(event, "text"):
                parts.append(event.text)

        grammar = schema_grammar.to_grammar(schema)
        engine.submit(
            GenerationRequest(
                model=MODEL,
                messages=ASK,
                max_tokens=160,
                sampling=Sampling(temperature=0),
                constraint=Constraint(grammar, schema),
                sink=sink,
            )
        )
        assert done.wait(120)
        return "".join(parts)

    schemas = [Order.model_json_schema()]
    try:
        shortcut = [answer(s) for s in schemas]
        with monkeypatch.context() as m:
            m.setattr(backend.LlamaBackend, "sampler", plain)
            reference = [answer(s) for s in schemas]
    finally:
        engine.stop()
    assert shortcut == reference
    assert sum(u["first"] for u in used) and sum(u["shortlist"] for u in used)
