"""Long work the daemon is doing for someone (an import, a pull, a key rotation), with
its progress, so any client sees it: the CLI that started it, the TUI's Models tab,
an operator's ``curl /api/jobs``. A job is listed from its start to its end, then
forgotten (its result is in the audit log and the catalog)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    id: str
    kind: str  # "import", "pull", "vault.rotate"
    name: str  # what it works on: a model, or "vault"
    by: str  # who asked (the audit row's user)
    phase: str = "starting"
    completed: int = 0
    total: int | None = None  # bytes (or steps) when known
    started: float = field(default_factory=time.monotonic)
    phase_started: float = field(default_factory=time.monotonic)

    def report(self, phase: str, completed: int = 0, total: int | None = None) -> None:
        """A progress.Report: called from whichever thread does the work (plain
        attribute writes, read whole by the loop)."""
        if phase != self.phase:
            self.phase, self.phase_started = phase, time.monotonic()
        self.completed, self.total = completed, total

    def view(self) -> dict[str, Any]:
        now = time.monotonic()
        in_phase = max(now - self.phase_started, 1e-6)
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "by": self.by,
            "phase": self.phase,
            "completed": self.completed,
            "total": self.total,
            "elapsed_seconds": round(now - self.started, 3),
            "per_second": round(self.completed / in_phase, 1) if self.total else None,
        }


class Jobs:
    def __init__(self) -> None:
        self._running: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    @contextmanager
    def run(self, kind: str, name: str, by: str) -> Iterator[Job]:
        job = Job(f"job-{next(self._ids)}", kind, name, by)
        with self._lock:
            self._running[job.id] = job
        try:
            yield job
        finally:
            with self._lock:
                del self._running[job.id]

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [job.view() for job in self._running.values()]
