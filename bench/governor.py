"""The governor: how fast it reacts to a threshold crossing, and whether it keeps a
memory-limited daemon clear of the OOM killer.

    .venv/bin/python bench/governor.py          # about 3 minutes; the squeeze needs root

Reaction: a daemon replays a heat trace that crosses into critical and back, again
and again; a client asks /api/governor as fast as it can and notes, in the trace's
own clock, when shedding is in force (the governor publishes limits only once the
runtime has them). Reaction = that moment minus the crossing's time in the trace.
Crossings fall at random phases of the poll cycle, so delays spread over it. Ratios
are against the poll interval (the target: within one poll).

Squeeze: the daemon runs in a memory cgroup of its own (cgroup v1 or v2, created
here) with a limit that holds two copies of the default model but not three; clients
load three, one after another. Once with the governor (it
reads the cgroup's limit and usage, so the fit check counts on what is really
left), once without it (the baseline: the fit check sees only system memory). Then two
completions per model, all at once. OOM kills are read from the cgroup's own counter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import MODEL, EdgeDaemon, percentile, table  # noqa: E402

from edgellm.governor.sensors import read_cgroup_memory  # noqa: E402

HOT = {"temp_c": 97}
COOL = {"temp_c": 50}


# --- reaction time ------------------------------------------------------------------------
def reaction(poll: float, crossings: int) -> dict[str, Any]:
    phase = max(1.0, 4 * poll)
    start = 2.0
    lines = [
        {"t": 0, "temp_c": 50, "temp_high_c": 80, "temp_critical_c": 95, "mem_available_pct": 60}
    ]
    ups = []
    jitter = random.Random(42)  # crossings at random phases of the poll cycle
    for k in range(crossings):
        up = round(start + 2 * k * phase + jitter.uniform(0, poll), 3)
        ups.append(up)
        lines += [{"t": up, **HOT}, {"t": up + phase, **COOL}]
    root = Path(os.environ.get("TMPDIR", "/tmp"))
    trace = root / f"edgellm-bench-heat-{os.getpid()}-{poll}.jsonl"
    trace.write_text("".join(json.dumps(line) + "\n" for line in lines))
    daemon = EdgeDaemon(governor={"trace": str(trace), "poll_interval": poll, "hold": 0})
    observations: list[tuple[float, bool]] = []
    try:
        with daemon.http() as h:
            end = ups[-1] + phase + 0.5
            while True:
                status = h.get("/api/governor").json()
                t = status["trace_seconds"]
                observations.append((t, status["limits"]["shed"] is not None))
                if t > end:
                    break
    finally:
        daemon.stop()
        trace.unlink()
    delays = []
    for up in ups:
        seen = next((t for t, shed in observations if t >= up and shed), None)
        if seen is not None:
            delays.append(seen - up)
    gaps = [b[0] - a[0] for a, b in zip(observations, observations[1:], strict=False)]
    return {
        "poll_s": poll,
        "crossings": len(ups),
        "reacted": len(delays),
        "p50_ms": percentile(delays, 0.5) * 1000,
        "max_ms": max(delays) * 1000,
        "max_x_poll": max(delays) / poll,
        "client_resolution_ms": percentile(gaps, 0.5) * 1000,
    }


# --- the squeeze --------------------------------------------------------------------------
class Cgroup:
    """A memory cgroup of our own, v2 or v1, removed afterwards."""

    def __init__(self, limit_mb: int) -> None:
        name = f"edgellm-bench-{os.getpid()}"
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.exists() and "memory" in v2.read_text().split():
            self.path, self.v2 = Path("/sys/fs/cgroup") / name, True
        else:
            self.path, self.v2 = Path("/sys/fs/cgroup/memory") / name, False
        self.path.mkdir()
        limit = str(limit_mb * 2**20)
        if self.v2:
            (self.path / "memory.max").write_text(limit)
            (self.path / "memory.swap.max").write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(limit)
            with contextlib.suppress(OSError):  # no swap either, where swap is accounted
                (self.path / "memory.memsw.limit_in_bytes").write_text(limit)

    def oom_kills(self) -> int:
        """The kernel's own count, read as the governor reads it."""
        return int(read_cgroup_memory(2 if self.v2 else 1, self.path)["cgroup_oom_kills"] or 0)

    def peak_mb(self) -> float | None:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        path = self.path / name
        return int(path.read_text()) / 2**20 if path.exists() else None

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def squeeze(governor: bool, limit_mb: int) -> dict[str, Any]:
    names = ("a", "b", "c")
    cgroup = Cgroup(limit_mb)
    daemon = EdgeDaemon(
        names=names,
        cgroup=cgroup.path,
        memory_reserve_mb=64,
        n_ctx=1024,
        n_parallel=4,
        max_loaded_models=3,
        governor={"enabled": governor, "poll_interval": 0.25},
    )
    loads: list[str] = []
    outcomes: list[str] = []
    try:
        with daemon.http(timeout=120) as h:
            for name in names:
                try:
                    r = h.post(f"/api/models/{name}/load")
                    loads.append(f"{name}:{r.status_code}")
                except Exception:
                    loads.append(f"{name}:lost")
                time.sleep(1)  # let the governor poll the new usage

            def ask(model: str) -> None:
                try:
                    with daemon.http(timeout=120) as c:
                        r = c.post(
                            "/v1/completions",
                            json={
                                "model": model,
                                "prompt": "Counting: 1, 2, 3,",
                                "max_tokens": 64,
                                "temperature": 0,
                            },
                        )
                    outcomes.append(
                        "200"
                        if r.status_code == 200
                        else f"{r.status_code} {r.json()['error']['code']}"
                    )
                except Exception:
                    outcomes.append("lost")

            clients = [threading.Thread(target=ask, args=(m,)) for m in names * 2]
            for t in clients:
                t.start()
            for t in clients:
                t.join()
        alive = daemon.proc.poll() is None
    finally:
        daemon.stop()
        kills, peak = cgroup.oom_kills(), cgroup.peak_mb()
        cgroup.remove()
    counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
    return {
        "governor": "on" if governor else "off (baseline)",
        "limit_mb": limit_mb,
        "loads": " ".join(loads),
        "requests": ", ".join(f"{n}× {o}" for o, n in counts.items()),
        "peak_mb": peak,
        "oom_kills": kills,
        "daemon_alive": alive,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--polls", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--crossings", type=int, default=5)
    ap.add_argument("--limit-mb", type=int, default=500)
    ap.add_argument("--json", default="bench/results/governor.json")
    args = ap.parse_args()
    rows = [reaction(p, args.crossings) for p in args.polls]
    print(f"reaction: trace crossing into critical -> shedding in force; model {MODEL}\n")
    print(
        table(
            rows,
            [
                ("poll_s", "poll s"),
                ("crossings", "crossings"),
                ("reacted", "reacted"),
                ("p50_ms", "p50 ms"),
                ("max_ms", "max ms"),
                ("max_x_poll", "max ×poll"),
                ("client_resolution_ms", "client resolution ms"),
            ],
        )
    )
    squeezed: list[dict[str, Any]] = []
    if os.geteuid() == 0:
        squeezed = [squeeze(True, args.limit_mb), squeeze(False, args.limit_mb)]
        print(f"\nsqueeze: three models asked into a {args.limit_mb} MB memory cgroup\n")
        print(
            table(
                squeezed,
                [
                    ("governor", "governor"),
                    ("limit_mb", "limit MB"),
                    ("loads", "loads (model:status)"),
                    ("requests", "requests (two per model)"),
                    ("peak_mb", "peak MB"),
                    ("oom_kills", "OOM kills"),
                    ("daemon_alive", "daemon alive"),
                ],
            )
        )
    else:
        print("\nsqueeze: skipped, creating a memory cgroup needs root")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"reaction": rows, "squeeze": squeezed}, indent=2))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
