"""Sampling parity with OpenAI and llama.cpp's server, on the real model through the
openai SDK: log-probabilities in both of OpenAI's shapes, several choices from one
prompt (each exactly what a request of its own with its seed gives), and the text
endpoints /tokenize, /detokenize and /apply-template."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from conftest import MODEL, Daemon

ASK = [{"role": "user", "content": "Name three colours."}]


# --- logprobs -------------------------------------------------------------------------------
def test_chat_logprobs_streamed_and_not(daemon: Daemon) -> None:
    sdk = daemon.openai()
    args: dict[str, Any] = dict(model=MODEL, messages=ASK, max_tokens=24, temperature=0)
    r = sdk.chat.completions.create(logprobs=True, top_logprobs=3, **args)
    choice = r.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.logprob <= 0 and bytes(t.bytes or []).decode() == t.token
        assert len(t.top_logprobs) == 3
        ranked = [alt.logprob for alt in t.top_logprobs]
        assert ranked == sorted(ranked, reverse=True) and all(lp <= 0 for lp in ranked)
        # greedy takes the model's likeliest token: the first alternative is the token
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob
    streamed, tokens = [], []
    for chunk in sdk.chat.completions.create(stream=True, logprobs=True, **args):
        if chunk.choices:
            streamed.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
                tokens += chunk.choices[0].logprobs.content
    assert "".join(streamed) == choice.message.content
    assert [t.token for t in tokens] == [t.token for t in content]
    assert [t.logprob for t in tokens] == [t.logprob for t in content]
    assert all(t.top_logprobs == [] for t in tokens)  # top_logprobs left out: none
    plain = sdk.chat.completions.create(**args)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == choice.message.content  # nothing changed


def test_completion_logprobs_in_the_legacy_shape_and_at_a_stop(daemon: Daemon) -> None:
    sdk = daemon.openai()
    args: dict[str, Any] = dict(model=MODEL, prompt="The sea is", max_tokens=16, temperature=0)
    r = sdk.completions.create(logprobs=2, **args)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert lp.text_offset is not None
    text = r.choices[0].text
    assert "".join(lp.tokens) == text
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    streamed: list[str] = []
    for chunk in sdk.completions.create(stream=True, logprobs=2, **args):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.tokens or []
    assert streamed == lp.tokens
    # a stop string: the text ends before it, and the tokens listed reach no further
    # than the one that runs into it
    stop = lp.tokens[3].strip() or lp.tokens[4]
    cut = sdk.completions.create(logprobs=0, stop=[stop], **args).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert cut.logprobs is not None and cut.logprobs.tokens is not None
    joined = "".join(cut.logprobs.tokens)
    assert joined.startswith(cut.text) and len(joined) < len(cut.text) + len(stop) + 16


@pytest.mark.parametrize(
    "body,param",
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": 3}, "logprobs"),
        ({"n": 0}, "n"),
    ],
)
def test_bad_logprobs_and_n_are_refused_by_name(
    daemon: Daemon, body: dict[str, Any], param: str
) -> None:
    with daemon.http() as h:
        r = h.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# --- n --------------------------------------------------------------------------------------
def test_each_of_n_choices_is_what_its_own_request_with_its_seed_gives(daemon: Daemon) -> None:
    """The choices share the prompt's KV (copied from the first choice's slot) and
    choice i draws with seed + i: each is byte-identical to a request of its own."""
    sdk = daemon.openai()
    args: dict[str, Any] = dict(model=MODEL, messages=ASK, max_tokens=20)
    three = sdk.chat.completions.create(n=3, seed=40, **args)
    assert [c.index for c in three.choices] == [0, 1, 2]
    singles = [sdk.chat.completions.create(seed=40 + i, **args) for i in range(3)]
    alone = [r.choices[0].message.content for r in singles]
    assert [c.message.content for c in three.choices] == alone
    assert len(set(alone)) > 1  # three seeds, not one answer thrice
    assert three.usage is not None and all(r.usage is not None for r in singles)
    assert three.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert three.usage.completion_tokens == sum(r.usage.completion_tokens for r in singles)
    # streamed, the SDK's chunks reassemble per index to the same choices
    parts: dict[int, list[str]] = {0: [], 1: [], 2: []}
    finish: dict[int, str | None] = {}
    for chunk in sdk.chat.completions.create(n=3, seed=40, stream=True, **args):
        for c in chunk.choices:
            parts[c.index].append(c.delta.content or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert ["".join(parts[i]) for i in range(3)] == alone
    assert finish == {i: three.choices[i].finish_reason for i in range(3)}


def test_n_choices_each_hold_the_schema_and_n_beyond_the_slots_is_a_400(
    daemon: Daemon,
) -> None:
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["colour"],
        "additionalProperties": False,
    }
    with daemon.http() as h:
        fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
        body = {"messages": ASK, "n": 4, "seed": 2, "max_tokens": 40, "response_format": fmt}
        r = h.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        for c in r.json()["choices"]:
            assert c["finish_reason"] == "stop"
            jsonschema.validate(json.loads(c["message"]["content"]), schema)
        too_many = h.post("/v1/chat/completions", json={"messages": ASK, "n": 5})
        assert too_many.status_code == 400
        err = too_many.json()["error"]
        assert err["param"] == "n" and "at most 4" in err["message"]
        assert h.get("/health").status_code == 200


# --- the text endpoints ---------------------------------------------------------------------
def test_tokenize_detokenize_and_apply_template(daemon: Daemon) -> None:
    sdk = daemon.openai()
    with daemon.http() as h:
        text = "Hello, edge <|im_end|> world"
        tokens = h.post("/tokenize", json={"content": text}).json()["tokens"]
        assert all(isinstance(t, int) for t in tokens) and len(tokens) < len(text)
        assert h.post("/detokenize", json={"tokens": tokens}).json() == {"content": text}
        pieces = h.post("/tokenize", json={"content": text, "with_pieces": True}).json()
        assert "".join(p["piece"] for p in pieces["tokens"]) == text
        assert [p["id"] for p in pieces["tokens"]] == tokens
        assert "<|im_end|>" in [p["piece"] for p in pieces["tokens"]]  # one special token
        prompt = h.post("/apply-template", json={"messages": ASK}).json()["prompt"]
        assert prompt.endswith("<|im_start|>assistant\n") and ASK[0]["content"] in prompt
        # the template's prompt is exactly what a chat completion evaluates
        used = sdk.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1).usage
        rendered = h.post("/tokenize", json={"content": prompt, "model": MODEL}).json()
        assert used is not None and len(rendered["tokens"]) == used.prompt_tokens
        for path, body, status, param in [
            ("/detokenize", {"tokens": [10**7]}, 400, "tokens"),
            ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
            ("/tokenize", {"content": "x", "add_bos": True}, 400, "add_bos"),
            ("/tokenize", {}, 400, "content"),
            ("/apply-template", {"messages": []}, 400, "messages"),
            ("/tokenize", {"content": "x", "model": "nope"}, 404, "model"),
        ]:
            r = h.post(path, json=body)
            assert r.status_code == status and r.json()["error"]["param"] == param, r.text
        rid = h.post("/tokenize", json={"content": "audited"}).headers.get("X-Request-Id")
        rows = [r for r in h.get("/api/audit").json()["rows"] if r["request_id"] == rid]
        assert [(r["decision"], r["action"]) for r in rows] == [
            ("allow", "models.use"),
            ("outcome", "models.use"),
        ]


def test_a_model_says_what_it_can_do(daemon: Daemon) -> None:
    with daemon.http() as h:
        m = h.get(f"/api/models/{MODEL}").json()
        assert {"completion", "chat", "json_schema", "logprobs", "tokenize"} <= set(
            m["capabilities"]
        )
        # SmolLM2's template renders no tools: they reach it in edgellm's generic format
        assert "tools" in m["capabilities"] and m["tool_format"] == "generic"
        assert m["template_tools"] is False
        assert m["context_length"] == 8192 and m["n_ctx"] == 1024  # trained, and per request
