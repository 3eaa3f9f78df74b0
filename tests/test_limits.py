"""The runtime's limits, each on a daemon of its own: queue, keep-alive, eviction, fit,
shutdown, the socket file, and integrity."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

import pytest

from conftest import MODEL, Daemon, wait_for

QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]


def _stream_in_thread(
    d: Daemon, out: dict[str, Any], max_tokens: int = 4000, model: str = MODEL
) -> threading.Thread:
    def run() -> None:
        try:
            with d.client() as c:
                stream = c.chat(
                    QUESTION,
                    model=model,
                    stream=True,
                    max_tokens=max_tokens,
                    ignore_eos=True,
                    temperature=0,
                )
                out["text"] = "".join(stream)
                out["finish"] = stream.finish_reason
                out["usage"] = stream.usage
        except Exception as exc:  # recorded for the test to assert on
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_full_queue_answers_503_with_retry_after(make_daemon: Any) -> None:
    d: Daemon = make_daemon(max_queue=1, n_parallel=1)
    first: dict[str, Any] = {}
    second: dict[str, Any] = {}
    t1 = _stream_in_thread(d, first)
    with d.client() as c:
        wait_for(lambda: any(r["state"] == "running" for r in c.requests()))
        t2 = _stream_in_thread(d, second, max_tokens=5)
        wait_for(lambda: any(r["state"] == "queued" for r in c.requests()))
        with d.http() as h:
            r = h.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2})
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) >= 1
        assert "queue is full" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "queue_full"
        for req in c.requests():
            if req["state"] == "running":
                c.cancel(req["id"])
    t1.join(30)
    t2.join(30)
    assert first["finish"] == "cancelled"
    assert second["finish"] == "length" and second["usage"]["completion_tokens"] == 5
    with d.client() as c:  # and it keeps serving
        assert c.chat(QUESTION, max_tokens=2)["usage"]["completion_tokens"] == 2


def test_idle_model_is_unloaded_after_keep_alive(make_daemon: Any) -> None:
    d: Daemon = make_daemon(keep_alive="1s")
    with d.client() as c:
        c.chat(QUESTION, max_tokens=2)
        assert [m["name"] for m in c.ps()] == [MODEL]
        assert wait_for(lambda: c.ps() == [], timeout=6)
        assert c.health()["models"][MODEL] == "available"
        c.chat(QUESTION, max_tokens=2)  # and loads again on demand
        assert len(c.ps()) == 1


def test_least_recently_used_idle_model_is_evicted(make_daemon: Any) -> None:
    d: Daemon = make_daemon(
        names=("smol-a", "smol-b", "smol-c"), max_loaded_models=2, default_model="smol-a"
    )
    with d.client() as c:
        c.load("smol-a")
        c.load("smol-b")
        c.chat(QUESTION, model="smol-a", max_tokens=1)  # a is now the most recently used
        c.load("smol-c")
        assert sorted(m["name"] for m in c.ps()) == ["smol-a", "smol-c"]
        c.load("smol-b", keep_alive=-1)  # evicts a (LRU); b is pinned
        assert sorted(m["name"] for m in c.ps()) == ["smol-b", "smol-c"]
        c.load("smol-a")  # c is the only unpinned one left to evict
        assert sorted(m["name"] for m in c.ps()) == ["smol-a", "smol-b"]
    assert "event=evict model=smol-a" in d.log_text()


def test_memory_budget_evicts_then_refuses_with_the_shortfall(make_daemon: Any) -> None:
    # one model estimates at ~110 MB with n_ctx 256: a 200 MB budget holds one, not two
    d: Daemon = make_daemon(
        names=("smol-a", "smol-b"), memory_budget_mb=200, n_ctx=256, default_model="smol-a"
    )
    with d.client() as c:
        c.load("smol-a")
        c.load("smol-b")
        assert [m["name"] for m in c.ps()] == ["smol-b"]
        c.load("smol-a", keep_alive=-1)  # pinned: cannot be evicted for b
        with d.http() as h:
            r = h.post("/v1/chat/completions", json={"model": "smol-b", "messages": QUESTION})
        assert r.status_code == 503 and "Retry-After" in r.headers
        msg = r.json()["error"]["message"]
        assert "not enough memory to load smol-b" in msg and "short by" in msg
        assert "memory budget of 200 MB" in msg
        assert c.chat(QUESTION, model="smol-a", max_tokens=2)["usage"]["completion_tokens"] == 2


def test_a_model_that_cannot_fit_at_all(make_daemon: Any) -> None:
    d: Daemon = make_daemon(memory_budget_mb=50)
    with d.http() as h:
        r = h.post(f"/api/models/{MODEL}/load")
        assert r.status_code == 503
        msg = r.json()["error"]["message"]
        short = int(msg.split("short by ")[1].split(" MB")[0])
        needs = int(msg.split("needs ")[1].split(" MB")[0])
        assert needs > 90 and short == needs - 50 or short == needs - 49
        assert h.get("/health").json()["models"][MODEL] == "failed"


@pytest.mark.parametrize(
    "grace,max_tokens,finish",
    [
        ("30s", 80, "length"),  # finishes within the grace period
        ("1s", 4000, "cancelled"),  # outlasts it, and is cancelled
    ],
)
def test_sigterm_drains_in_flight_requests(
    make_daemon: Any, grace: str, max_tokens: int, finish: str
) -> None:
    d: Daemon = make_daemon(shutdown_grace=grace)
    out: dict[str, Any] = {}
    t = _stream_in_thread(d, out, max_tokens=max_tokens)
    with d.client() as c:
        wait_for(lambda: any(r["completion_tokens"] > 2 for r in c.requests()))
    assert d.stop(signal.SIGTERM) == 0
    t.join(10)
    assert out["finish"] == finish
    generated = out["usage"]["completion_tokens"]
    assert generated == max_tokens if finish == "length" else generated < max_tokens
    assert not d.socket.exists()
    assert "event=stopped" in d.log_text()


def test_stale_socket_is_replaced_and_a_live_one_respected(make_daemon: Any, tmp_path: Any) -> None:
    d: Daemon = make_daemon()
    # a second daemon on the same socket refuses, and the first keeps serving
    second = subprocess.run(
        [sys.executable, "-m", "edgellm", "serve", "--no-pull"],
        env=d.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert "already serving" in second.stderr and "Traceback" not in second.stderr
    with d.client() as c:
        assert c.health()["status"] == "ready"
    # a crash leaves the socket file behind; the next daemon replaces it
    d.stop(signal.SIGKILL)
    assert d.socket.exists()
    d.start()
    with d.client() as c:
        assert c.chat(QUESTION, max_tokens=2)["usage"]["completion_tokens"] == 2


def test_corrupted_model_is_refused_by_name_and_others_keep_serving(make_daemon: Any) -> None:
    d: Daemon = make_daemon(names=(MODEL, "smol-b"))
    from edgellm.vault.keys import read_key_file
    from edgellm.vault.store import VaultStore

    store = VaultStore(d.state_dir / "vault", read_key_file(d.key_file))
    row = store._row("smol-b")
    victim = d.state_dir / "vault" / "objects" / row["file"]
    with open(victim, "r+b") as f:  # one flipped bit in the middle of the object
        f.seek(victim.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    with d.http() as h:
        r = h.post("/v1/chat/completions", json={"model": "smol-b", "messages": QUESTION})
        assert r.status_code == 409
        msg = r.json()["error"]["message"]
        assert msg.startswith("integrity check failed for smol-b (segment ")
        assert 40 <= int(msg.split("segment ")[1].rstrip(")")) <= 55
        ok = h.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2})
        assert ok.status_code == 200


def test_gpu_settings_are_accepted_and_reported_on_a_cpu_build(make_daemon: Any) -> None:
    d: Daemon = make_daemon(n_gpu_layers=99, model_settings={MODEL: {"n_ctx": 512}})
    with d.client() as c:
        c.chat(QUESTION, max_tokens=1)
        loaded = c.ps()[0]
    assert loaded["n_gpu_layers"] == 99 and loaded["n_ctx"] == 512
    assert loaded["device"] == ("gpu" if _llama_has_gpu() else "cpu")


def _llama_has_gpu() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def test_socket_mode_is_configurable(make_daemon: Any) -> None:
    d: Daemon = make_daemon(socket_mode="0600")
    assert os.stat(d.socket).st_mode & 0o777 == 0o600
    probe = socket.socket(socket.AF_UNIX)
    probe.connect(str(d.socket))
    probe.close()
