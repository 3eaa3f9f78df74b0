"""The governor: the policy on synthetic readings, the kernel files it parses, and a
real daemon under replayed traces (heat, a memory squeeze) and operator pins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgellm.errors import InvalidRequest
from edgellm.governor.policy import LEVELS, Policy, Signal
from edgellm.governor.sensors import (
    SystemSensors,
    cgroup_dir,
    parse_psi,
    read_cgroup_memory,
    read_thermal_zones,
)
from edgellm.governor.trace import TraceSensors, load_trace

from conftest import MODEL, Daemon, wait_for

MEMORY = Signal("mem_available_pct", 15, 10, 5, margin=2, higher_is_worse=False, unit="%")
HEAT = Signal("temp_c", 70, 80, 90, margin=3, unit="°C", describe="temperature")


def run(policy: Policy, signal: Signal, values: list[float], step: float = 1.0) -> list[str]:
    return [
        LEVELS[policy.evaluate({"s": signal}, {signal.reading: v}, i * step).level]
        for i, v in enumerate(values)
    ]


def test_every_level_up_at_once_and_down_after_the_hold() -> None:
    levels = run(Policy(hold=2), MEMORY, [50, 14, 9, 4, 4, 6, 8, 8, 8, 13, 13, 13, 30, 30, 30])
    assert levels == [
        "normal",
        "elevated",
        "throttled",
        "critical",  # entered at once
        "critical",
        "critical",  # 6 is not past 5 + margin 2
        "critical",
        "critical",
        "throttled",  # 8 held for 2 s
        "throttled",
        "throttled",
        "elevated",
        "elevated",
        "elevated",
        "normal",
    ]


def test_noise_around_a_threshold_does_not_flap() -> None:
    noisy = [81, 79, 81, 78.5, 80.5, 79, 81, 78, 80.2, 79.5] * 3
    levels = run(Policy(hold=3), HEAT, noisy)
    assert set(levels) == {"throttled"}  # never under 80 - 3 for long enough
    cooled = run(Policy(hold=3), HEAT, [85, 76, 76, 76, 76, 60, 60, 60, 60])
    assert cooled == [
        "throttled",
        "throttled",
        "throttled",
        "throttled",
        "elevated",
        "elevated",
        "elevated",
        "elevated",
        "normal",
    ]


def test_the_highest_signal_names_the_level_and_missing_readings_do_not_count() -> None:
    policy = Policy(hold=0)
    verdict = policy.evaluate(
        {"memory": MEMORY, "temperature": HEAT}, {"mem_available_pct": 12.0, "temp_c": 91.0}, 0
    )
    assert verdict.name == "critical" and verdict.signal == "temperature"
    assert verdict.reason == "temperature critical (temp_c 91°C)"
    verdict = policy.evaluate(
        {"memory": MEMORY, "temperature": HEAT}, {"mem_available_pct": 12.0}, 1
    )
    assert verdict.name == "elevated" and verdict.signals["temperature"]["level"] == "unavailable"


def test_pressure_and_cgroup_files(tmp_path: Path) -> None:
    # this machine's own files
    for kind in ("memory", "cpu", "io"):
        psi = parse_psi(Path(f"/proc/pressure/{kind}").read_text())
        assert 0 <= psi["some_avg10"] <= 100
    version, where = cgroup_dir(Path("/proc/self/cgroup").read_text())
    assert where.is_dir()
    own = read_cgroup_memory(version, where)
    assert own["cgroup_memory_current_mb"] and own["cgroup_memory_current_mb"] > 1
    # a recorded sample from a systemd service with MemoryMax=2G (cgroup v2)
    assert parse_psi(
        "some avg10=12.50 avg60=3.00 avg300=1.00 total=5\n"
        "full avg10=4.25 avg60=1.00 avg300=0.20 total=2\n"
    ) == {"some_avg10": 12.5, "full_avg10": 4.25}
    unit = tmp_path / "system.slice" / "edgellm.service"
    unit.mkdir(parents=True)
    (unit / "memory.current").write_text(f"{1800 * 2**20}\n")
    (unit / "memory.max").write_text(f"{2048 * 2**20}\n")
    (unit / "memory.high").write_text("max\n")
    (unit / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (unit / "memory.stat").write_text(
        f"anon {1200 * 2**20}\nfile {600 * 2**20}\n"
        f"active_file {300 * 2**20}\n"
        f"inactive_file {200 * 2**20}\n"
    )
    (unit / "memory.pressure").write_text(
        "some avg10=31.00 avg60=8 avg300=2 total=9\nfull avg10=20.00 avg60=5 avg300=1 total=4\n"
    )
    version, where = cgroup_dir("0::/system.slice/edgellm.service\n", root=tmp_path)
    assert (version, where) == (2, unit)
    assert read_cgroup_memory(2, where) == {
        "cgroup_memory_current_mb": 1800.0,
        "cgroup_memory_working_set_mb": 1600.0,
        "cgroup_memory_max_mb": 2048.0,
        "cgroup_memory_high_mb": None,
        "cgroup_memory_used_pct": pytest.approx(78.125),  # the working set: less the cache
        "cgroup_oom_kills": 1.0,
        "cgroup_psi_memory_some_avg10": 31.0,
    }


def test_thermal_zones_from_a_recorded_board(tmp_path: Path) -> None:
    """A Raspberry-class board: one zone, trip points, no psutil high mark."""
    zone = tmp_path / "thermal_zone0"
    zone.mkdir()
    for name, text in {
        "type": "cpu-thermal",
        "temp": "71540",
        "trip_point_0_type": "passive",
        "trip_point_0_temp": "80000",
        "trip_point_1_type": "critical",
        "trip_point_1_temp": "90000",
    }.items():
        (zone / name).write_text(text + "\n")
    assert read_thermal_zones(tmp_path) == [
        {"label": "cpu-thermal", "current": 71.54, "high": 80.0, "critical": 90.0}
    ]


def test_sensors_this_machine_lacks_are_unavailable_not_errors() -> None:
    sensors = SystemSensors()
    readings = sensors.read()
    assert 0 < readings["mem_available_pct"] <= 100
    assert set(sensors.status.values()) <= {"ok", "unavailable"}
    assert sensors.status["memory"] == "ok" and sensors.status["battery"] in ("ok", "unavailable")


def test_a_trace_replays_by_time_and_bad_lines_are_named(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"t": 0, "temp_c": 50, "temp_high_c": 80}\n# comment\n{"t": 5, "temp_c": 85}\n'
    )
    now = [100.0]
    sensors = TraceSensors(trace, clock=lambda: now[0])
    assert sensors.read() == {"temp_c": 50.0, "temp_high_c": 80.0}
    now[0] = 106
    assert sensors.read() == {"temp_c": 85.0, "temp_high_c": 80.0}
    trace.write_text('{"t": 0, "temp_c": 50}\n{"temp_c": 3}\n')
    with pytest.raises(InvalidRequest, match="line 2: not a trace line"):
        load_trace(trace)


def _trace(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 60, "ignore_eos": True}


def test_a_heat_wave_throttles_then_sheds_then_recovers(make_daemon: Any, tmp_path: Path) -> None:
    base = {"temp_c": 60, "temp_high_c": 80, "temp_critical_c": 95, "mem_available_pct": 60}
    trace = _trace(
        tmp_path / "heat.jsonl",
        [
            {"t": 0, **base},
            {"t": 2, "temp_c": 82},
            {"t": 6, "temp_c": 97},
            {"t": 9, "temp_c": 50},
        ],
    )
    d: Daemon = make_daemon(
        governor={
            "trace": str(trace),
            "poll_interval": "100ms",
            "hold": "1s",
            "throttled_max_tokens": 7,
        }
    )
    with d.http() as h:
        assert h.get("/api/governor").json()["level"] == "normal"
        h.post(f"/api/models/{MODEL}/load")
        assert h.get("/api/ps").json()["models"][0]["n_threads"] == 2
        wait_for(lambda: h.get("/api/governor").json()["level"] == "throttled", timeout=15)
        model = h.get("/api/ps").json()["models"][0]
        assert model["n_threads"] == 1 and model["slot_limit"] == 2  # halved
        capped = h.post("/v1/chat/completions", json=CHAT).json()
        assert capped["usage"]["completion_tokens"] == 7  # throttled_max_tokens
        assert capped["choices"][0]["finish_reason"] == "length"
        wait_for(lambda: h.get("/api/governor").json()["level"] == "critical", timeout=15)
        shed = h.post("/v1/chat/completions", json=CHAT)
        assert shed.status_code == 503 and int(shed.headers["Retry-After"]) == 10
        assert shed.json()["error"]["code"] == "governor_shedding"
        assert shed.json()["error"]["message"] == "governor: temperature critical (temp_c 97°C)"
        assert h.get("/api/ps").json()["models"] == []  # idle, unpinned: unloaded
        wait_for(lambda: h.get("/api/governor").json()["level"] == "normal", timeout=15)
        assert (
            h.post("/v1/chat/completions", json=CHAT).json()["usage"]["completion_tokens"] == 60
        )  # limits restored
        assert h.get("/api/ps").json()["models"][0]["n_threads"] == 2
        status = h.get("/api/governor").json()
        assert [e["level"] for e in status["history"] if e["event"] == "level"] == [
            "throttled",
            "critical",
            "normal",
        ]
        assert status["source"] == f"trace {trace}"
        assert 'edgellm_governor_reading{name="temp_c"} 50.0' in h.get("/metrics").text
    with d.client() as c:
        rows = c.audit(action="governor.level")
        assert [r["resource"] for r in rows] == ["throttled", "critical", "normal"]
        assert c.audit_verify()["ok"]
    assert d.alive()


def test_a_memory_squeeze_evicts_idle_models_and_refuses_a_load(
    make_daemon: Any, tmp_path: Path
) -> None:
    trace = _trace(
        tmp_path / "squeeze.jsonl",
        [
            {"t": 0, "mem_available_pct": 60, "mem_available_mb": 12000},
            {"t": 3, "mem_available_pct": 12, "mem_available_mb": 400},
        ],
    )
    d: Daemon = make_daemon(
        names=(MODEL, "smol-b"),
        memory_reserve_mb=256,
        governor={"trace": str(trace), "poll_interval": "100ms", "elevated_idle_unload": "500ms"},
    )
    with d.http() as h:
        assert h.post(f"/api/models/{MODEL}/load").status_code == 200
        wait_for(lambda: h.get("/api/governor").json()["level"] == "elevated", timeout=15)
        unloads = wait_for(
            lambda: [e for e in h.get("/api/governor").json()["history"] if e["event"] == "unload"],
            timeout=5,
        )
        assert unloads[0]["model"] == MODEL  # idle: unloaded early
        assert h.get("/api/ps").json()["models"] == []
        refused = h.post("/api/models/smol-b/load")
        assert refused.status_code == 503
        message = refused.json()["error"]["message"]
        assert message.startswith("not enough memory to load smol-b")
        assert "memory the governor reads as available" in message


def test_operators_pin_a_level_and_change_thresholds(make_daemon: Any) -> None:
    d: Daemon = make_daemon(governor={"poll_interval": "100ms"})
    with d.http() as h:
        pinned = h.put("/api/governor", json={"pin": "critical"})
        assert pinned.status_code == 200 and pinned.json()["level"] == "critical"
        shed = h.post("/v1/chat/completions", json=CHAT)
        assert shed.status_code == 503
        assert shed.json()["error"]["message"] == "governor: pinned at critical by an operator"
        assert h.put("/api/governor", json={"unpin": True}).json()["level"] == "normal"
        bad = h.put("/api/governor", json={"pin": "panic"})
        assert bad.status_code == 400 and "unknown level 'panic'" in bad.text
        bad = h.put("/api/governor", json={"thresholds": {"memory": {"elevated": "x"}}})
        assert bad.status_code == 400 and "bad thresholds for memory" in bad.text
        polls = h.get("/api/governor").json()["polls"]  # nothing half-applied: it still polls
        wait_for(lambda: h.get("/api/governor").json()["polls"] > polls + 2, timeout=5)
        bad = h.put("/api/governor", json={"nothing": 1})
        assert bad.status_code == 400 and "pin" in bad.text
        # memory "elevated" when less than 99.9% is available: always, here
        changed = h.put(
            "/api/governor",
            json={"thresholds": {"memory": {"elevated": 99.9, "throttled": 1, "critical": 0.5}}},
        )
        assert changed.json()["level"] == "elevated"
        assert changed.json()["signals"]["memory"]["thresholds"]["elevated"] == 99.9
    with d.client() as c:
        assert [r["action"] for r in c.audit()].count("governor.configure") == 6
