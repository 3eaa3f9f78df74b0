"""What the runtime asks of an engine, what every engine shares, and which engine
runs which format.

An engine owns one loaded model on a thread of its own: requests go in through
``submit`` and leave through their sinks (``Request.emit``). llama.cpp runs GGUF
models (``runtime/llama/``), onnxruntime runs ONNX models (``runtime/onnx/``); the
model manager treats them alike through ``Engine``. ``EngineThread`` is the base both
build on: the thread that loads then serves, the queue, progress for the stability
watch, and the recent-rate window behind ``ModelStatus.rate``. Tests register a
fake engine for a format of their own with ``register_engine``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from edgellm.config import ModelSettings
from edgellm.errors import EdgeError, EngineFailed, ModelLoadFailed
from edgellm.runtime.source import ModelRecord

log = logging.getLogger("edgellm.engine")


@dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0  # evaluated, not reused
    reused_prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    decode_step_sequences: int = 0  # sum over steps of sequences decoded together
    decode_micro_batches: int = 0  # sum over steps of llama.cpp's graph evaluations
    prefill_steps: int = 0  # steps that evaluated prompt chunks
    prefill_chunks: int = 0  # prompt chunks over those steps
    sequence_moves: int = 0  # running sequences moved to another KV stream (packing)
    batches: int = 0  # ONNX runs
    batch_items: int = 0  # rows (texts, tensors) over those runs


class EngineThread(ABC):
    """What every engine shares: a thread that loads the model then serves a queue,
    progress and busy times for the stability watch, and a recent-rate window."""

    rate_unit = "tokens"  # what ``rate`` counts: "tokens" (GGUF) or "rows" (ONNX)

    def __init__(
        self,
        record: ModelRecord,
        model_path: str,
        settings: ModelSettings,
        on_request_done: Callable[[str], None] | None = None,
        on_died: Callable[[Any, str], None] | None = None,
    ) -> None:
        self.record, self.name = record, record.name
        self.model_path, self.settings = model_path, settings
        self.stats = EngineStats()
        self.gpu_offload = False
        self.n_ctx = 0
        self.capacity = self.max_active = 1  # subclasses set what they run at once
        # the governor may lower threads at run time; the loop applies them between steps
        self.n_threads = settings.n_threads or 1
        self._applied_threads = self.n_threads
        self._on_request_done = on_request_done
        self._on_died = on_died  # called with (engine, reason) if the engine thread dies
        self._queue: queue.Queue[Any] = queue.Queue()
        self._recent: deque[tuple[float, int]] = deque(maxlen=256)  # (time, items) per step
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._load_error: EdgeError | None = None
        self._thread = threading.Thread(target=self._main, name=f"engine-{self.name}", daemon=True)
        self.last_progress = time.monotonic()
        self.busy_since = time.monotonic()  # when it last went from idle to busy

    activity = "running"  # what a failure message says it was doing
    failure: str | None = None

    # --- what each engine does ------------------------------------------------------------
    @abstractmethod
    def _load(self) -> None:
        """Load the model (on the engine thread)."""

    @abstractmethod
    def _loop(self) -> None:
        """Serve the queue until stopped."""

    @abstractmethod
    def _close(self) -> None:
        """Leave: end the requests still held (unless the engine died), free the model."""

    @abstractmethod
    def _fail_requests(self, error: EdgeError) -> None:
        """End every request the engine holds, running or queued, with ``error``."""

    @property
    @abstractmethod
    def busy_slots(self) -> int:
        """Requests running now."""

    @abstractmethod
    def details(self) -> dict[str, Any]:
        """What /api/ps shows of this engine beyond ModelStatus's common fields."""

    def _main(self) -> None:
        try:
            self._load()
        except EdgeError as exc:
            self._load_error = exc
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self._load_error = ModelLoadFailed(f"could not load {self.name}: {first}")
        finally:
            self._ready.set()
        if self._load_error is not None:
            return
        try:
            self._loop()
        except Exception as exc:
            log.exception("event=engine_died model=%s", self.name)
            self.failure = f"its engine thread died: {type(exc).__name__}: {exc}"
            if self._on_died is not None:  # first, so no one is sent here any more
                self._on_died(self, self.failure)
            self._fail_requests(
                EngineFailed(
                    f"{self.name} failed while {self.activity} ({self.failure}); it is reloaded "
                    f"on the next request",
                    retry_after=1,
                )
            )
        finally:
            self._close()

    def start(self, timeout: float = 600.0) -> None:
        """Load the model on the engine thread; raise ModelLoadFailed if it cannot."""
        self._thread.start()
        self._ready.wait(timeout)
        if self._load_error is not None:
            raise self._load_error
        if not self._ready.is_set():
            raise ModelLoadFailed(f"loading {self.name} took longer than {timeout:.0f}s")

    def _enqueue(self, request: Any) -> None:
        if self.pending == 0 and self.busy_slots == 0:
            self.busy_since = time.monotonic()
        self._queue.put(request)

    def stalled_for(self, now: float) -> float:
        """Seconds this engine has been busy without progress (0 when idle)."""
        if self.busy_slots == 0 and self.pending == 0:
            return 0.0
        return now - max(self.last_progress, self.busy_since)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _drain(self) -> Iterator[Any]:
        """Take every request still waiting in the queue."""
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                yield request

    def rate(self, window: float = 5.0) -> float:
        """Items (tokens, rows) per second over the last ``window`` seconds."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        if len(recent) < 2:
            return 0.0
        span = recent[-1][0] - recent[0][0]
        return sum(n for _, n in recent[1:]) / span if span > 0 else 0.0


class Engine(Protocol):
    name: str
    record: ModelRecord
    settings: ModelSettings
    stats: EngineStats
    capacity: int  # requests (GGUF: slots) or rows (ONNX: a batch) it runs at once
    max_active: int  # the governor's limit on that
    n_threads: int
    rate_unit: str  # what rate() counts: "tokens" or "rows"
    n_ctx: int
    gpu_offload: bool

    def start(self, timeout: float = 600.0) -> None: ...
    def submit(self, request: Any) -> None: ...
    def stop(self, timeout: float | None = 30.0) -> None: ...
    def abandon(self, error: EdgeError) -> None: ...
    def stalled_for(self, now: float) -> float: ...
    def set_limits(
        self,
        n_threads: int | None = None,
        n_parallel: int | None = None,
        tokens_per_second: float | None = None,
    ) -> None: ...
    def details(self) -> dict[str, Any]: ...
    def rate(self, window: float = 5.0) -> float: ...

    @property
    def alive(self) -> bool: ...
    @property
    def pending(self) -> int: ...
    @property
    def busy_slots(self) -> int: ...


EngineFactory = Callable[..., Engine]
_FACTORIES: dict[str, EngineFactory] = {}


def register_engine(fmt: str, factory: EngineFactory) -> None:
    """Run models of format ``fmt`` with ``factory(record, path, settings, **hooks)``
    (the formats edgellm ships are found on first use; tests add fakes)."""
    _FACTORIES[fmt] = factory


def engine_for(record: ModelRecord, path: str, settings: ModelSettings, **hooks: Any) -> Engine:
    factory = _FACTORIES.get(record.format)
    if factory is not None:
        return factory(record, path, settings, **hooks)
    if record.format == "onnx":  # imported when first used: onnxruntime only if needed
        from edgellm.runtime.onnx.engine import OnnxEngine

        return OnnxEngine(record, path, settings, **hooks)
    from edgellm.runtime.llama.engine import LlamaEngine

    return LlamaEngine(record, path, settings, **hooks)
