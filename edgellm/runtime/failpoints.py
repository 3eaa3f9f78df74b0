"""Failpoints: faults injected at named places, to rehearse what the watch recovers from.

``EDGELLM_FAILPOINTS="engine.decode=hang@20"`` makes the 21st decode step of any
engine hang for good; ``raise@0*3`` makes the next three raise. Syntax, per entry
(``;`` between entries): ``NAME=ACTION[@SKIP][*TIMES]`` where ACTION is ``hang`` or
``raise``, SKIP the hits to let pass first (0) and TIMES how many hits then fail (1).
Unset, a failpoint costs one dictionary lookup.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

from edgellm.errors import ConfigError

log = logging.getLogger("edgellm.failpoints")
ENTRY = re.compile(
    r"^(?P<name>[\w.]+)=(?P<action>hang|raise)(?:@(?P<skip>\d+))?"
    r"(?:\*(?P<times>\d+))?$"
)


class FailpointError(RuntimeError):
    pass


@dataclass
class _Point:
    action: str
    skip: int
    times: int


_points: dict[str, _Point] = {}
_lock = threading.Lock()
_never = threading.Event()  # what a hang waits on


def configure(spec: str | None) -> None:
    """Arm failpoints from a spec string (replacing any armed before)."""
    points = {}
    for entry in filter(None, (e.strip() for e in (spec or "").split(";"))):
        m = ENTRY.match(entry)
        if m is None:
            raise ConfigError(
                f"EDGELLM_FAILPOINTS: bad failpoint {entry!r}: expected "
                "NAME=hang|raise[@SKIP][*TIMES]"
            )
        points[m["name"]] = _Point(m["action"], int(m["skip"] or 0), int(m["times"] or 1))
        log.warning("event=failpoint_armed %s", entry)
    with _lock:
        _points.clear()
        _points.update(points)


def hit(name: str) -> None:
    """Called at the named place; fails there if the failpoint is armed and due."""
    if not _points:
        return
    with _lock:
        point = _points.get(name)
        if point is None:
            return
        if point.skip:
            point.skip -= 1
            return
        point.times -= 1
        if point.times <= 0:
            del _points[name]
    log.warning("event=failpoint_fired name=%s action=%s", name, point.action)
    if point.action == "hang":
        _never.wait()
    raise FailpointError(f"failpoint {name} fired")
