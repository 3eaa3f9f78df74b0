"""The stability watch: engines that stop making progress, and memory that only grows.

Each governor poll it asks the runtime which models have been busy without decode
progress for ``stuck_after`` seconds (or whose engine thread died) and has the
runtime recover them. It also follows the daemon's anonymous resident memory (heap,
KV caches — not the model files mapped in, which grow as pages are first touched):
once the set of loaded models has stayed the same for ``leak_settle`` seconds, it
takes a baseline, and growth of ``leak_growth_mb`` beyond it is reported as a
suspected leak (once per that much growth). It reports; it does not act on a leak.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from edgellm.config import GovernorSettings
from edgellm.governor.sensors import Readings
from edgellm.runtime.controls import RuntimeControls


class StabilityWatch:
    def __init__(
        self, settings: GovernorSettings, runtime: RuntimeControls, event: Callable[..., None]
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.event = event
        self.recovered = 0
        self.leaks = 0
        self.leak: dict[str, Any] | None = None  # the last suspected leak
        self._changes: int | None = None
        self._changed_at = 0.0
        self._baseline: tuple[float, float] | None = None  # (MB, when)

    def check(self, readings: Readings, now: float) -> None:
        self._stuck()
        self._growth(readings, now)

    def _stuck(self) -> None:
        after = self.settings.stuck_after
        if not after:
            return
        for name in self.runtime.stalled_models(after):
            reason = f"made no decode progress for {after:.0f}s while busy"
            if self.runtime.recover(name, reason):
                self.recovered += 1
                self.event("stuck", model=name, reason=reason)

    def _growth(self, readings: Readings, now: float) -> None:
        g = self.settings
        rss = readings.get("rss_anon_mb", readings.get("rss_mb"))
        if not g.leak_growth_mb or rss is None:
            return
        changes = self.runtime.model_changes()
        if changes != self._changes:
            self._changes, self._changed_at, self._baseline = changes, now, None
            return
        if now - self._changed_at < g.leak_settle:
            return
        if self._baseline is None:
            self._baseline = (rss, now)
            return
        base, since = self._baseline
        if rss - base >= g.leak_growth_mb:
            minutes = (now - since) / 60
            self.leak = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "baseline_mb": round(base, 1),
                "rss_mb": round(rss, 1),
                "growth_mb": round(rss - base, 1),
                "minutes": round(minutes, 1),
            }
            self.leaks += 1
            self.event(
                "leak",
                reason=f"memory grew {rss - base:.0f} MB in {minutes:.1f} min "
                f"with the same models loaded",
            )
            self._baseline = (rss, now)

    def snapshot(self) -> dict[str, Any]:
        base = self._baseline
        return {
            "stuck_after": self.settings.stuck_after,
            "recovered": self.recovered,
            "failures": self.runtime.failure_report(),
            "memory_baseline_mb": None if base is None else round(base[0], 1),
            "suspected_leak": self.leak,
        }
