"""A fake engine for the runtime's own logic (admission, LRU eviction, back-off): no
model, so those tests take milliseconds. It is registered for the format "fake"
through the same ``register_engine`` the real engines are found by, and serves the
same ``Engine`` interface: a thread that takes requests, "generates" the words of
each prompt one per step, and ends each with one Finished.

Each model's record says how it behaves: ``extra["fail_load"]`` makes its load fail,
``extra["die_after"]`` makes its engine thread die after that many steps. A test
holds every engine's steps with ``hold()`` and lets them go with ``release()``.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from edgellm.config import ModelSettings
from edgellm.errors import EdgeError, ModelLoadFailed, ModelNotFound
from edgellm.runtime.engine import EngineThread, register_engine
from edgellm.runtime.source import ModelRecord
from edgellm.runtime.types import (
    Delta,
    Failed,
    Finished,
    FinishReason,
    GenerationRequest,
    Usage,
)

_go = threading.Event()
_go.set()


def hold() -> None:
    _go.clear()


def release() -> None:
    _go.set()


class FakeEngine(EngineThread):
    def __init__(
        self, record: ModelRecord, model_path: str, settings: ModelSettings, **hooks: Any
    ) -> None:
        super().__init__(record, model_path, settings, **hooks)
        self.capacity = self.max_active = settings.n_parallel or 1
        self.n_ctx = 512
        self.running: list[tuple[GenerationRequest, list[str]]] = []
        self.steps = 0

    def submit(self, request: GenerationRequest) -> None:
        self._enqueue(request)

    def abandon(self, error: EdgeError) -> None:
        self._stopping.set()
        self._fail_requests(error)
        self._queue.put(None)

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stopping.set()
        self._queue.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def set_limits(
        self,
        n_threads: int | None = None,
        n_parallel: int | None = None,
        tokens_per_second: float | None = None,
    ) -> None:
        if n_parallel is not None:
            self.max_active = max(1, min(n_parallel, self.capacity))

    @property
    def busy_slots(self) -> int:
        return len(self.running)

    def details(self) -> dict[str, Any]:
        return {"format": "fake", "steps": self.steps}

    def _load(self) -> None:
        if self.record.extra.get("fail_load"):
            raise ModelLoadFailed(f"could not load {self.name}: {self.record.extra['fail_load']}")

    def _loop(self) -> None:
        while not self._stopping.is_set():
            while len(self.running) < self.max_active:
                try:
                    request = self._queue.get(timeout=0.01 if not self.running else 0)
                except queue.Empty:
                    break
                if request is None:
                    return
                request.state = "running"
                self.running.append((request, (request.prompt or "").split()))
            if not self.running or not _go.wait(0.01):
                continue
            self._step()

    def _step(self) -> None:
        self.steps += 1
        if self.steps > self.record.extra.get("die_after", 1 << 30):
            raise RuntimeError("the fake engine died, as its record asked")
        for request, words in list(self.running):
            if request.cancel_event.is_set() or not words:
                self.running.remove((request, words))
                reason: FinishReason = "cancelled" if request.cancel_event.is_set() else "stop"
                usage = Usage(len((request.prompt or "").split()), request.completion_tokens)
                request.emit(Finished(reason, usage, 0.0, 0.0))
                if self._on_request_done is not None:
                    self._on_request_done(self.name)
                continue
            request.completion_tokens += 1
            request.emit(Delta(words.pop(0) + " "))
        self._recent.append((time.monotonic(), len(self.running)))
        self.last_progress = time.monotonic()

    def _fail_requests(self, error: EdgeError) -> None:
        for request, _ in self.running:
            request.emit(Failed(error))
        self.running.clear()
        for request in self._drain():
            request.emit(Failed(error))

    def _close(self) -> None:
        if self.failure is None:
            for request, _ in self.running:
                request.emit(Finished("cancelled", Usage(), 0.0, 0.0))
            for request in self._drain():
                request.emit(Finished("cancelled", Usage(), 0.0, 0.0))
        self.running.clear()


class FakeSource:
    """Model records in memory (a ModelSource, as the vault is one)."""

    def __init__(self, *records: ModelRecord) -> None:
        self.records = {r.name: r for r in records}

    def get(self, name: str) -> ModelRecord:
        if name not in self.records:
            raise ModelNotFound(f"model {name!r} not found", param="model")
        return self.records[name]

    def list(self) -> list[ModelRecord]:
        return list(self.records.values())

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[str]:
        yield "/dev/null"


def fake_model(name: str, **extra: Any) -> ModelRecord:
    return ModelRecord(name=name, format="fake", sha256="0" * 64, size=1 << 20, extra=extra)


register_engine("fake", FakeEngine)
