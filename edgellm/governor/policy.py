"""Levels from readings, with hysteresis (pure: no I/O, time passed in).

Each signal has three thresholds, one per level above normal (``elevated``,
``throttled``, ``critical``), as Android's thermal status does. A level is entered
as soon as its threshold is crossed, and left only once the signal has stayed on
the safe side of that threshold by ``margin`` for ``hold`` seconds, as kubelet's
pressure transition period does: a noisy signal near a threshold never flaps. The
device's level is the highest signal's, and names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LEVELS = ("normal", "elevated", "throttled", "critical")


@dataclass(frozen=True)
class Signal:
    """How one reading maps to levels. ``higher_is_worse`` False: lower is worse
    (available memory). ``relative_to``: thresholds are offsets from other readings
    (a sensor's own high and critical marks), as temperatures need."""

    reading: str
    elevated: float
    throttled: float
    critical: float
    margin: float
    higher_is_worse: bool = True
    unit: str = ""
    describe: str = ""

    def thresholds(self) -> tuple[float, float, float]:
        return (self.elevated, self.throttled, self.critical)

    def worse(self, value: float, than: float) -> bool:
        return value >= than if self.higher_is_worse else value <= than

    def level_of(self, value: float, margin: float = 0.0) -> int:
        """The level whose threshold ``value`` reaches; with a margin, the threshold
        moved that far towards safety (the exit test)."""
        level = 0
        for i, threshold in enumerate(self.thresholds(), start=1):
            edge = threshold - margin if self.higher_is_worse else threshold + margin
            if self.worse(value, edge):
                level = i
        return level


def temperature_signal(
    reading: str, high: float | None, critical: float | None, below_high: float, margin: float
) -> Signal:
    """Elevated within ``below_high`` °C of the sensor's high mark, throttled at it,
    critical at its critical mark (defaults where the sensor has none)."""
    high = 85.0 if high is None else high
    critical = max(high + 1.0, 95.0 if critical is None else critical)
    return Signal(
        reading, high - below_high, high, critical, margin, unit="°C", describe="temperature"
    )


@dataclass
class SignalState:
    level: int = 0
    safe_since: float | None = None  # when it last came back past the exit edge
    value: float | None = None


@dataclass
class Verdict:
    level: int
    reason: str
    signals: dict[str, dict[str, Any]] = field(default_factory=dict)
    signal: str | None = None  # the one that set the level

    @property
    def name(self) -> str:
        return LEVELS[self.level]


class Policy:
    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.states: dict[str, SignalState] = {}

    def evaluate(
        self, signals: dict[str, Signal], readings: dict[str, float | None], now: float
    ) -> Verdict:
        out: dict[str, dict[str, Any]] = {}
        worst, reason, worst_name = 0, "all signals normal", None
        for name, sig in signals.items():
            state = self.states.setdefault(name, SignalState())
            value = readings.get(sig.reading)
            if value is None:  # unavailable or stale: it cannot raise the level
                state.level, state.safe_since, state.value = 0, None, None
                out[name] = {"level": "unavailable", "value": None}
                continue
            state.value = value
            entered = sig.level_of(value)
            if entered >= state.level:
                state.level, state.safe_since = entered, None
            elif sig.level_of(value, sig.margin) < state.level:  # past the exit edge
                if state.safe_since is None:
                    state.safe_since = now
                if now - state.safe_since >= self.hold:
                    state.level = max(entered, sig.level_of(value, sig.margin))
                    state.safe_since = None if state.level == entered else now
            else:
                state.safe_since = None
            out[name] = {
                "level": LEVELS[state.level],
                "value": value,
                "thresholds": dict(zip(LEVELS[1:], sig.thresholds(), strict=True)),
                "leaving_in": None
                if state.safe_since is None
                else round(max(0.0, self.hold - (now - state.safe_since)), 2),
            }
            if state.level > worst:
                worst, worst_name = state.level, name
                reason = (
                    f"{sig.describe or name} {LEVELS[state.level]} "
                    f"({sig.reading} {value:g}{sig.unit})"
                )
        return Verdict(worst, reason, out, worst_name)
