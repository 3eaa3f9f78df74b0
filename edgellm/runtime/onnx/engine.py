"""The onnxruntime engine: one thread owns one model's session and runs its requests.

Requests wait in a thread-safe queue. Each turn the thread takes what is queued (up
to ``max_batch`` items, waiting ``batch_wait_ms`` for more if set), groups the
requests that can share a run (texts for an embedding model; tensors with the same
inputs and the same shape past the batch axis), stacks each group on axis 0, runs it
once and splits the outputs. A run that fails is retried one request at a time, so
one bad input does not fail its neighbours.

Cancellation: a run in progress is stopped with ``RunOptions.terminate`` once every
request in it is cancelled or past its deadline (a small watcher thread checks while
a run is in progress). Threads: onnxruntime fixes a session's thread count when the
session is built, so when the governor lowers it, a new session is built from the
model's bytes (still in the vault's sealed memory file) between runs and swapped in;
requests wait for the build, the old session is dropped after it. Building first and
dropping after keeps the model serving if a build fails, at the cost of both
sessions' weights for the moment of the swap.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np

from edgellm.config import ModelSettings
from edgellm.errors import (
    DeadlineExceeded,
    EdgeError,
    InvalidRequest,
    ModelLoadFailed,
    RequestCancelled,
)
from edgellm.runtime import failpoints
from edgellm.runtime.engine import EngineThread
from edgellm.runtime.memory import rss_bytes
from edgellm.runtime.onnx import bundle
from edgellm.runtime.source import ModelRecord
from edgellm.runtime.types import Failed, Result, TensorRequest, Usage

log = logging.getLogger("edgellm.engine")
LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
# not chosen unless asked for: TensorRT compiles an engine per shape on first use (minutes);
# Azure runs models remotely
AUTO_SKIPPED = ("TensorrtExecutionProvider", "AzureExecutionProvider")


class OnnxEngine(EngineThread):
    def __init__(
        self,
        record: ModelRecord,
        model_path: str,
        settings: ModelSettings,
        on_request_done: Any = None,
        on_died: Any = None,
    ) -> None:
        super().__init__(record, model_path, settings, on_request_done, on_died)
        self.inputs: list[dict[str, Any]] = record.extra.get("inputs", [])
        self.outputs: list[dict[str, Any]] = record.extra.get("outputs", [])
        self.embedding: dict[str, Any] | None = record.extra.get("embedding")
        self.max_batch = settings.max_batch or 32
        self.capacity = self.max_batch
        self.max_active = self.max_batch
        self.batch_wait = (settings.batch_wait_ms or 0.0) / 1000
        self.batchable = all(
            s["shape"] and not isinstance(s["shape"][0], int) for s in self.inputs + self.outputs
        )
        self.n_ctx = int(record.context_length or 0)
        self.working_bytes = 0  # the most the process grew during a run, after the load
        self._base_rss = 0
        self.providers: list[str] = []
        self._running: list[TensorRequest] = []
        self._run_options: Any = None
        self._in_run = threading.Event()
        self._session: Any = None
        self._tokenizer: Any = None
        self._watcher = threading.Thread(target=self._watch, name=f"watch-{self.name}", daemon=True)

    # --- called from other threads -------------------------------------------------------
    def start(self, timeout: float = 600.0) -> None:
        super().start(timeout)
        self._watcher.start()

    def submit(self, request: TensorRequest) -> None:
        request.on_cancel = self._check_run
        self._enqueue(request)

    @property
    def busy_slots(self) -> int:
        return len(self._running)

    def set_limits(
        self,
        n_threads: int | None = None,
        n_parallel: int | None = None,
        tokens_per_second: float | None = None,
    ) -> None:
        """Fewer threads (a new session, built between runs) or smaller batches.
        A tokens-per-second cap does not apply to a model that makes no tokens."""
        if n_threads is not None:
            self.n_threads = max(1, n_threads)
        if n_parallel is not None:
            self.max_active = max(1, min(n_parallel, self.max_batch))

    rate_unit = "rows"

    def details(self) -> dict[str, Any]:
        st = self.stats
        return {
            "format": "onnx",
            "providers": self.providers,
            "max_batch": self.max_active,
            "batching": self.batchable,
            "runs": st.batches,
            "mean_batch_size": round(st.batch_items / st.batches, 2) if st.batches else 0.0,
        }

    def abandon(self, error: EdgeError) -> None:
        self._stopping.set()
        self._terminate()
        self._fail_requests(error)
        self._queue.put(None)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop: a run in progress is terminated; the engine thread ends every request
        it holds as it leaves (or, if it died, already has, with the reason)."""
        self._stopping.set()
        for request in list(self._running):
            request.cancel()
        self._queue.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _fail_requests(self, error: EdgeError) -> None:
        for request in list(self._running):
            request.emit(Failed(error))
        for request in self._drain():
            request.emit(Failed(error))

    # --- stopping a run -------------------------------------------------------------------
    def _check_run(self) -> None:
        """Stop the run in progress if none of its requests still wants it."""
        now = time.monotonic()
        running = list(self._running)
        if running and all(
            r.cancel_event.is_set() or (r.deadline or now + 1) < now for r in running
        ):
            self._terminate()

    def _terminate(self) -> None:
        options = self._run_options
        if options is not None:
            options.terminate = True

    def _watch(self) -> None:
        """Deadlines pass with no one to call: look every 20 ms while a run is on."""
        while not self._stopping.is_set():
            if self._in_run.wait(0.5):
                self._check_run()
                self._stopping.wait(0.02)

    # --- the engine thread ------------------------------------------------------------------
    def _load(self) -> None:
        files = bundle.read(self.model_path)
        self._session = self._build(files[bundle.MODEL], self.n_threads)
        if self.embedding is not None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_str(files[bundle.TOKENIZER].decode())
            self._tokenizer.no_padding()
            self._tokenizer.enable_truncation(int(self.embedding["max_length"]))
        del files
        self._base_rss = rss_bytes()

    def _close(self) -> None:
        if self.failure is None:
            self._fail_requests(RequestCancelled(f"{self.name} was unloaded"))
        self._session = None
        self._in_run.set()  # let the watcher see that we stop

    def _build(self, model: bytes, threads: int) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # onnxruntime's threads spin while they wait for work by default: on a device
        # whose few cores also run the daemon and its clients that burns CPU (and heat)
        # between requests, for no throughput measured here (README, Performance)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, LEVELS[self.settings.graph_optimization or "all"]
        )
        available = ort.get_available_providers()
        wanted = self.settings.providers or [p for p in available if p not in AUTO_SKIPPED]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ModelLoadFailed(
                f"cannot load {self.name}: execution provider "
                f"{', '.join(missing)} is not in this onnxruntime (it has "
                f"{', '.join(available)})"
            )
        if any(p in GPU_PROVIDERS for p in wanted) and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds CUDA and cuDNN in the nvidia-* wheels only if asked
            ort.preload_dlls()
        session = ort.InferenceSession(model, sess_options=options, providers=wanted)
        self.providers = session.get_providers()
        dropped = [p for p in wanted if p not in self.providers]
        if dropped and self.settings.providers:
            raise ModelLoadFailed(
                f"cannot load {self.name}: execution provider "
                f"{', '.join(dropped)} did not start (onnxruntime fell back "
                f"to {', '.join(self.providers)}; its libraries, e.g. CUDA "
                "and cuDNN, are missing or do not match)"
            )
        if dropped:
            log.warning(
                "event=providers_dropped model=%s dropped=%s using=%s",
                self.name,
                ",".join(dropped),
                ",".join(self.providers),
            )
        self.gpu_offload = self.providers[0] != "CPUExecutionProvider"
        return session

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if self.n_threads != self._applied_threads:
                self._rebuild()
            batch = self._collect()
            if not batch:
                continue
            for group in self._groups(batch):
                self._run_group(group)
            self.last_progress = time.monotonic()
            if self._on_request_done:
                self._on_request_done(self.name)

    def _rebuild(self) -> None:
        t0 = time.monotonic()
        model = bundle.read(self.model_path)[bundle.MODEL]
        self._session = self._build(model, self.n_threads)
        self._applied_threads = self.n_threads
        log.info(
            "event=session_rebuilt model=%s threads=%d seconds=%.2f",
            self.name,
            self.n_threads,
            time.monotonic() - t0,
        )

    def _collect(self) -> list[TensorRequest]:
        try:
            first = self._queue.get(timeout=0.25)
        except queue.Empty:
            return []
        batch: list[TensorRequest] = []
        if first is None:
            return batch
        batch.append(first)
        size = _rows(first)
        until = time.monotonic() + self.batch_wait
        while size < self.max_active:
            wait = until - time.monotonic()
            try:
                more = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                break
            batch.append(more)
            size += _rows(more)
        live = []
        for request in batch:
            if request.cancel_event.is_set():
                request.emit(Failed(RequestCancelled(f"request {request.id} was cancelled")))
            else:
                live.append(request)
        return live

    def _groups(self, batch: list[TensorRequest]) -> list[list[TensorRequest]]:
        """Requests that can share one run: texts all together; tensors with the same
        names, dtypes, trailing shapes and wanted outputs."""
        if not self.batchable:
            return [[r] for r in batch]
        groups: dict[Any, list[TensorRequest]] = {}
        for r in batch:
            key: Any = (
                "texts"
                if r.texts is not None
                else (
                    tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in r.inputs.items())),
                    tuple(r.outputs or ()),
                )
            )
            groups.setdefault(key, []).append(r)
        return list(groups.values())

    def _run_group(self, group: list[TensorRequest]) -> None:
        # _running stays set if the run raises something else: the engine dies, and
        # its requests are failed with the reason
        self._running = group
        for r in group:  # running only once counted as busy: the queue's count holds
            r.state = "running"
        try:
            run = self._embed if group[0].texts is not None else self._tensors
            results = run(group)
        except _Stopped:
            self._running = []
            now = time.monotonic()
            for r in group:
                late = r.deadline is not None and now > r.deadline
                r.emit(
                    Failed(
                        DeadlineExceeded(
                            f"request {r.id} took longer than its timeout ({r.timeout:g}s) and was "
                            "stopped"
                        )
                        if late and not r.cancel_event.is_set()
                        else RequestCancelled(f"request {r.id} was cancelled")
                    )
                )
            return
        except EdgeError as exc:
            self._running = []
            if len(group) == 1:
                group[0].emit(Failed(exc))
                return
            for r in group:  # one at a time: the bad one fails alone
                self._run_group([r])
            return
        self._running = []
        for r, result in zip(group, results, strict=True):
            self.stats.requests += 1
            r.prompt_tokens = result.usage.prompt_tokens
            r.emit(result)

    def _run(
        self, feed: dict[str, np.ndarray], names: list[str] | None, rows: int
    ) -> list[np.ndarray]:
        import onnxruntime as ort

        self._run_options = options = ort.RunOptions()
        options.log_severity_level = 4  # a terminated run is ours to report, not ORT's
        self._in_run.set()
        t0 = time.monotonic()
        try:
            failpoints.hit("engine.onnx_run")
            return self._session.run(names, feed, options)
        except Exception as exc:
            if options.terminate:
                raise _Stopped() from None
            if isinstance(exc, failpoints.FailpointError):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InvalidRequest(
                f"{self.name} could not run on these inputs: {first.split(' : ')[-1]}"
            ) from None
        finally:
            self._in_run.clear()
            self._run_options = None
            now = time.monotonic()
            self.stats.batches += 1
            self.stats.batch_items += rows
            self.stats.decode_seconds += now - t0
            self._recent.append((now, rows))
            self.last_progress = now
            self.working_bytes = max(self.working_bytes, rss_bytes() - self._base_rss)

    # --- tensors ---------------------------------------------------------------------------
    def _tensors(self, group: list[TensorRequest]) -> list[Result]:
        t0 = time.monotonic()
        names = group[0].outputs
        if len(group) == 1:
            r = group[0]
            rows = _rows(r)
            arrays = self._run(r.inputs, names, rows)
            outs = [dict(zip(names or [o["name"] for o in self.outputs], arrays, strict=True))]
        else:
            sizes = [_rows(r) for r in group]
            feed = {n: np.concatenate([r.inputs[n] for r in group]) for n in group[0].inputs}
            arrays = self._run(feed, names, sum(sizes))
            cuts = np.cumsum(sizes)[:-1]
            split = [np.split(a, cuts) for a in arrays]
            keys = names or [o["name"] for o in self.outputs]
            outs = [{k: split[j][i] for j, k in enumerate(keys)} for i in range(len(group))]
        seconds = time.monotonic() - t0
        return [Result(o, Usage(), seconds) for o in outs]

    # --- embeddings ------------------------------------------------------------------------
    def _embed(self, group: list[TensorRequest]) -> list[Result]:
        """Tokenize every text of the group, run them sorted by length in chunks of
        ``max_batch`` (less padding), pool and normalize as the model's config says."""
        t0 = time.monotonic()
        cfg = self.embedding
        assert cfg is not None and self._tokenizer is not None
        texts = [t for r in group for t in r.texts or []]
        encodings = self._tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        vectors: list[np.ndarray] = [np.empty(0)] * len(texts)
        names = {s["name"] for s in self.inputs}
        step = max(1, self.max_active)
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            width = max(len(encodings[i].ids) for i in chunk)
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            for row, i in enumerate(chunk):
                n = len(encodings[i].ids)
                ids[row, :n], mask[row, :n] = encodings[i].ids, 1
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            feed = {k: v.astype(self._dtype(k)) for k, v in feed.items() if k in names}
            (out,) = self._run(feed, [cfg["output"]], len(chunk))
            out = _pool(out, mask, cfg["pooling"])
            if cfg.get("normalize"):
                out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
            for row, i in enumerate(chunk):
                vectors[i] = out[row].astype(np.float32)
        seconds = time.monotonic() - t0
        results, at = [], 0
        for r in group:
            n = len(r.texts or [])
            tokens = sum(len(e.ids) for e in encodings[at : at + n])
            results.append(
                Result(
                    {"embeddings": np.stack(vectors[at : at + n])},
                    Usage(prompt_tokens=tokens),
                    seconds,
                )
            )
            at += n
        return results

    def _dtype(self, name: str) -> str:
        return next(s["dtype"] for s in self.inputs if s["name"] == name)


class _Stopped(Exception):
    """The run was terminated (its requests were cancelled or ran out of time)."""


def _rows(request: TensorRequest) -> int:
    if request.texts is not None:
        return len(request.texts)
    first = next(iter(request.inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _pool(out: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    if pooling == "none":
        return out
    if pooling == "cls":
        return out[:, 0]
    weights = mask[..., None].astype(out.dtype)
    return (out * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
