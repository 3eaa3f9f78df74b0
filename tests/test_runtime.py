"""The runtime's own logic on a fake engine (tests/fake_engine.py): admission and the
bounded queue, LRU eviction, the unusable-file and back-off rules, and the typed
status every engine reports. Milliseconds each; the real-model tests stay elsewhere."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fake_engine
import pytest
from fake_engine import FakeSource, fake_model

from edgellm.config import load_settings
from edgellm.errors import ModelBackingOff, ModelUnusable, QueueFull, Shedding
from edgellm.runtime.manager import Runtime
from edgellm.runtime.types import Delta, Failed, Finished, GenerationRequest, Limits

from conftest import wait_for


class Collected:
    """A request's events, gathered from the engine thread."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.done = threading.Event()

    def __call__(self, event: Any) -> None:
        self.events.append(event)
        if isinstance(event, Finished | Failed):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta))


def _runtime(tmp_path: Path, *models: Any, **settings: Any) -> Runtime:
    overrides = {"state_dir": tmp_path, "max_queue": 2, "n_parallel": 1, "failure_backoff": 60}
    overrides.update(settings)
    return Runtime(load_settings(overrides=overrides, environ={}), FakeSource(*models))


@pytest.fixture
def runtimes() -> Iterator[list[Runtime]]:
    made: list[Runtime] = []
    yield made
    fake_engine.release()
    for rt in made:
        rt.close()


def _ask(rt: Runtime, model: str, prompt: str = "one two three") -> Collected:
    sink = Collected()
    rt.submit(GenerationRequest(model=model, sink=sink, prompt=prompt))
    return sink


def test_a_request_is_served_and_its_model_reports_typed_status(
    tmp_path: Path, runtimes: list[Runtime]
) -> None:
    rt = _runtime(tmp_path, fake_model("a"))
    runtimes.append(rt)
    got = _ask(rt, "a")
    assert got.done.wait(5) and got.text == "one two three "
    assert isinstance(got.events[-1], Finished) and got.events[-1].finish_reason == "stop"
    status = rt.status("a")
    assert status is not None and status.name == "a" and status.rate_unit == "tokens"
    assert status.slots_busy == 0 and status.details == {"format": "fake", "steps": 4}
    shown = status.as_dict()
    assert shown["rate_per_second"] >= 0 and shown["format"] == "fake"
    assert "details" not in shown and "rate" not in shown


def test_the_queue_holds_max_queue_and_refuses_the_next(
    tmp_path: Path, runtimes: list[Runtime]
) -> None:
    rt = _runtime(tmp_path, fake_model("a"))
    runtimes.append(rt)
    rt.load("a")
    fake_engine.hold()
    running = _ask(rt, "a")  # takes the one slot
    wait_for(lambda: getattr(rt.status("a"), "slots_busy", 0) == 1)
    waiting = [_ask(rt, "a"), _ask(rt, "a")]  # max_queue = 2
    with pytest.raises(QueueFull, match="max_queue=2") as full:
        _ask(rt, "a")
    assert full.value.retry_after == 2 and rt.queue_depth() == 2
    fake_engine.release()
    for sink in [running, *waiting]:
        assert sink.done.wait(5) and sink.text == "one two three "


def test_the_least_recently_used_idle_model_is_evicted(
    tmp_path: Path, runtimes: list[Runtime]
) -> None:
    rt = _runtime(tmp_path, fake_model("a"), fake_model("b"), fake_model("c"))
    runtimes.append(rt)
    for name in ("a", "b"):
        assert _ask(rt, name).done.wait(5)
    assert _ask(rt, "a").done.wait(5)  # a is now the more recent
    assert _ask(rt, "c").done.wait(5)  # max_loaded_models = 2: b goes
    assert sorted(m.name for m in rt.loaded()) == ["a", "c"]
    assert rt.stats["evictions"] == 1


def test_a_file_that_fails_to_load_is_unusable_until_replaced(
    tmp_path: Path, runtimes: list[Runtime]
) -> None:
    rt = _runtime(tmp_path, fake_model("bad", fail_load="not a model"))
    runtimes.append(rt)
    first = _ask(rt, "bad")
    assert first.done.wait(5)
    assert isinstance(first.events[-1].error, ModelUnusable)
    with pytest.raises(ModelUnusable, match="not a model"):
        _ask(rt, "bad")  # refused at once, without another load
    assert rt.model_state("bad") == "failed" and rt.stats["load_failures"] == 1


def test_an_engine_that_keeps_dying_backs_off(tmp_path: Path, runtimes: list[Runtime]) -> None:
    rt = _runtime(tmp_path, fake_model("crash", die_after=1))
    runtimes.append(rt)
    for _ in range(2):  # the first death reloads at once; the second starts a back-off
        sink = _ask(rt, "crash")
        assert sink.done.wait(5) and isinstance(sink.events[-1], Failed)
        wait_for(lambda: rt.model_state("crash") == "available")
    with pytest.raises(ModelBackingOff):
        _ask(rt, "crash")
    assert rt.stats["engine_failures"] == 2


def test_the_governors_shed_refuses_new_work(tmp_path: Path, runtimes: list[Runtime]) -> None:
    rt = _runtime(tmp_path, fake_model("a"))
    runtimes.append(rt)
    rt.apply_limits(Limits(shed="too hot", retry_after=7))
    with pytest.raises(Shedding, match="too hot") as shed:
        _ask(rt, "a")
    assert shed.value.retry_after == 7
    rt.apply_limits(Limits())
    assert _ask(rt, "a").done.wait(5)
