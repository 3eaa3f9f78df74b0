"""Readings of the device, from psutil and the kernel's own files.

Every reading has a flat name (the names in ``GET /api/governor`` and in trace
files). Each source is read on its own: a source the device lacks is
``unavailable``; one that raises is ``stale`` (its readings dropped, retried at
the next poll). Neither ever stops the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("edgellm.governor")
MB = 1024 * 1024
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a huge number
Readings = dict[str, float | None]


class Unavailable(Exception):
    """The device has no such sensor (not an error)."""


def parse_psi(text: str) -> dict[str, float]:
    """``/proc/pressure/*`` and ``memory.pressure``: some/full avg10 (percent)."""
    out = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        fields = dict(f.split("=", 1) for f in rest.split())
        if "avg10" in fields:
            out[f"{kind}_avg10"] = float(fields["avg10"])
    return out


def cgroup_dir(proc_cgroup: str, root: Path = Path("/sys/fs/cgroup")) -> tuple[int, Path]:
    """This process's memory cgroup: (2, dir) on the unified hierarchy, else (1, dir)."""
    v1 = v2 = None
    for line in proc_cgroup.splitlines():
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and not controllers:
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    if v2 is not None and (root / v2.lstrip("/") / "memory.current").exists():
        return 2, root / v2.lstrip("/")
    if v2 is not None and (root / "unified" / v2.lstrip("/") / "memory.current").exists():
        return 2, root / "unified" / v2.lstrip("/")
    if v1 is not None and (root / "memory" / v1.lstrip("/")).is_dir():
        return 1, root / "memory" / v1.lstrip("/")
    raise Unavailable("no memory cgroup")


def _number(text: str) -> float | None:
    text = text.strip()
    if text == "max":
        return None
    value = int(text)
    return None if value >= UNLIMITED else value


def read_cgroup_memory(version: int, where: Path) -> Readings:
    if version == 2:
        current = _number((where / "memory.current").read_text())
        limit = _number((where / "memory.max").read_text())
        high = (
            _number((where / "memory.high").read_text())
            if (where / "memory.high").exists()
            else None
        )
        events = (
            dict(line.split() for line in (where / "memory.events").read_text().splitlines())
            if (where / "memory.events").exists()
            else {}
        )
        oom = float(events.get("oom_kill", 0))
        pressure = (
            parse_psi((where / "memory.pressure").read_text())
            if (where / "memory.pressure").exists()
            else {}
        )
    else:
        current = _number((where / "memory.usage_in_bytes").read_text())
        limit = _number((where / "memory.limit_in_bytes").read_text())
        high, oom, pressure = None, None, {}
        control = where / "memory.oom_control"
        if control.exists():
            oom = float(
                dict(line.split() for line in control.read_text().splitlines()).get("oom_kill", 0)
            )
    # The working set, as kubelet counts it: usage less inactive file cache, which the
    # kernel reclaims before it would OOM-kill anything (reading a model fills the cache).
    stat_file = where / "memory.stat"
    stat = (
        dict(line.split()[:2] for line in stat_file.read_text().splitlines())
        if stat_file.exists()
        else {}
    )
    inactive = stat.get(
        "inactive_file" if version == 2 else "total_inactive_file", stat.get("inactive_file", "0")
    )
    working = None if current is None else max(0, current - int(inactive))
    bound = min(b for b in (limit, high, float("inf")) if b is not None)
    return {
        "cgroup_memory_current_mb": None if current is None else current / MB,
        "cgroup_memory_working_set_mb": None if working is None else working / MB,
        "cgroup_memory_max_mb": None if limit is None else limit / MB,
        "cgroup_memory_high_mb": None if high is None else high / MB,
        "cgroup_memory_used_pct": None
        if working is None or bound == float("inf")
        else 100.0 * working / bound,
        "cgroup_oom_kills": oom,
        "cgroup_psi_memory_some_avg10": pressure.get("some_avg10"),
    }


def read_thermal_zones(root: Path = Path("/sys/class/thermal")) -> list[dict[str, Any]]:
    """Zones with their passive/critical trip points (ARM boards have no psutil marks)."""
    zones = []
    for zone in sorted(root.glob("thermal_zone*")):
        try:
            temp = int((zone / "temp").read_text()) / 1000
        except (OSError, ValueError):
            continue
        trips: dict[str, float] = {}
        for trip in zone.glob("trip_point_*_type"):
            kind = trip.read_text().strip()
            value = Path(str(trip).replace("_type", "_temp"))
            with contextlib.suppress(OSError, ValueError):
                trips.setdefault(kind, int(value.read_text()) / 1000)
        zones.append(
            {
                "label": (zone / "type").read_text().strip()
                if (zone / "type").exists()
                else zone.name,
                "current": temp,
                "high": trips.get("passive") or trips.get("hot"),
                "critical": trips.get("critical"),
            }
        )
    return zones


def hottest(sensors: list[dict[str, Any]]) -> Readings:
    """The sensor closest to its own high mark (or hottest, when none has marks)."""
    if not sensors:
        raise Unavailable("no temperature sensors")

    def headroom(s: dict[str, Any]) -> float:
        return (s["high"] or 85.0) - s["current"]

    worst = min(sensors, key=headroom)
    return {
        "temp_c": worst["current"],
        "temp_high_c": worst["high"],
        "temp_critical_c": worst["critical"],
    }


def _rss_anon_mb(status: Path = Path("/proc/self/status")) -> float | None:
    """Anonymous resident memory (heap, KV caches), without mapped model files."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class SystemSensors:
    """The real device. ``read()`` returns every reading and notes each source's
    status in ``status``."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.status: dict[str, str] = {}
        psutil.cpu_percent(None)  # the first call only sets the baseline
        self.sources: dict[str, Callable[[], Readings]] = {
            "memory": self._memory,
            "cgroup": self._cgroup,
            "pressure": self._pressure,
            "cpu": self._cpu,
            "temperature": self._temperature,
            "battery": self._battery,
            "gpu": self._gpu,
        }
        self._nvml: Any = None

    def read(self) -> Readings:
        out: Readings = {}
        for name, source in self.sources.items():
            try:
                out.update(source())
                self.status[name] = "ok"
            except Unavailable:
                self.status[name] = "unavailable"
            except Exception as exc:  # a sensor that fails is retried, never fatal
                if self.status.get(name) != "stale":
                    log.warning("event=sensor_stale source=%s error=%r", name, exc)
                self.status[name] = "stale"
        return out

    def _memory(self) -> Readings:
        vm, swap = psutil.virtual_memory(), psutil.swap_memory()
        return {
            "mem_available_mb": vm.available / MB,
            "mem_total_mb": vm.total / MB,
            "mem_available_pct": 100.0 * vm.available / vm.total,
            "swap_used_pct": swap.percent if swap.total else None,
            "rss_mb": self.process.memory_info().rss / MB,
            "rss_anon_mb": _rss_anon_mb(),
        }

    def _cgroup(self) -> Readings:
        version, where = cgroup_dir(Path("/proc/self/cgroup").read_text())
        return read_cgroup_memory(version, where)

    def _pressure(self) -> Readings:
        out: Readings = {}
        for kind in ("memory", "cpu", "io"):
            path = Path(f"/proc/pressure/{kind}")
            if not path.exists():
                raise Unavailable("no pressure stall information")
            psi = parse_psi(path.read_text())
            out[f"psi_{kind}_some_avg10"] = psi.get("some_avg10")
            if kind != "cpu":
                out[f"psi_{kind}_full_avg10"] = psi.get("full_avg10")
        return out

    def _cpu(self) -> Readings:
        freq = psutil.cpu_freq()
        return {
            "cpu_pct": psutil.cpu_percent(None),
            "cpu_freq_mhz": freq.current if freq else None,
            "load_avg_1m": os.getloadavg()[0],
        }

    def _temperature(self) -> Readings:
        sensors = [
            {
                "label": f"{chip}/{t.label or i}",
                "current": t.current,
                "high": t.high,
                "critical": t.critical,
            }
            for chip, temps in (psutil.sensors_temperatures() or {}).items()
            for i, t in enumerate(temps)
        ]
        if not sensors or all(s["high"] is None for s in sensors):
            zones = read_thermal_zones()
            sensors = zones or sensors
        return hottest(sensors)

    def _battery(self) -> Readings:
        battery = psutil.sensors_battery()
        if battery is None:
            raise Unavailable("no battery")
        return {
            "battery_pct": battery.percent,
            "on_ac": None if battery.power_plugged is None else float(battery.power_plugged),
        }

    def _gpu(self) -> Readings:
        if self._nvml is None:
            try:
                import pynvml  # the optional nvidia-ml-py

                pynvml.nvmlInit()
            except Exception:
                raise Unavailable("no NVML") from None
            self._nvml = pynvml
        nv = self._nvml
        handle = nv.nvmlDeviceGetHandleByIndex(0)
        mem = nv.nvmlDeviceGetMemoryInfo(handle)
        return {
            "gpu_mem_used_pct": 100.0 * mem.used / mem.total,
            "gpu_temp_c": float(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)),
            "gpu_util_pct": float(nv.nvmlDeviceGetUtilizationRates(handle).gpu),
        }
