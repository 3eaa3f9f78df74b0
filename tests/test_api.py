"""The socket API against a real daemon serving the real default model."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import httpx
import openai
import pytest

from conftest import MODEL, Daemon, wait_for

QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]


def chat(d: Daemon, **body: object) -> httpx.Response:
    with d.http() as h:
        return h.post("/v1/chat/completions", json={"model": MODEL, **body})


def test_greedy_answers_are_identical_across_calls(daemon: Daemon) -> None:
    answers = [
        chat(daemon, messages=QUESTION, temperature=0, max_tokens=24).json() for _ in range(3)
    ]
    texts = {a["choices"][0]["message"]["content"] for a in answers}
    assert len(texts) == 1 and len(texts.pop()) > 20
    assert answers[0]["usage"]["completion_tokens"] == 24
    assert answers[0]["choices"][0]["finish_reason"] == "length"


def test_streamed_chunks_concatenate_to_the_plain_answer(daemon: Daemon) -> None:
    plain = chat(daemon, messages=QUESTION, temperature=0, max_tokens=30).json()
    with daemon.client() as c:
        stream = c.chat(QUESTION, model=MODEL, stream=True, temperature=0, max_tokens=30)
        pieces = list(stream)
    assert len(pieces) > 5
    assert "".join(pieces) == plain["choices"][0]["message"]["content"]
    assert stream.finish_reason == "length"
    assert stream.usage == plain["usage"]


def test_sse_wire_format(daemon: Daemon) -> None:
    with (
        daemon.http() as h,
        h.stream(
            "POST",
            "/v1/chat/completions",
            json={"messages": QUESTION, "stream": True, "max_tokens": 3},
        ) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length"


def test_a_stream_accounts_for_its_first_token(daemon: Daemon) -> None:
    """The last chunk's timings say when the request reached each step; the allow row
    is durable before the first token is written (the model ran while it committed)."""
    body = {"prompt": "Hello", "max_tokens": 4, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with daemon.http() as h, h.stream("POST", "/v1/completions", json=body) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    marks = chunks[-1]["timings"]["ttft_marks_ms"]
    steps = ["received", "parsed", "submitted", "audited", "admitted", "tokenized"]
    assert set(marks) == {*steps, "first_token", "first_write"}
    assert list(marks.values()) == sorted(marks.values()) and marks["received"] == 0
    assert marks["parsed"] <= marks["submitted"] <= marks["audited"] <= marks["first_write"]
    assert marks["admitted"] <= marks["tokenized"] <= marks["first_token"] <= marks["first_write"]
    logged = daemon.log_text()
    assert "marks_ms=received:0.0," in logged and "first_write:" in logged


def test_max_tokens_and_stop_are_honoured(daemon: Daemon) -> None:
    with daemon.http() as h:
        counted = h.post(
            "/v1/completions", json={"prompt": "1, 2, 3, 4,", "max_tokens": 7, "temperature": 0}
        ).json()
        assert counted["usage"]["completion_tokens"] == 7
        assert counted["choices"][0]["finish_reason"] == "length"
        stopped = h.post(
            "/v1/completions",
            json={"prompt": "1, 2, 3, 4,", "max_tokens": 40, "temperature": 0, "stop": [" 8"]},
        ).json()
    text = stopped["choices"][0]["text"]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert text.startswith(" 5, 6, 7,") and "8" not in text


def test_seeded_sampling_is_reproducible(daemon: Daemon) -> None:
    body = {"messages": QUESTION, "temperature": 1.0, "seed": 42, "max_tokens": 20}
    a, b = (chat(daemon, **body).json()["choices"][0]["message"]["content"] for _ in range(2))
    assert a == b


def test_openai_sdk_works_over_the_socket(daemon: Daemon) -> None:
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)))
    sdk = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)
    assert MODEL in [m.id for m in sdk.models.list()]
    r = sdk.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    assert r.usage.completion_tokens == 12 and r.choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in sdk.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == r.choices[0].message.content
    done = sdk.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert "Paris" in done.choices[0].text
    with pytest.raises(openai.NotFoundError, match="not found"):
        sdk.chat.completions.create(model="no-such-model", messages=QUESTION)


def test_curl_works_over_the_socket(daemon: Daemon) -> None:
    out = subprocess.run(
        [
            "curl",
            "-s",
            "--unix-socket",
            str(daemon.socket),
            "http://localhost/v1/chat/completions",
            "-d",
            json.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 5}),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out)["usage"]["completion_tokens"] == 5


def test_native_endpoints(daemon: Daemon) -> None:
    with daemon.http() as h:
        chat(daemon, messages=QUESTION, max_tokens=2)
        health = h.get("/health").json()
        assert health["status"] == "ready" and health["models"][MODEL] == "loaded"
        ps = h.get("/api/ps").json()["models"]
        assert ps[0]["name"] == MODEL and ps[0]["slots"] == 4 and ps[0]["device"] == "cpu"
        assert ps[0]["memory_mb"] > 90 and ps[0]["expires_in_seconds"] <= 300
        models = h.get("/api/models").json()["models"]
        assert models[0]["quantization"] == "Q4_1" and models[0]["context_length"] == 8192
        assert h.get(f"/api/models/{MODEL}").json()["architecture"] == "llama"
        assert h.get("/api/requests").json() == {"requests": []}
        listed = h.get("/v1/models").json()
        assert listed["object"] == "list" and listed["data"][0]["id"] == MODEL


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_count_tokens_and_requests(daemon: Daemon) -> None:
    with daemon.client() as c:
        before = c.metrics()
        c.chat(QUESTION, max_tokens=9, temperature=0)
        after = c.metrics()
    assert (
        _metric(after, "llamacpp:tokens_predicted_total")
        - _metric(before, "llamacpp:tokens_predicted_total")
        == 9
    )
    assert _metric(after, "llamacpp:prompt_tokens_total") >= _metric(
        before, "llamacpp:prompt_tokens_total"
    )
    assert _metric(after, "llamacpp:tokens_predicted_seconds_total") > 0
    assert 'edgellm_requests_total{route="/v1/chat/completions",status="200"}' in after
    assert _metric(after, "edgellm_loaded_models") == 1


MALFORMED = [
    # (body, status, words the message must contain)
    (b"{", 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"messages": []}', 400, "'messages'"),
    (b'{"model": "x"}', 400, "missing required field 'messages'"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "'messages.0.role'"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "lots"}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ""}', 400, "stop"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 65}', 400, "'n'"),
    (
        b'{"messages": [{"role": "user", "content": "hi"}], "bogus": 1}',
        400,
        "unknown field 'bogus'",
    ),
    (b'{"messages": [{"role": "user", "content": "hi"}], "keep_alive": "soon"}', 400, "keep_alive"),
    (
        b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}',
        404,
        "model 'nope' not found",
    ),
]


@pytest.mark.parametrize("body,status,words", MALFORMED)
def test_malformed_requests_get_a_clear_error(
    daemon: Daemon, body: bytes, status: int, words: str
) -> None:
    with daemon.http() as h:
        r = h.post(
            "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
    assert r.status_code == status
    err = r.json()["error"]
    assert words in err["message"]
    assert set(err) == {"message", "type", "code", "param"}


def test_every_unknown_field_is_named_and_each_refusal_is_logged(daemon: Daemon) -> None:
    secret = "my-bank-pin-is-4321"
    body = {
        "messages": [{"role": "user", "content": secret}],
        "temprature": 0.2,  # the typos a client sends, all named in one go
        "max_tokns": 9,
    }
    with daemon.http() as h:
        r = h.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert message == "unknown fields 'temprature', 'max_tokns'"
    logged = wait_for(
        lambda: [
            line
            for line in daemon.log_text().splitlines()
            if "event=refused" in line and "temprature" in line
        ],
        timeout=5,
    )
    assert "status=400 method=POST path=/v1/chat/completions param=temprature" in logged[-1]
    assert secret not in daemon.log_text()  # names and reasons, never the content
    assert daemon.alive()


def test_other_bad_requests(daemon: Daemon) -> None:
    with daemon.http() as h:
        big = h.post("/v1/chat/completions", content=b"x" * (1024 * 1024 + 10))
        assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
        assert h.get("/v2/nothing").status_code == 404
        wrong = h.get("/v1/chat/completions")
        assert wrong.status_code == 405 and "not allowed" in wrong.json()["error"]["message"]
        unknown = h.delete("/api/requests/req-nope")
        assert unknown.status_code == 404 and "req-nope" in unknown.json()["error"]["message"]
        long_prompt = h.post("/v1/completions", json={"prompt": "hello " * 1500, "max_tokens": 4})
        assert long_prompt.status_code == 400
        msg = long_prompt.json()["error"]["message"]
        assert "1500" in msg.replace("1501", "1500") and "1024" in msg
        assert h.post(f"/api/models/{MODEL}/load", content=b"{").status_code == 400
        assert h.post("/api/models/ghost/load").status_code == 404
    # and after all that, it still serves
    assert chat(daemon, messages=QUESTION, max_tokens=3).status_code == 200
    assert daemon.alive()


def _start_long_stream(d: Daemon, result: dict[str, object], max_tokens: int = 3000) -> None:
    def run() -> None:
        with d.client() as c:
            stream = c.chat(QUESTION, stream=True, max_tokens=max_tokens, ignore_eos=True)
            result["text"] = "".join(stream)
            result["finish"] = stream.finish_reason
            result["usage"] = stream.usage

    t = threading.Thread(target=run, daemon=True)
    t.start()
    result["thread"] = t


def _busy_slots(d: Daemon) -> int:
    with d.client() as c:
        return sum(m["slots_busy"] for m in c.ps())


def test_cancel_by_id_frees_the_slot(daemon: Daemon) -> None:
    result: dict[str, object] = {}
    _start_long_stream(daemon, result)
    with daemon.client() as c:
        running = wait_for(
            lambda: [
                r for r in c.requests() if r["state"] == "running" and r["completion_tokens"] > 0
            ]
        )
        assert running[0]["model"] == MODEL and running[0]["pid"] > 0
        c.cancel(running[0]["id"])
    result["thread"].join(30)  # type: ignore[attr-defined]
    assert result["finish"] == "cancelled"
    assert result["usage"]["completion_tokens"] < 3000  # type: ignore[index]
    assert _busy_slots(daemon) == 0


def test_disconnect_mid_stream_frees_the_slot(daemon: Daemon) -> None:
    with daemon.client() as c:
        before = _metric(c.metrics(), "llamacpp:tokens_predicted_total")
        stream = c.chat(QUESTION, stream=True, max_tokens=3000, ignore_eos=True)
        for i, _ in enumerate(stream):
            if i == 5:
                break
        stream.close()
        assert wait_for(lambda: _busy_slots(daemon) == 0 and not c.requests(), timeout=10)
        generated = _metric(c.metrics(), "llamacpp:tokens_predicted_total") - before
    assert 5 <= generated < 1000
    assert chat(daemon, messages=QUESTION, max_tokens=2).status_code == 200


def test_request_timeout_ends_generation(daemon: Daemon) -> None:
    r = chat(daemon, messages=QUESTION, max_tokens=3000, ignore_eos=True, timeout=0.5)
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "deadline"
    assert 0 < body["usage"]["completion_tokens"] < 3000


def test_load_unload_and_keep_alive_zero(daemon: Daemon) -> None:
    with daemon.client() as c:
        assert c.unload(MODEL)["unloaded"] is True
        assert c.ps() == []
        assert c.load(MODEL, keep_alive="-1")["pinned"] is True
        assert c.ps()[0]["expires_in_seconds"] is None
        c.chat(QUESTION, max_tokens=2, keep_alive=0)
        assert wait_for(lambda: c.ps() == [], timeout=5)
        c.chat(QUESTION, max_tokens=2, keep_alive="5m")  # loads on demand again
        assert c.ps()[0]["keep_alive_seconds"] == 300


def test_unload_of_a_busy_model_conflicts(daemon: Daemon) -> None:
    result: dict[str, object] = {}
    _start_long_stream(daemon, result)
    with daemon.client() as c:
        wait_for(lambda: _busy_slots(daemon) == 1)
        with daemon.http() as h:
            r = h.post(f"/api/models/{MODEL}/unload")
        assert r.status_code == 409 and "serving requests" in r.json()["error"]["message"]
        for req in c.requests():
            c.cancel(req["id"])
    result["thread"].join(30)  # type: ignore[attr-defined]
    assert result["finish"] == "cancelled"


def test_import_and_remove_through_the_socket(daemon: Daemon, model_file, tmp_path) -> None:
    with daemon.client() as c:
        c.import_model("smol-copy", model_file)
        assert {m["name"] for m in c.models()} == {MODEL, "smol-copy"}
        answer = c.chat(QUESTION, model="smol-copy", max_tokens=3)
        assert answer["model"] == "smol-copy" and answer["usage"]["completion_tokens"] == 3
        c.remove_model("smol-copy")
        assert [m["name"] for m in c.models()] == [MODEL]
        junk = tmp_path / "junk.gguf"
        junk.write_bytes(b"definitely not a model" * 100)
        with daemon.http() as h:
            r = h.put("/api/models/junk", content=junk.read_bytes())
            assert r.status_code == 400 and "not a valid GGUF" in r.json()["error"]["message"]
            bad = h.put("/api/models/Bad Name", content=b"x")
            assert bad.status_code == 400 and "invalid model name" in bad.json()["error"]["message"]
        assert [m["name"] for m in c.models()] == [MODEL]
    leftovers = list((daemon.state_dir / "vault" / "objects").glob(".tmp-*"))
    assert leftovers == []


def test_socket_is_created_with_mode_0660(daemon: Daemon) -> None:
    assert daemon.socket.stat().st_mode & 0o777 == 0o660


def test_request_ids_are_returned(daemon: Daemon) -> None:
    r = chat(daemon, messages=QUESTION, max_tokens=1)
    assert r.headers["X-Request-Id"].startswith("req-")
    assert r.json()["id"] == "chatcmpl-" + r.headers["X-Request-Id"]
    time.sleep(0)  # ids are unique per daemon
    assert (
        chat(daemon, messages=QUESTION, max_tokens=1).headers["X-Request-Id"]
        != r.headers["X-Request-Id"]
    )


def test_requests_for_a_loading_model_wait_for_one_load(daemon: Daemon) -> None:
    with daemon.client() as c:
        c.unload(MODEL)
        loads_before = _metric(c.metrics(), "edgellm_model_loads_total")
    results: list[int] = []

    def ask() -> None:
        results.append(chat(daemon, messages=QUESTION, max_tokens=2).status_code)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200, 200, 200]
    with daemon.client() as c:
        assert _metric(c.metrics(), "edgellm_model_loads_total") == loads_before + 1
