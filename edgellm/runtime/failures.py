"""Engine failures per model, and the back-off before a failing model is loaded again.

The first failure costs nothing: the next request reloads the model at once. Each
further failure within ``forget_after`` seconds of the last doubles the wait, from
``backoff`` seconds up to ``max_backoff``, so a model that crashes on every request
does not spend the device reloading it in a loop.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from edgellm.errors import ModelBackingOff


@dataclass
class Failure:
    reason: str
    count: int
    at: float  # monotonic
    retry_at: float  # monotonic
    when: str  # wall clock, for people


class FailureBook:
    def __init__(
        self, backoff: float, max_backoff: float = 300.0, forget_after: float = 600.0
    ) -> None:
        self.backoff, self.max_backoff, self.forget_after = backoff, max_backoff, forget_after
        self._failures: dict[str, Failure] = {}

    def record(self, name: str, reason: str, now: float | None = None) -> Failure:
        now = time.monotonic() if now is None else now
        last = self._failures.get(name)
        count = 1 if last is None or now - last.at > self.forget_after else last.count + 1
        delay = 0.0 if count == 1 else min(self.max_backoff, self.backoff * 2 ** (count - 2))
        failure = Failure(
            reason, count, now, now + delay, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        )
        self._failures[name] = failure
        return failure

    def check(self, name: str, now: float | None = None) -> None:
        """Raise ModelBackingOff while ``name`` waits out its back-off."""
        failure = self._failures.get(name)
        now = time.monotonic() if now is None else now
        if failure is None or now >= failure.retry_at:
            return
        wait = failure.retry_at - now
        raise ModelBackingOff(
            f"{name} failed {failure.count} times in a row (last: {failure.reason}); "
            f"it is loaded again in {wait:.0f}s",
            retry_after=max(1.0, round(wait)),
        )

    def describe(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        now = time.monotonic() if now is None else now
        return {
            name: {
                **{k: v for k, v in asdict(f).items() if k not in ("at", "retry_at")},
                "retry_in_seconds": round(max(0.0, f.retry_at - now), 1),
            }
            for name, f in self._failures.items()
        }
