"""The stability watch: a stuck engine and a dead one, recovered on a real daemon with
real inference (the fault injected at the decode call by a failpoint), the back-off
after repeated failures, and memory growth reported as a suspected leak."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from edgellm.config import GovernorSettings
from edgellm.errors import ModelBackingOff
from edgellm.governor.watch import StabilityWatch
from edgellm.runtime.failures import FailureBook

from conftest import MODEL, Daemon, wait_for

ASK = {
    "messages": [{"role": "user", "content": "Count to fifty."}],
    "max_tokens": 40,
    "temperature": 0,
}


def _ask(h: Any, model: str = MODEL) -> Any:
    return h.post("/v1/chat/completions", json={**ASK, "model": model})


def test_a_stuck_engine_is_recovered_while_other_models_keep_serving(make_daemon: Any) -> None:
    # the 11th decode step of the process hangs inside the decode call, for good
    d: Daemon = make_daemon(
        names=(MODEL, "smol-b"),
        preload=[MODEL],
        max_loaded_models=2,
        env={"EDGELLM_FAILPOINTS": "engine.decode=hang@10"},
        governor={"poll_interval": "100ms", "stuck_after": "1s"},
    )
    with d.http() as h:
        results: dict[int, Any] = {}

        def ask(i: int) -> None:
            with d.http() as c:
                results[i] = _ask(c)

        clients = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(30)
        for i in range(2):  # both were in slots of the stuck engine
            r = results[i]
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "engine_failed"
            assert error["message"] == (
                f"{MODEL} made no decode progress for 1s while busy; its requests were "
                f"ended and the model is reloaded"
            )
            assert r.headers["Retry-After"] == "1"
        # another model serves meanwhile, and the pinned one comes back by itself
        other = _ask(h, "smol-b")
        assert other.status_code == 200 and other.json()["usage"]["completion_tokens"] == 40
        back = wait_for(
            lambda: [m for m in h.get("/api/ps").json()["models"] if m["name"] == MODEL], timeout=30
        )
        assert back[0]["pinned"]
        again = _ask(h)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 40
        status = h.get("/api/governor").json()
        stability = status["stability"]
        assert stability["recovered"] == 1 and stability["stuck_after"] == 1
        assert stability["failures"][MODEL]["count"] == 1
        assert [e["model"] for e in status["history"] if e["event"] == "stuck"] == [MODEL]
        metrics = h.get("/metrics").text
        assert "edgellm_governor_recovered_total 1.0" in metrics
        assert "edgellm_model_engine_failures_total 1.0" in metrics
    with d.client() as c:
        assert [r["resource"] for r in c.audit(action="governor.stuck")] == [MODEL]
    assert "event=engine_abandoned" in wait_for(
        lambda: "engine_abandoned" in d.log_text() and d.log_text(), timeout=15
    )
    assert d.alive()


def test_a_dead_engine_fails_its_requests_and_reloads_after_a_back_off(make_daemon: Any) -> None:
    # the first two decode steps raise: the engine thread dies each time
    d: Daemon = make_daemon(
        failure_backoff="2s", env={"EDGELLM_FAILPOINTS": "engine.decode=raise@0*2"}
    )
    with d.http() as h:
        first = _ask(h)
        assert first.status_code == 503
        assert first.json()["error"]["code"] == "engine_failed"
        assert first.json()["error"]["message"] == (
            f"{MODEL} failed while generating (its engine thread died: FailpointError: "
            f"failpoint engine.decode fired); it is reloaded on the next request"
        )
        assert h.get("/api/ps").json()["models"] == []  # marked failed, unloaded
        second = _ask(h)  # the first failure costs nothing: reloaded at once, dies again
        assert second.status_code == 503 and second.json()["error"]["code"] == "engine_failed"
        waiting = _ask(h)  # now it backs off
        assert waiting.status_code == 503
        assert waiting.json()["error"]["code"] == "model_backing_off"
        assert waiting.json()["error"]["message"].startswith(
            f"{MODEL} failed 2 times in a row (last: its engine thread died: FailpointError"
        )
        assert 1 <= int(waiting.headers["Retry-After"]) <= 2
        refused = h.post(f"/api/models/{MODEL}/load")  # an explicit load waits it out too
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "model_backing_off"
        failures = h.get("/api/governor").json()["stability"]["failures"][MODEL]
        assert failures["count"] == 2 and failures["reason"].startswith("its engine thread died")
        ok = wait_for(lambda: (r := _ask(h)).status_code == 200 and r, timeout=10, interval=0.5)
        assert ok.json()["usage"]["completion_tokens"] == 40
    assert d.alive()


def test_a_bad_failpoint_spec_is_one_line_not_a_traceback(make_daemon: Any, tmp_path: Path) -> None:
    d = Daemon(tmp_path, Path("/dev/null"), names=(), env={"EDGELLM_FAILPOINTS": "decode=boom"})
    r = d.cli("serve", "--no-pull")
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "error: EDGELLM_FAILPOINTS: bad failpoint 'decode=boom': "
        "expected NAME=hang|raise[@SKIP][*TIMES]"
    )


def test_back_off_doubles_up_to_five_minutes_and_is_forgotten() -> None:
    book = FailureBook(backoff=5)
    waits = [book.record("m", "died", now=t).retry_at - t for t in range(8)]
    assert waits == [0, 5, 10, 20, 40, 80, 160, 300]
    with pytest.raises(ModelBackingOff, match="failed 8 times in a row"):
        book.check("m", now=100)
    book.check("m", now=307)  # waited out
    assert book.record("m", "died", now=2000).count == 1  # quiet for 10 minutes: forgotten


class _Models:
    """What the watch reads from the runtime: how often the loaded models changed."""

    def __init__(self) -> None:
        self.changes = 0

    def model_changes(self) -> int:
        return self.changes


def test_growth_with_the_same_models_is_a_suspected_leak_and_a_load_is_not() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    models = _Models()
    watch = StabilityWatch(
        GovernorSettings(stuck_after=0, leak_growth_mb=100, leak_settle=10),
        models,
        lambda kind, **kw: events.append((kind, kw)),
    )

    def feed(t: float, rss: float) -> None:
        watch.check({"rss_anon_mb": rss}, t)

    feed(0, 300)
    feed(5, 350)  # settling after the start: no baseline yet
    feed(10, 400)  # baseline 400
    feed(50, 480)
    assert events == []
    feed(60, 510)  # 110 MB over the baseline, same models
    assert events == [
        ("leak", {"reason": "memory grew 110 MB in 0.8 min with the same models loaded"})
    ]
    assert watch.leak["baseline_mb"] == 400 and watch.leak["growth_mb"] == 110
    models.changes += 1  # a model loads: its memory is not a leak
    feed(61, 900)
    feed(80, 900)  # new baseline after the settle time
    feed(90, 950)
    assert len(events) == 1
    feed(100, 1001)  # growth again beyond the new baseline
    assert len(events) == 2 and watch.leaks == 2


def test_a_replayed_leak_is_reported_by_a_running_daemon(make_daemon: Any, tmp_path: Path) -> None:
    trace = tmp_path / "leak.jsonl"
    trace.write_text(
        "".join(
            json.dumps(line) + "\n"
            for line in [
                {"t": 0, "mem_available_pct": 60, "rss_anon_mb": 300},
                {"t": 2, "rss_anon_mb": 420},
                {"t": 3, "rss_anon_mb": 800},
            ]
        )
    )
    d: Daemon = make_daemon(
        governor={
            "trace": str(trace),
            "poll_interval": "100ms",
            "leak_settle": "500ms",
            "leak_growth_mb": 400,
        }
    )
    with d.http() as h:
        leak = wait_for(
            lambda: h.get("/api/governor").json()["stability"]["suspected_leak"], timeout=15
        )
        assert leak["baseline_mb"] == 300 and leak["rss_mb"] == 800
        assert "edgellm_governor_suspected_leaks_total 1.0" in h.get("/metrics").text
    with d.client() as c:
        assert len(c.audit(action="governor.leak")) == 1
    assert "event=governor_leak" in d.log_text()
