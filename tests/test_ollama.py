"""Ollama's API under /ollama, proven with Ollama's own Python client (over the Unix
socket: it takes an httpx transport) and langchain-ollama: chat and generate,
streamed and not, format with a pydantic model's schema, a tool call, list, show,
ps, pull with progress, embed with the ONNX embedding model, delete; and the
malformed requests, each a status and a message naming the problem."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import pytest
from pydantic import BaseModel, Field

from conftest import MODEL, Daemon

EMBEDDER = "all-minilm-l6-v2"
ASK = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("ollama"), model_file).start()
    yield d
    if d.alive():
        d.stop(signal.SIGKILL)


def client(d: Daemon) -> ollama.Client:
    """As its users point it at a server, with the socket as its transport."""
    return ollama.Client(
        host="http://edgellm/ollama", transport=httpx.HTTPTransport(uds=str(d.socket))
    )


def test_chat_and_generate_streamed_and_not(served: Daemon) -> None:
    c = client(served)
    r = c.chat(model=MODEL, messages=ASK, options={"temperature": 0, "num_predict": 12})
    assert r.message.role == "assistant" and r.message.content
    assert r.done and r.done_reason in ("stop", "length")
    assert r.eval_count and r.prompt_eval_count and r.total_duration and r.eval_duration
    chunks = list(
        c.chat(
            model=f"{MODEL}:latest",
            messages=ASK,
            stream=True,
            options={"temperature": 0, "num_predict": 12},
        )
    )
    assert "".join(x.message.content or "" for x in chunks) == r.message.content
    assert chunks[-1].done and not any(x.done for x in chunks[:-1])
    g = c.generate(
        model=MODEL, prompt="Name a colour.", options={"temperature": 0, "num_predict": 12}
    )
    assert g.response == r.message.content  # the same chat template, the same greedy answer
    raw = c.generate(
        model=MODEL, prompt="Red, green and", raw=True, options={"num_predict": 4, "seed": 1}
    )
    assert raw.response and raw.done
    streamed = "".join(
        x.response
        for x in c.generate(
            model=MODEL,
            prompt="Name a colour.",
            stream=True,
            options={"temperature": 0, "num_predict": 12},
        )
    )
    assert streamed == g.response
    # logprobs, as Ollama gives them
    lp = c.chat(
        model=MODEL,
        messages=ASK,
        logprobs=True,
        top_logprobs=2,
        options={"num_predict": 3, "seed": 2},
    )
    assert lp.logprobs and len(lp.logprobs[0].top_logprobs or []) == 2


class Colour(BaseModel):
    name: str = Field(max_length=20)
    warm: bool


def test_format_with_a_pydantic_schema_returns_json_that_validates(served: Daemon) -> None:
    c = client(served)
    schema = Colour.model_json_schema()
    for seed in range(2):
        r = c.chat(
            model=MODEL, messages=ASK, format=schema, options={"seed": seed, "num_predict": 60}
        )
        Colour.model_validate_json(r.message.content or "")
        jsonschema.validate(json.loads(r.message.content or ""), schema)
    j = c.generate(
        model=MODEL,
        prompt="Give a JSON object with the key colour.",
        format="json",
        options={"temperature": 0, "num_predict": 200},
    )
    assert j.done_reason == "stop" and isinstance(json.loads(j.response), dict)


def test_a_tool_call_and_its_result(served: Daemon) -> None:
    """Ollama has no tool_choice: the model decides. Over a few seeds the default
    model calls the tool; every call it makes names it with valid arguments, and the
    result goes back as Ollama sends it (role tool, tool_name)."""

    def get_weather(city: str) -> str:
        """The weather now in a city.

        Args:
          city: The city's name
        """
        return "Sunny, 21 C"

    c = client(served)
    messages: list[Any] = [
        {"role": "user", "content": "Use get_weather: what is the weather in Oslo?"}
    ]
    called = None
    for seed in range(6):
        r = c.chat(
            model=MODEL,
            messages=messages,
            tools=[get_weather],
            options={"seed": seed, "num_predict": 60},
        )
        for call in r.message.tool_calls or []:
            assert call.function.name == "get_weather"
            assert isinstance(call.function.arguments.get("city"), str)
            called = called or r.message
        if called is not None:
            break
    assert called is not None, "no seed called the tool"
    call = (called.tool_calls or [])[0]
    messages += [
        called,
        {
            "role": "tool",
            "content": get_weather(**call.function.arguments),
            "tool_name": "get_weather",
        },
    ]
    final = c.chat(
        model=MODEL,
        messages=messages,
        tools=[get_weather],
        options={"temperature": 0, "num_predict": 40},
    )
    assert final.done


def test_list_show_ps_pull_embed_delete(served: Daemon) -> None:
    c = client(served)
    names = [m.model for m in c.list().models]
    assert f"{MODEL}:latest" in names
    shown = c.show(MODEL)
    assert (
        "completion" in (shown.capabilities or [])
        and shown.details
        and shown.details.format == "gguf"
    )
    c.generate(model=MODEL, prompt="Hi", options={"num_predict": 1})
    assert f"{MODEL}:latest" in [m.model for m in c.ps().models]
    # Ollama's way to load (and, with keep_alive 0, unload) a model: an empty prompt
    assert c.generate(model=MODEL).done_reason == "load"
    assert c.generate(model=MODEL, keep_alive=0).done_reason == "unload"
    assert c.ps().models == []
    assert c.chat(model=MODEL, messages=[]).done_reason == "load"
    # pull from edgellm's catalog, with progress
    steps = list(c.pull(EMBEDDER, stream=True))
    assert steps[0].status == "pulling manifest" and steps[-1].status == "success"
    assert any(s.completed == s.total and s.total for s in steps)
    e = c.embed(model=EMBEDDER, input=["a red apple", "a green pear"])
    assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 384
    old = c.embeddings(model=EMBEDDER, prompt="a red apple")
    assert (
        abs(sum(a * b for a, b in zip(old.embedding, e.embeddings[0], strict=True)) - 1) < 1e-2
    )  # alone or batched: padding moves the int8 model a little
    c.delete(EMBEDDER)
    assert f"{EMBEDDER}:latest" not in [m.model for m in c.list().models]
    with served.http() as h:
        v = h.get("/ollama/api/version").json()
        assert v["version"] and v["edgellm"]
        assert h.get("/ollama").text.startswith("Ollama is running")


def test_langchain_ollama_invokes_and_streams(served: Daemon) -> None:
    from langchain_ollama import ChatOllama

    chat = ChatOllama(
        model=MODEL,
        base_url="http://edgellm/ollama",
        temperature=0,
        num_predict=12,
        sync_client_kwargs={"transport": httpx.HTTPTransport(uds=str(served.socket))},
    )
    answer = chat.invoke("Name a colour.")
    assert answer.content
    streamed = "".join(str(part.content) for part in chat.stream("Name a colour."))
    assert streamed == answer.content


@pytest.mark.parametrize(
    "path,body,status,words",
    [
        (
            "/api/chat",
            {"model": MODEL, "messages": ASK, "options": {"mirostat": 1}},
            400,
            "mirostat",
        ),
        (
            "/api/chat",
            {"model": MODEL, "messages": ASK, "options": {"temperature": "hot"}},
            400,
            "temperature",
        ),
        ("/api/chat", {"model": "nope:7b", "messages": ASK}, 404, "'nope:7b' not found"),
        (
            "/api/chat",
            {"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
            400,
            "images",
        ),
        ("/api/chat", {"model": MODEL, "messages": ASK, "think": True}, 400, "think"),
        (
            "/api/chat",
            {"model": MODEL, "messages": ASK, "options": {"num_ctx": 10**6}},
            400,
            "num_ctx",
        ),
        (
            "/api/chat",
            {"model": MODEL, "messages": [{"role": "tool", "content": "x", "tool_name": "f"}]},
            400,
            "tool result",
        ),
        (
            "/api/chat",
            {"model": MODEL, "messages": ASK, "format": {"type": "object", "not": {}}},
            400,
            "not",
        ),
        ("/api/chat", {"model": MODEL, "messages": ASK, "keep": 1}, 400, "keep"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "context": [1, 2]}, 400, "context"),
        ("/api/embed", {"model": MODEL, "input": "x"}, 400, "GGUF model"),
        ("/api/copy", {"source": MODEL, "destination": "x"}, 400, "copy is not supported"),
        ("/api/show", {}, 400, "model"),
        ("/api/pull", {"model": "not-in-the-catalog"}, 404, "not-in-the-catalog"),
    ],
)
def test_malformed_requests_are_refused_by_name(
    served: Daemon, path: str, body: dict[str, Any], status: int, words: str
) -> None:
    with served.http() as h:
        r = h.post("/ollama" + path, json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert isinstance(error, str) and words in error, error  # Ollama's shape
        assert h.get("/ollama/api/tags").status_code == 200  # and it serves on


def test_the_same_audit_rows_as_every_model_use(served: Daemon) -> None:
    with served.http() as h:
        r = h.post(
            "/ollama/api/generate",
            json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}},
        )
        rid = r.headers["X-Request-Id"]
        rows = [x for x in h.get("/api/audit").json()["rows"] if x["request_id"] == rid]
    assert [(x["decision"], x["action"], x["resource"]) for x in rows] == [
        ("allow", "models.use", MODEL),
        ("outcome", "models.use", MODEL),
    ]
