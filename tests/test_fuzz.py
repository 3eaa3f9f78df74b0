"""The fuzzer in the suite: a fixed seed, about a minute, as root and as a user with no
grants. Any 5xx (but a documented 503 with Retry-After), hang, dropped connection or
daemon exit fails, printing the shrunk request that reproduces it. ``bench/fuzz.py``
runs it longer."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzzing import run

from conftest import MODEL, Daemon, as_user, public_socket, unix_users

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating users needs root")
FUZZER = "edgt-fuzzer"
SECONDS = 7  # per principal


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[Daemon]:
    with unix_users(FUZZER):
        d = public_socket(
            Daemon(
                tmp_path_factory.mktemp("fuzz"),
                model_file,
                socket_mode="0666",
                max_queue=8,
                log_level="INFO",
                idle_timeout="2s",
            ),
            "fuzz",
        )
        d.start()
        with d.http() as h:
            assert h.put("/api/data/docs/a.txt", content=b"fuzz me").status_code == 201
        yield d
        d.stop()


NAMES = {"model": MODEL, "name": MODEL, "id": "req-0"}


def _report(result: dict[str, Any], who: str) -> str:
    lines = [
        f"{who}: {result['cases']} cases in {result['seconds']}s, statuses "
        f"{json.dumps(result['statuses'], sort_keys=True)}"
    ]
    for f in result["failures"]:
        lines.append(f"  {f['problem']}\n    reproduce: {f['reproducer']}")
    return "\n".join(lines)


@pytest.mark.parametrize("who", ["root", FUZZER])
def test_fuzzing_every_route_finds_no_5xx_hang_or_drop(fuzzed: Daemon, who: str) -> None:
    def go() -> dict[str, Any]:
        return run(
            str(fuzzed.socket),
            seed=20261201 + len(who),
            count=100_000,
            names=NAMES,
            as_root=who == "root",
            seconds=SECONDS,
        )

    result = go() if who == "root" else as_user(who, go)
    assert "exception" not in result, result
    report = _report(result, who)
    print(report)
    assert not result["failures"], report
    assert fuzzed.alive(), fuzzed.log_text()[-3000:]
    assert result["cases"] > 200, report
    with fuzzed.http() as h:
        assert h.get("/health").status_code == 200
        assert (
            h.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
            ).status_code
            == 200
        )
    assert "Traceback" not in fuzzed.log_text(), fuzzed.log_text()[-5000:]
