"""What the TUI fetches from the daemon, and how it says what went wrong.

Everything here runs in worker threads through the ordinary Client: the TUI never
imports the runtime. Errors become one line for the operator, never a traceback.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from edgellm.client import Client, DaemonUnavailable
from edgellm.errors import EdgeError, PermissionDenied

LEVEL_STYLES = {
    "normal": "green",
    "elevated": "yellow",
    "throttled": "dark_orange",
    "critical": "red",
}
HISTORY = 120  # samples kept for the sparklines: two minutes at one a second


@dataclass
class Snapshot:
    """One poll of the daemon: what every screen shows."""

    health: dict[str, Any] = field(default_factory=dict)
    governor: dict[str, Any] | None = None  # None: not offered, or not permitted
    loaded: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] | None = None
    whoami: dict[str, Any] = field(default_factory=dict)
    taken: float = field(default_factory=time.monotonic)


def optional(call: Any, *args: Any, **kw: Any) -> Any:
    """Call the daemon; None where this user may not, or the daemon does not offer it."""
    try:
        return call(*args, **kw)
    except PermissionDenied:
        return None
    except EdgeError as exc:
        if exc.status == 404:
            return None
        raise


def take_snapshot(client: Client, whoami: dict[str, Any] | None = None) -> Snapshot:
    return Snapshot(
        health=client.health(),
        governor=optional(client.governor),
        loaded=optional(client.ps) or [],
        requests=optional(client.requests),
        whoami=whoami if whoami is not None else client.whoami(),
    )


def problem(exc: Exception) -> str:
    """The panel's text when the daemon cannot be reached or used."""
    if isinstance(exc, DaemonUnavailable):
        return exc.message
    if isinstance(exc, EdgeError) and exc.code == "shutting_down":
        return "the daemon is restarting or shutting down; waiting for it to come back"
    if isinstance(exc, EdgeError):
        return exc.message
    return f"unexpected error talking to the daemon: {exc}"


def role_summary(whoami: dict[str, Any]) -> str:
    roles = whoami.get("roles") or {}
    who = whoami.get("user") or f"uid {whoami.get('uid')}"
    return f"{who} ({', '.join(sorted(roles)) or 'no role'})"


def can(whoami: dict[str, Any], *roles: str) -> bool:
    held = set(whoami.get("roles") or {})
    return "admin" in held or bool(held & set(roles))


class Series:
    """A reading's recent history, for a sparkline."""

    def __init__(self) -> None:
        self.values: deque[float] = deque(maxlen=HISTORY)

    def add(self, value: Any) -> None:
        if isinstance(value, int | float):
            self.values.append(float(value))

    @property
    def last(self) -> float | None:
        return self.values[-1] if self.values else None


def mb(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f} MB"


def ago(seconds: Any) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"
