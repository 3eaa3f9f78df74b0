"""Readings replayed from a trace: rehearsal for operators, determinism for tests.

A trace is JSON lines, each a time stamp ``t`` (seconds from the start of the
replay) and any readings by their ``/api/governor`` names::

    {"t": 0, "temp_c": 60, "temp_high_c": 80, "temp_critical_c": 95}
    {"t": 5, "temp_c": 82}

At each poll the readings are those of every line whose ``t`` has passed, later
lines overriding earlier ones; after the last line its readings hold. The trace
stands in for the real sensors entirely: the policy and the actions that follow
are the same code path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from edgellm.errors import InvalidRequest
from edgellm.governor.sensors import Readings


def load_trace(path: Path) -> list[tuple[float, Readings]]:
    lines = []
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            entry = json.loads(raw)
            t = float(entry.pop("t"))
            readings = {str(k): None if v is None else float(v) for k, v in entry.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidRequest(
                f"{path}, line {number}: not a trace line ({exc}); expected "
                '{"t": seconds, "reading": number, …}'
            ) from None
        lines.append((t, readings))
    if not lines:
        raise InvalidRequest(f"{path}: the trace has no readings")
    return sorted(lines, key=lambda line: line[0])


class TraceSensors:
    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.lines = load_trace(self.path)
        self.clock = clock
        self.started = clock()
        self.status = {"trace": "ok"}

    def elapsed(self) -> float:
        """Seconds into the trace (its ``t``)."""
        return self.clock() - self.started

    def read(self) -> Readings:
        elapsed = self.clock() - self.started
        out: Readings = {}
        for t, readings in self.lines:
            if t > elapsed:
                break
            out.update(readings)
        return out
