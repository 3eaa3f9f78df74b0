"""What the runtime asks of an engine, and which engine runs which model.

An engine owns one loaded model on a thread of its own: requests go in through
``submit`` and leave through their sinks. llama.cpp runs GGUF models, onnxruntime
runs ONNX models; the model manager treats both alike through this interface.
"""

from __future__ import annotations

from typing import Any, Protocol

from edgellm.config import ModelSettings
from edgellm.errors import EdgeError
from edgellm.runtime.engine import EngineStats, LlamaEngine
from edgellm.runtime.source import ModelRecord


class Engine(Protocol):
    name: str
    record: ModelRecord
    settings: ModelSettings
    stats: EngineStats
    capacity: int  # requests (GGUF: slots) or rows (ONNX: a batch) it runs at once
    max_active: int  # the governor's limit on that
    n_threads: int
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
    def describe(self) -> dict[str, Any]: ...

    @property
    def alive(self) -> bool: ...
    @property
    def pending(self) -> int: ...
    @property
    def busy_slots(self) -> int: ...


def engine_for(record: ModelRecord, path: str, settings: ModelSettings, **hooks: Any) -> Engine:
    if record.format == "onnx":
        from edgellm.runtime.onnx.engine import OnnxEngine  # onnxruntime only when used

        return OnnxEngine(record, path, settings, **hooks)
    return LlamaEngine(record, path, settings, **hooks)
