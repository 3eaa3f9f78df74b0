"""The governor: poll the sensors, decide the level, act through the runtime's limits.

    normal     the configured limits
    elevated   idle models unloaded early (loads that do not fit are refused; busy
               models are never evicted, at any level)
    throttled  fewer threads and slots, a lower max_tokens cap, and for heat a
               tokens-per-second duty cycle, so the device cools while it answers
    critical   new requests shed with 503 naming the reason; the newest running
               generation cancelled at each poll; every idle unpinned model unloaded

Each poll also runs the stability watch (watch.py): stuck or dead engines recovered,
suspected leaks reported. It runs on its own thread. The runtime is reached only
through ``RuntimeControls`` (runtime/controls.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any, Protocol

from edgellm.config import GovernorSettings
from edgellm.errors import InvalidRequest
from edgellm.governor.policy import LEVELS, Policy, Signal, Verdict, temperature_signal
from edgellm.governor.sensors import Readings
from edgellm.governor.trace import TraceSensors
from edgellm.governor.watch import StabilityWatch
from edgellm.runtime.controls import RuntimeControls
from edgellm.runtime.types import Limits

log = logging.getLogger("edgellm.governor")
HEAT = {"temperature", "gpu_temperature"}


class Sensors(Protocol):
    status: dict[str, str]

    def read(self) -> Readings: ...


class Governor:
    def __init__(
        self,
        settings: GovernorSettings,
        runtime: RuntimeControls,
        sensors: Sensors,
        record: Callable[..., None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.sensors = sensors
        self.record = record  # audits a change (the vault's audit log, when unlocked)
        self.clock = clock
        self.policy = Policy(settings.hold)
        self.pinned: int | None = None
        self.level = 0
        self.verdict = Verdict(0, "not polled yet")
        self.reason = "all signals normal"
        self.readings: Readings = {}
        self.limits = Limits()
        self.history: deque[dict[str, Any]] = deque(maxlen=100)
        self.polls = 0
        self.cancelled = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.watch = StabilityWatch(settings, runtime, self._event)

    # --- the signals ---------------------------------------------------------------------
    def signals(self, readings: Readings) -> dict[str, Signal]:
        g = self.settings
        out = {
            "memory": Signal(
                "mem_available_pct",
                *g.memory.triple(),
                higher_is_worse=False,
                unit="%",
                describe="memory",
            ),
            "cgroup_memory": Signal(
                "cgroup_memory_used_pct",
                *g.cgroup_memory.triple(),
                unit="%",
                describe="cgroup memory",
            ),
            "memory_pressure": Signal(
                "psi_memory_some_avg10",
                *g.memory_pressure.triple(),
                unit="%",
                describe="memory pressure",
            ),
            "temperature": temperature_signal(
                "temp_c",
                readings.get("temp_high_c"),
                readings.get("temp_critical_c"),
                g.temperature_below_high,
                g.temperature_margin,
            ),
            "gpu_temperature": Signal(
                "gpu_temp_c", *g.gpu_temperature.triple(), unit="°C", describe="GPU temperature"
            ),
        }
        return out

    # --- one poll ------------------------------------------------------------------------
    def poll(self) -> Verdict:
        """Read, decide, act; the new level is published once its actions are in
        force, so whoever sees it sees its limits too."""
        now = self.clock()
        readings = self.sensors.read()
        with self._lock:
            verdict = self.policy.evaluate(self.signals(readings), readings, now)
            level = verdict.level if self.pinned is None else self.pinned
            changed = level != self.level
            # the reason a level was entered stays its reason until it is left
            reason = (
                self.reason
                if not changed
                else verdict.reason
                if self.pinned is None
                else f"pinned at {LEVELS[self.pinned]} by an operator"
            )
        if changed:
            self._event("level", level=LEVELS[level], reason=reason)
        self._act(level, reason, verdict, readings)
        self.watch.check(readings, now)
        with self._lock:
            self.level, self.reason = level, reason
            self.readings, self.verdict, self.polls = readings, verdict, self.polls + 1
        return verdict

    def _act(self, level: int, reason: str, verdict: Verdict, readings: Readings) -> None:
        g = self.settings
        limits = Limits(available_mb=_available_mb(readings))
        if level >= 2:
            heat = verdict.signal in HEAT and self.pinned is None
            limits = replace(
                limits,
                thread_fraction=g.throttled_thread_fraction,
                slot_fraction=g.throttled_slot_fraction,
                max_tokens=g.throttled_max_tokens or None,
                tokens_per_second=g.throttled_tokens_per_second if heat else None,
            )
        if level >= 3:
            limits = replace(limits, shed=f"governor: {reason}", retry_after=g.shed_retry_after)
        if _without_memory(limits) != _without_memory(self.limits):
            self._event(
                "limits", **{k: v for k, v in asdict(limits).items() if k != "available_mb"}
            )
        self.runtime.apply_limits(limits)
        self.limits = limits  # shown once in force
        if level >= 1:
            idle_for = 0.0 if level >= 3 else g.elevated_idle_unload
            for name in self.runtime.unload_idle(idle_for):
                self._event("unload", model=name, reason=reason)
        if level >= 3 and (request_id := self.runtime.cancel_newest()):
            self.cancelled += 1
            self._event("cancel", request=request_id, reason=reason)

    def _event(self, kind: str, **detail: Any) -> None:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": kind,
            **detail,
        }
        self.history.append(entry)
        log.log(
            logging.WARNING if kind in ("level", "stuck", "leak") else logging.INFO,
            "event=governor_%s %s",
            kind,
            " ".join(f"{k}={v!r}" for k, v in detail.items()),
        )
        if self.record is not None:
            try:
                self.record(
                    action=f"governor.{kind}",
                    resource=str(
                        detail.get("model")
                        or detail.get("request")
                        or detail.get("level")
                        or "limits"
                    ),
                    decision="allow",
                    finish_reason=str(detail.get("reason", ""))[:200],
                )
            except Exception as exc:  # a locked vault: the daemon's log still has it
                log.debug("event=governor_audit_skipped error=%r", exc)

    # --- the thread ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="governor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # the governor must never take the daemon down
                log.exception("event=governor_poll_failed")
            self._stop.wait(self.settings.poll_interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    # --- operators -----------------------------------------------------------------------
    def configure(
        self,
        pin: str | None = None,
        unpin: bool = False,
        thresholds: dict[str, dict[str, float]] | None = None,
    ) -> None:
        """Pin a level (maintenance), unpin, or change thresholds; takes effect at
        the next poll."""
        if thresholds is not None and not (
            isinstance(thresholds, dict) and all(isinstance(v, dict) for v in thresholds.values())
        ):
            raise InvalidRequest(
                "thresholds must be an object of signals, each an object "
                'of levels: {"memory": {"elevated": 0.8, …}}',
                param="thresholds",
            )
        with self._lock:
            if pin is not None:
                if not isinstance(pin, str) or pin not in LEVELS:
                    raise InvalidRequest(
                        f"unknown level {pin!r}: one of {', '.join(LEVELS)}", param="pin"
                    )
                self.pinned = LEVELS.index(pin)
            if unpin:
                self.pinned = None
            for name, values in (thresholds or {}).items():
                current = getattr(self.settings, name, None)
                if current is None or not hasattr(current, "triple"):
                    raise InvalidRequest(
                        f"no signal {name!r} with thresholds: one of memory, "
                        "cgroup_memory, memory_pressure, gpu_temperature",
                        param="thresholds",
                    )
                try:  # validated whole before anything changes
                    updated = current.__class__(**{**current.model_dump(), **values})
                except Exception as exc:
                    raise InvalidRequest(
                        f"bad thresholds for {name}: {exc}", param="thresholds"
                    ) from None
                setattr(self.settings, name, updated)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            verdict, readings = self.verdict, dict(self.readings)
            level, pinned, reason = self.level, self.pinned, self.reason
        return {
            "level": LEVELS[level],
            "reason": reason,
            "pinned": None if pinned is None else LEVELS[pinned],
            "source": f"trace {self.sensors.path}"
            if isinstance(self.sensors, TraceSensors)
            else "sensors",
            "trace_seconds": round(self.sensors.elapsed(), 3)
            if isinstance(self.sensors, TraceSensors)
            else None,
            "sensors": dict(self.sensors.status),
            "signals": verdict.signals,
            "readings": {
                k: round(v, 2) if isinstance(v, float) else v for k, v in sorted(readings.items())
            },
            "limits": asdict(self.limits),
            "poll_interval": self.settings.poll_interval,
            "polls": self.polls,
            "cancelled": self.cancelled,
            "stability": self.watch.snapshot(),
            "history": list(self.history)[-20:],
        }


def _available_mb(readings: Readings) -> float | None:
    """Free memory as the governor sees it: the system's or the cgroup's, whichever
    is less."""
    options = [readings.get("mem_available_mb")]
    limit = readings.get("cgroup_memory_max_mb")
    current = readings.get("cgroup_memory_working_set_mb", readings.get("cgroup_memory_current_mb"))
    if limit is not None and current is not None:
        options.append(limit - current)
    found = [o for o in options if o is not None]
    return min(found) if found else None


def _without_memory(limits: Limits) -> Limits:
    return replace(limits, available_mb=None)
