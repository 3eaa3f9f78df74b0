"""The runtime's front door: admission, models loaded on demand, idle unload, eviction.

Everything here is plain Python and threads. ``submit`` never blocks: a request
for a model that is not loaded waits in that model's line while one loader thread
loads it (one load at a time); failures reach the request's sink as events.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edgellm.config import Settings
from edgellm.errors import (
    EdgeError,
    EngineFailed,
    InsufficientMemory,
    InvalidRequest,
    ModelLoadFailed,
    ModelUnusable,
    QueueFull,
    Shedding,
    ShuttingDown,
)
from edgellm.runtime.engine import Engine, EngineStats, engine_for
from edgellm.runtime.failures import FailureBook
from edgellm.runtime.memory import MB, estimate_bytes, headroom, rss_bytes
from edgellm.runtime.source import ModelRecord, ModelSource
from edgellm.runtime.types import (
    Event,
    Failed,
    Finished,
    GenerationRequest,
    Limits,
    ModelStatus,
    Request,
    Result,
    Sink,
)

log = logging.getLogger("edgellm.runtime")


@dataclass
class LoadedModel:
    name: str
    engine: Engine
    estimate: int  # what the fit check counted on before loading
    keep_alive: float
    load_growth: int = 0  # the process's RSS growth while it loaded (ONNX: measured)
    loaded_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    opened: Any = None  # the source's context manager, kept open while loaded

    @property
    def memory_bytes(self) -> int:
        """The estimate, or what was measured (load and the largest run) if more."""
        return max(self.estimate, self.load_growth + getattr(self.engine, "working_bytes", 0))

    @property
    def pinned(self) -> bool:
        return self.keep_alive < 0

    @property
    def busy(self) -> bool:
        return self.engine.busy_slots > 0 or self.engine.pending > 0

    def expires_in(self, now: float) -> float | None:
        if self.pinned or self.busy:
            return None
        return max(0.0, self.last_used + self.keep_alive - now)


class Runtime:
    def __init__(self, settings: Settings, source: ModelSource) -> None:
        self.settings = settings
        self.source = source
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()  # one load at a time
        self._loaded: dict[str, LoadedModel] = {}
        self._waiting: dict[str, list[Request]] = {}  # lines for models loading
        self._loading: set[str] = set()
        self._requests: dict[str, Request] = {}
        self._closing = False
        self._wake = threading.Event()
        self._retired = EngineStats()  # counters of engines already unloaded
        self.stats = {
            "loads": 0,
            "unloads": 0,
            "evictions": 0,
            "load_failures": 0,
            "engine_failures": 0,
        }
        self.failures = FailureBook(settings.failure_backoff)
        # models whose file failed to load: (its sha256, the error every request gets)
        self._unusable: dict[str, tuple[str, ModelUnusable]] = {}
        self.limits = Limits()
        self._measured: dict[str, int] = {}  # ONNX models' memory, measured when last loaded
        self._reaper = threading.Thread(target=self._reap_loop, name="keep-alive", daemon=True)
        self._reaper.start()

    # --- requests ----------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; raises ModelNotFound, InvalidRequest (the model's format
        does not take this kind of request), QueueFull or ShuttingDown at once."""
        record = self.source.get(request.model)  # ModelNotFound before anything else
        check_kind(record, request)
        if request.timeout is None:
            request.timeout = self.settings.request_timeout
        with self._lock:
            if self._closing:
                raise ShuttingDown("the daemon is shutting down", retry_after=5)
            limits = self.limits
            if limits.shed:
                raise Shedding(limits.shed, retry_after=limits.retry_after)
            if request.model not in self._loaded:
                self._check_usable(record)
                self.failures.check(request.model)
            if (
                isinstance(request, GenerationRequest)
                and limits.max_tokens
                and (request.max_tokens is None or request.max_tokens > limits.max_tokens)
            ):
                request.max_tokens = limits.max_tokens
            waiting = self.queue_depth()
            if waiting >= self.settings.max_queue and not self._has_free_slot(request.model):
                raise QueueFull(
                    f"the request queue is full ({waiting} waiting, max_queue="
                    f"{self.settings.max_queue}); retry shortly",
                    retry_after=max(1.0, float(waiting)),
                )
            self._requests[request.id] = request
            inner_sink = request.sink

            def sink(event: Event, _inner: Sink = inner_sink, _id: str = request.id) -> None:
                if not isinstance(event, Failed | Finished | Result):
                    _inner(event)
                    return
                with self._lock:
                    self._requests.pop(_id, None)
                _inner(event)

            request.sink = sink
            loaded = self._loaded.get(request.model)
            if loaded is not None:
                self._touch(loaded, request.keep_alive)
                loaded.engine.submit(request)
                return
            request.state = "loading"
            self._waiting.setdefault(request.model, []).append(request)
            if request.model not in self._loading:
                self._loading.add(request.model)
                threading.Thread(
                    target=self._load_for_waiting,
                    args=(request.model,),
                    name=f"load-{request.model}",
                    daemon=True,
                ).start()

    def _beyond_slots(self, name: str, engine: Engine) -> int:
        """Requests for ``name`` that no free slot will take (lock held): admitted and
        queued, beyond the slots not running one. Both counts come from the requests'
        own states, so a request moving from queued to running (one assignment, in the
        engine) is never counted twice or not at all; reading the engine's queue and
        its slots apart let one slip through, and max_queue was exceeded by one."""
        queued = running = 0
        for r in self._requests.values():
            if r.model == name:
                queued += r.state == "queued"
                running += r.state == "running"
        return queued - max(0, engine.max_active - running)

    def _has_free_slot(self, name: str) -> bool:
        loaded = self._loaded.get(name)
        return loaded is not None and self._beyond_slots(name, loaded.engine) < 0

    def queue_depth(self) -> int:
        """Requests waiting: for a slot beyond the free ones, or for their model to load."""
        with self._lock:
            return sum(
                max(0, self._beyond_slots(name, m.engine)) for name, m in self._loaded.items()
            ) + sum(len(v) for v in self._waiting.values())

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            request = self._requests.get(request_id)
        if request is None:
            return False
        request.cancel()
        return True

    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.describe() for r in self._requests.values()]

    # --- loading -------------------------------------------------------------------------
    def _load_for_waiting(self, name: str) -> None:
        error: EdgeError | None = None
        try:
            self.load(name)
        except EdgeError as exc:
            error = exc
        except Exception as exc:
            error = ModelLoadFailed(f"could not load {name}: {exc}")
        with self._lock:
            self._loading.discard(name)
            waiting = self._waiting.pop(name, [])
            loaded = self._loaded.get(name)
            for request in waiting:
                if error is not None or loaded is None:
                    request.emit(Failed(error or ModelLoadFailed(f"{name} was unloaded")))
                else:
                    request.state = "queued"
                    self._touch(loaded, request.keep_alive)
                    loaded.engine.submit(request)

    def load(self, name: str, keep_alive: float | None = None) -> LoadedModel:
        """Load a model now (blocking) unless it is loaded already."""
        record = self.source.get(name)
        with self._load_lock:
            with self._lock:
                if self._closing:
                    raise ShuttingDown("the daemon is shutting down", retry_after=5)
                if self.limits.shed:
                    raise Shedding(self.limits.shed, retry_after=self.limits.retry_after)
                if name in self._loaded:
                    loaded = self._loaded[name]
                    self._touch(loaded, keep_alive)
                    return loaded
                self.failures.check(name)
            ms = self.settings.for_model(name)
            need = self._estimate(record)
            self._make_room(name, need)
            t0 = time.monotonic()
            opened = self.source.open(name)
            path = opened.__enter__()
            before = rss_bytes()
            engine = engine_for(
                record, path, ms, on_request_done=self._request_done, on_died=self._engine_died
            )
            try:
                engine.start()
            except BaseException as exc:
                self.stats["load_failures"] += 1
                opened.__exit__(None, None, None)
                if isinstance(exc, ModelLoadFailed):  # the file itself: not retried
                    with self._lock:
                        self._unusable[name] = (
                            record.sha256,
                            ModelUnusable(
                                f"{exc.message}; it is not loaded again until it is replaced "
                                f"or loaded by hand (edgellm models load {name})"
                            ),
                        )
                    log.error("event=model_unusable model=%s reason=%r", name, exc.message)
                    raise self._unusable[name][1] from None
                raise
            with self._lock:
                self._unusable.pop(name, None)
            with self._lock:
                loaded = LoadedModel(
                    name=name,
                    engine=engine,
                    estimate=need,
                    opened=opened,
                    load_growth=max(0, rss_bytes() - before) if record.format == "onnx" else 0,
                    keep_alive=self.settings.keep_alive if ms.keep_alive is None else ms.keep_alive,
                )
                self._touch(loaded, keep_alive)
                self._loaded[name] = loaded
                self.stats["loads"] += 1
                self._limit(loaded)
            log.info(
                "event=model_loaded model=%s seconds=%.2f memory_mb=%d gpu=%s",
                name,
                time.monotonic() - t0,
                need // MB,
                engine.gpu_offload,
            )
            return loaded

    def _estimate(self, record: ModelRecord) -> int:
        """What a model will take once loaded: GGUF from its shape (weights, KV cache,
        buffers); ONNX from what it took when last loaded, else twice its file (the
        session's copy of the weights and its working buffers)."""
        if record.format == "onnx":
            return self._measured.get(record.name) or 2 * record.size + 32 * MB
        ms = self.settings.for_model(record.name)
        return estimate_bytes(record, ms.context_for(record.context_length), ms.n_parallel or 1)

    def _make_room(self, name: str, need: int) -> None:
        """Evict idle, unpinned models (least recently used first) until ``need`` fits."""
        s = self.settings
        # The governor's reading of free memory predates our evictions until its next
        # poll: count what we evicted since that reading as free again.
        reading, freed = self.limits, 0
        while True:
            with self._lock:
                if self.limits is not reading:
                    reading, freed = self.limits, 0
                used = sum(m.memory_bytes for m in self._loaded.values())
                seen = reading.available_mb
                room = headroom(
                    s.memory_reserve_mb,
                    s.memory_budget_mb,
                    used,
                    None if seen is None else seen + freed / MB,
                )
                too_many = len(self._loaded) >= s.max_loaded_models
                if room.available >= need and not too_many:
                    return
                idle = sorted(
                    (m for m in self._loaded.values() if not m.pinned and not m.busy),
                    key=lambda m: m.last_used,
                )
            if not idle:
                if too_many:
                    raise InsufficientMemory(
                        f"cannot load {name}: {len(self._loaded)} models are loaded "
                        f"(max_loaded_models={s.max_loaded_models}) and none is idle and unpinned",
                        retry_after=5,
                    )
                short = (need - room.available + MB - 1) // MB
                raise InsufficientMemory(
                    f"not enough memory to load {name}: it needs {need // MB} MB, "
                    f"{max(0, room.available) // MB} MB is free under the {room.reason} "
                    f"(short by {short} MB)",
                    retry_after=30,
                )
            victim = idle[0]
            log.info("event=evict model=%s for=%s", victim.name, name)
            self.stats["evictions"] += 1
            if self.unload(victim.name):
                freed += victim.memory_bytes

    def unload(self, name: str) -> bool:
        with self._lock:
            loaded = self._loaded.pop(name, None)
        if loaded is None:
            return False
        loaded.engine.stop()
        with self._lock:
            self._keep_counters(loaded)
        if loaded.opened is not None:
            loaded.opened.__exit__(None, None, None)
        self.stats["unloads"] += 1
        log.info("event=model_unloaded model=%s", name)
        return True

    def _keep_counters(self, loaded: LoadedModel) -> None:
        """Roll a departing engine's counters into the daemon's totals, and remember
        what an ONNX model was measured to take (lock held)."""
        engine = loaded.engine
        if engine.record.format == "onnx":
            self._measured[engine.name] = loaded.memory_bytes
        for key, value in vars(engine.stats).items():
            setattr(self._retired, key, getattr(self._retired, key) + value)

    def _touch(self, loaded: LoadedModel, keep_alive: float | None) -> None:
        loaded.last_used = time.monotonic()
        if keep_alive is not None:
            loaded.keep_alive = keep_alive

    def _request_done(self, name: str) -> None:
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is not None:
                loaded.last_used = time.monotonic()
        self._wake.set()

    def _reap_loop(self) -> None:
        while not self._closing:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                expired = [
                    m.name
                    for m in self._loaded.values()
                    if (left := m.expires_in(now)) is not None and left <= 0
                ]
            for name in expired:
                log.info("event=idle_unload model=%s", name)
                self.unload(name)

    # --- failures: a dead or stuck engine ----------------------------------------------
    def stalled_models(self, after: float) -> list[str]:
        """Models whose engine is busy but has made no progress for ``after`` seconds
        (or whose engine thread has died)."""
        now = time.monotonic()
        with self._lock:
            models = list(self._loaded.values())
        return [m.name for m in models if not m.engine.alive or m.engine.stalled_for(now) > after]

    def recover(self, name: str, reason: str) -> bool:
        """Give up on a model's engine (stuck, or dead): its requests fail with a clear
        error, the model is unloaded, and the next request (or at once, if pinned)
        loads it again, after a back-off if it keeps failing."""
        with self._lock:
            loaded = self._loaded.get(name)
        if loaded is None:
            return False
        loaded.engine.abandon(
            EngineFailed(
                f"{name} {reason}; its requests were ended and the model is reloaded", retry_after=1
            )
        )
        return self._retire(loaded.engine, reason)

    def _engine_died(self, engine: Engine, reason: str) -> None:
        self._retire(engine, reason)

    def _retire(self, engine: Engine, reason: str) -> bool:
        with self._lock:
            loaded = self._loaded.get(engine.name)
            if loaded is None or loaded.engine is not engine:
                return False
            del self._loaded[engine.name]
            failure = self.failures.record(engine.name, reason)
            self.stats["engine_failures"] += 1
            self._keep_counters(loaded)
        log.error(
            "event=engine_failed model=%s reason=%r failures=%d retry_in=%.0f",
            engine.name,
            reason,
            failure.count,
            failure.retry_at - time.monotonic(),
        )
        threading.Thread(
            target=self._bury, args=(loaded,), name=f"bury-{engine.name}", daemon=True
        ).start()
        if loaded.pinned:
            threading.Thread(
                target=self._reload_pinned,
                args=(engine.name, failure.retry_at),
                name=f"reload-{engine.name}",
                daemon=True,
            ).start()
        return True

    def _bury(self, loaded: LoadedModel) -> None:
        """Close a failed engine's model file once its thread is gone. A thread stuck
        inside llama.cpp cannot be stopped from Python: its memory stays held until it
        returns or the daemon restarts, and the log says so."""
        loaded.engine.stop(timeout=5)
        if loaded.engine.alive:
            log.warning(
                'event=engine_abandoned model=%s note="its thread is stuck in '
                "llama.cpp; its memory is held until it returns or the daemon "
                'restarts"',
                loaded.name,
            )
            loaded.engine.stop(timeout=None)
        if loaded.opened is not None:
            loaded.opened.__exit__(None, None, None)

    def _reload_pinned(self, name: str, retry_at: float) -> None:
        while not self._closing and time.monotonic() < retry_at:
            time.sleep(min(1.0, retry_at - time.monotonic()))
        if self._closing:
            return
        try:
            self.load(name, keep_alive=-1.0)
        except EdgeError as exc:
            log.error("event=reload_failed model=%s error=%s", name, exc.message)

    def failure_report(self) -> dict[str, dict[str, Any]]:
        return self.failures.describe()

    def model_changes(self) -> int:
        """A counter that moves whenever the set of loaded models changes."""
        with self._lock:
            return self.stats["loads"] + self.stats["unloads"] + self.stats["engine_failures"]

    # --- limits (the governor's handle) ----------------------------------------------
    def set_limits(
        self,
        model: str | None = None,
        *,
        n_threads: int | None = None,
        n_parallel: int | None = None,
    ) -> None:
        """Lower (or restore) threads and parallel slots of one or every loaded model,
        applied between decode steps, without reloading anything."""
        with self._lock:
            engines = [m.engine for name, m in self._loaded.items() if model in (None, name)]
        for engine in engines:
            engine.set_limits(n_threads=n_threads, n_parallel=n_parallel)

    def apply_limits(self, limits: Limits) -> None:
        """The governor's limits, for every loaded model now and every later load."""
        with self._lock:
            self.limits = limits
            models = list(self._loaded.values())
        for loaded in models:
            self._limit(loaded)

    def _limit(self, loaded: LoadedModel) -> None:
        ms, lim, engine = self.settings.for_model(loaded.name), self.limits, loaded.engine
        engine.set_limits(
            n_threads=max(1, int((ms.n_threads or 1) * lim.thread_fraction)),
            n_parallel=max(1, int(engine.capacity * lim.slot_fraction)),
            tokens_per_second=lim.tokens_per_second or 0.0,
        )

    def unload_idle(self, idle_for: float) -> list[str]:
        """Unload unpinned, idle models unused for ``idle_for`` seconds (early, before
        their keep-alive runs out); the names unloaded."""
        now = time.monotonic()
        with self._lock:
            names = [
                m.name
                for m in self._loaded.values()
                if not m.pinned and not m.busy and now - m.last_used >= idle_for
            ]
        return [n for n in names if self.unload(n)]

    def cancel_newest(self) -> str | None:
        """Cancel the most recently submitted request still running; its id."""
        with self._lock:
            running = [r for r in self._requests.values() if not r.cancel_event.is_set()]
        if not running:
            return None
        newest = max(running, key=lambda r: r.started)
        newest.cancel()
        return newest.id

    # --- views ---------------------------------------------------------------------------
    def loaded(self) -> list[ModelStatus]:
        now = time.monotonic()
        with self._lock:
            models = list(self._loaded.values())
        return [self._status(m, now) for m in models]

    def status(self, name: str) -> ModelStatus | None:
        """The model's status while it is loaded."""
        with self._lock:
            loaded = self._loaded.get(name)
        return None if loaded is None else self._status(loaded, time.monotonic())

    @staticmethod
    def _status(m: LoadedModel, now: float) -> ModelStatus:
        e = m.engine
        expires = m.expires_in(now)
        return ModelStatus(
            name=m.name,
            memory_mb=round(m.memory_bytes / MB, 1),
            size_mb=round(e.record.size / MB, 1),
            slots=e.capacity,
            slot_limit=e.max_active,
            slots_busy=e.busy_slots,
            queued=e.pending,
            n_ctx=e.n_ctx,
            n_threads=e.n_threads,
            device="gpu" if e.gpu_offload else "cpu",
            pinned=m.pinned,
            keep_alive_seconds=m.keep_alive,
            expires_in_seconds=None if expires is None else round(expires, 1),
            idle_seconds=round(now - m.last_used, 1),
            rate=e.rate(),
            rate_unit=e.rate_unit,
            details=e.details(),
        )

    def model_state(self, name: str) -> str:
        with self._lock:
            if name in self._loaded:
                return "loaded"
            if name in self._loading:
                return "loading"
            if name in self._unusable:
                return "failed"
        return "available"

    def _check_usable(self, record: ModelRecord) -> None:
        """Raise ModelUnusable for a model whose file failed to load (lock held); a new
        file under the same name (another sha256) is tried afresh."""
        known = self._unusable.get(record.name)
        if known is not None:
            if known[0] == record.sha256:
                raise known[1]
            del self._unusable[record.name]

    def totals(self) -> EngineStats:
        """Counters over the daemon's life, models since unloaded included."""
        with self._lock:
            total = EngineStats(**vars(self._retired))
            for m in self._loaded.values():
                for key, value in vars(m.engine.stats).items():
                    setattr(total, key, getattr(total, key) + value)
        return total

    # --- shutdown ------------------------------------------------------------------------
    def active_count(self) -> int:
        with self._lock:
            return len(self._requests)

    def close(self, grace: float = 0.0) -> None:
        """Refuse new work, let what runs finish within ``grace`` seconds, then cancel it."""
        with self._lock:
            self._closing = True
        end = time.monotonic() + grace
        while self.active_count() and time.monotonic() < end:
            time.sleep(0.05)
        with self._lock:
            leftover = list(self._requests.values())
        for request in leftover:
            request.cancel()
        for name in list(self._loaded):
            self.unload(name)
        self._wake.set()


def check_kind(record: ModelRecord, request: Request) -> None:
    """GGUF models generate text; ONNX models run tensors (and embed texts)."""
    if record.format == "onnx" and request.kind != "tensor":
        raise InvalidRequest(
            f"{record.name} is an ONNX model: it answers /v1/embeddings "
            f"(if it embeds text) and /api/onnx/{record.name}/infer, not "
            "completions or tokenization",
            param="model",
        )
    if record.format != "onnx" and request.kind == "tensor":
        raise InvalidRequest(
            f"{record.name} is a {record.format.upper()} language model: it "
            "answers /v1/chat/completions and /v1/completions; embeddings "
            "and tensors come from ONNX models",
            param="model",
        )
