"""Per-principal limits: requests in flight and requests a minute, by role, so one
caller (a LAN client with a token, say) cannot starve the device's other users.

A principal's limits are the most generous of those its roles have in ``limits``
(``[limits.client]``…; 0 is no limit), or ``limits.default`` when none of its roles
is listed; admins are unlimited unless ``admin`` is. Over a limit: 429 with
Retry-After (when the oldest request of the minute ages out, or 1 s for in-flight).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from edgellm.config import Limits
from edgellm.errors import TooManyRequests
from edgellm.vault.access import AccessPolicy, Principal

WINDOW = 60.0


def _most_generous(limits: list[Limits]) -> Limits:
    def widest(values: list[int]) -> int:
        return 0 if 0 in values else max(values)

    return Limits(
        max_in_flight=widest([x.max_in_flight for x in limits]),
        per_minute=widest([x.per_minute for x in limits]),
    )


class PrincipalLimits:
    def __init__(self, limits: dict[str, Limits], policy: AccessPolicy | None) -> None:
        self.limits, self.policy = limits, policy
        self._in_flight: dict[str, int] = {}
        self._started: dict[str, deque[float]] = {}
        self.refused = {"in_flight": 0, "per_minute": 0}

    def for_principal(self, p: Principal) -> Limits | None:
        if not self.limits or self.policy is None:
            return None
        held = self.policy.roles(p)
        listed = [self.limits[r] for r in held if r in self.limits]
        if listed:
            return _most_generous(listed)
        if "admin" in held:
            return None
        return self.limits.get("default")

    @contextmanager
    def hold(self, p: Principal) -> Iterator[None]:
        """Count one request of ``p`` while it runs; TooManyRequests over a limit."""
        limit = self.for_principal(p)
        if limit is None:
            yield
            return
        key, now = p.key(), time.monotonic()
        started = self._started.setdefault(key, deque())
        while started and started[0] <= now - WINDOW:
            started.popleft()
        if limit.max_in_flight and self._in_flight.get(key, 0) >= limit.max_in_flight:
            self.refused["in_flight"] += 1
            raise TooManyRequests(
                f"{key} has {limit.max_in_flight} requests in flight, its limit "
                "(max_in_flight); wait for one to finish",
                param="max_in_flight",
                retry_after=1,
            )
        if limit.per_minute and len(started) >= limit.per_minute:
            self.refused["per_minute"] += 1
            wait = max(1.0, started[0] + WINDOW - now)
            raise TooManyRequests(
                f"{key} made {limit.per_minute} requests within a minute, its limit "
                f"(per_minute); try again in {wait:.0f}s",
                param="per_minute",
                retry_after=wait,
            )
        started.append(now)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            yield
        finally:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]
