"""The dashboard: health and the governor's level at a glance, readings over the last
two minutes, the queue, and the models loaded."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Static

from edgellm.tui.data import LEVEL_STYLES, Series, Snapshot, ago, mb, role_summary
from edgellm.tui.widgets import Gauge, Pane, Table

GAUGES = [  # (reading, title, unit, top of the scale)
    ("mem_used_pct", "Memory used", "%", 100.0),
    ("cpu_pct", "CPU", "%", 100.0),
    ("psi_memory_some_avg10", "Memory pressure", "%", 100.0),
    ("temp_c", "Temperature", "°C", 100.0),
]


UNITS = {"tokens": "tok/s", "rows": "rows/s"}


class Dashboard(Pane):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.series = {name: Series() for name, *_ in GAUGES}

    def compose(self) -> ComposeResult:
        yield Static("connecting…", id="health")
        yield Static("", id="governor-reason")
        with Horizontal(id="gauges-1", classes="gauges"):
            for name, title, unit, high in GAUGES[:2]:
                yield Gauge(title, unit, high, id=f"gauge-{name}")
        with Horizontal(id="gauges-2", classes="gauges"):
            for name, title, unit, high in GAUGES[2:]:
                yield Gauge(title, unit, high, id=f"gauge-{name}")
        yield Static("", id="load")
        yield Table(
            [
                ("name", "Loaded model"),
                ("memory", "Memory"),
                ("slots", "Slots busy"),
                ("rate", "Rate"),
                ("device", "Device"),
                ("idle", "Idle"),
                ("expires", "Unloads in"),
            ],
            id="loaded",
        )

    def on_snapshot(self, snap: Snapshot) -> None:
        h, gov = snap.health, snap.governor
        level = gov["level"] if gov else "unknown"
        style = LEVEL_STYLES.get(level, "white")
        self.query_one("#health", Static).update(
            f"[b]edgellm {h.get('version', '')}[/b]  {h.get('status', '?')}   governor "
            f"[b {style}]{level.upper()}[/]   {role_summary(snap.whoami)}"
        )
        reason = gov.get("reason") if gov else "the governor is off, or not yours to see"
        pinned = f" (pinned by an operator: {gov['pinned']})" if gov and gov.get("pinned") else ""
        self.query_one("#governor-reason", Static).update(f"[{style}]{reason}{pinned}[/]")
        readings = dict(gov.get("readings", {})) if gov else {}
        if readings.get("mem_available_pct") is not None:
            readings["mem_used_pct"] = 100 - readings["mem_available_pct"]
        for name, *_ in GAUGES:
            self.series[name].add(readings.get(name))
            self.query_one(f"#gauge-{name}", Gauge).show(list(self.series[name].values))
        busy = sum(m["slots_busy"] for m in snap.loaded)
        slots = sum(m["slot_limit"] for m in snap.loaded)
        tokens = sum(m["rate_per_second"] for m in snap.loaded if m["rate_unit"] == "tokens")
        queued = sum(m["queued"] for m in snap.loaded)
        running = len(snap.requests) if snap.requests is not None else "-"
        self.query_one("#load", Static).update(
            f"requests {running}   queued {queued}   busy slots {busy}/{slots}   "
            f"{tokens:.1f} tok/s   rss {mb(readings.get('rss_mb'))}"
        )
        self.query_one("#loaded", Table).show(
            [
                {
                    "name": m["name"] + (" (pinned)" if m["pinned"] else ""),
                    "key": m["name"],
                    "memory": mb(m["memory_mb"]),
                    "slots": f"{m['slots_busy']}/{m['slot_limit']}",
                    "rate": f"{m['rate_per_second']:g} {UNITS.get(m['rate_unit'], '')}",
                    "device": m["device"],
                    "idle": ago(m["idle_seconds"]),
                    "expires": ago(m["expires_in_seconds"]),
                }
                for m in snap.loaded
            ],
            key="key",
        )
