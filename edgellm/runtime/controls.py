"""The narrow interface the governor (and the stability watch, and the systemd
watchdog) act on the runtime through: limits in, a few actions, a few readings. The
runtime's ``Runtime`` implements it; nothing outside the runtime reaches an engine."""

from __future__ import annotations

from typing import Any, Protocol

from edgellm.runtime.types import Limits


class RuntimeControls(Protocol):
    def apply_limits(self, limits: Limits) -> None:
        """Threads, slots, token caps, shedding and free memory, from the next step on."""
        ...

    def unload_idle(self, idle_for: float) -> list[str]:
        """Unload unpinned models idle for ``idle_for`` seconds; the names unloaded."""
        ...

    def cancel_newest(self) -> str | None:
        """Cancel the newest running request; its id."""
        ...

    def stalled_models(self, after: float) -> list[str]:
        """Models busy without progress for ``after`` seconds, or whose engine died."""
        ...

    def recover(self, name: str, reason: str) -> bool:
        """End a stuck or dead engine's requests and unload it, to be loaded again."""
        ...

    def model_changes(self) -> int:
        """A counter of loads and unloads (memory growth across one is not a leak)."""
        ...

    def failure_report(self) -> dict[str, dict[str, Any]]:
        """Models that failed recently: how often, why, and any back-off left."""
        ...
