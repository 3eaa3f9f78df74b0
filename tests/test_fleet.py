"""The fleet recipe in deploy/, run as shipped: two daemons on loopback ports behind
a real HAProxy (Debian's) balancing by least connections, health-checking /health,
retrying a 503 on the other device; and Prometheus scraping both with the fleet's
scrape config. One device is stopped mid-run: every request still succeeds, or gets
a clear 503."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from test_network import free_port, prometheus

from conftest import MODEL, Daemon, wait_for

DEPLOY = Path(__file__).parent.parent / "deploy"
TOKEN = "edg_" + "fleet-client-token-0123456789abcdefghij"
HEALTH = "edg_" + "fleet-health-token-0123456789abcdefghij"


@pytest.fixture(scope="module")
def devices(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[list[Daemon]]:
    started = []
    for i in range(2):
        port = free_port()
        d = Daemon(
            tmp_path_factory.mktemp(f"device{i}"),
            model_file,
            listen=[f"tcp://127.0.0.1:{port}"],
            shutdown_grace="3s",
        ).start()
        d.url = f"127.0.0.1:{port}"
        for name, value, role in (("app", TOKEN, "client"), ("health", HEALTH, "scraper")):
            out = d.cli("access", "token", name, "--value-from-stdin", input=value + "\n")
            assert out.returncode == 0, out.stderr
            with d.client() as c:
                c.grant(f"token:{name}", role, MODEL if role == "client" else "*")
        started.append(d)
    yield started
    for d in started:
        if d.alive():
            d.stop(signal.SIGKILL)


def _served(d: Daemon) -> int:
    with d.client() as c:
        return sum(
            1
            for r in c.audit(decision="outcome")
            if r["user"] == "+token:app" and r["status"] == 200
        )


def test_the_balancer_spreads_work_and_outlives_a_device(
    devices: list[Daemon], tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "EDGELLM_LISTEN": f"127.0.0.1:{port}",
        "EDGELLM_DEVICE1": str(devices[0].url),
        "EDGELLM_DEVICE2": str(devices[1].url),
        "EDGELLM_HEALTH_TOKEN": HEALTH,
    }
    check = subprocess.run(
        ["haproxy", "-c", "-f", str(DEPLOY / "haproxy.cfg")], env=env, capture_output=True
    )
    assert check.returncode == 0, check.stderr
    with open(tmp_path / "haproxy.log", "wb") as log:
        balancer = subprocess.Popen(
            ["haproxy", "-db", "-f", str(DEPLOY / "haproxy.cfg")], env=env, stdout=log, stderr=log
        )
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
    try:
        wait_for(lambda: _through(port), timeout=30, interval=0.2)
        # six at a time: least connections sends them to both devices
        answers: list[str] = []

        def ask() -> None:
            answers.append(
                sdk.chat.completions.create(model=MODEL, **chat).choices[0].finish_reason
            )

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(answers) == 6 and set(answers) <= {"stop", "length"}
        assert _served(devices[0]) >= 1 and _served(devices[1]) >= 1
        # one device goes away mid-run: requests go on, to the other
        outcomes: list[str] = []
        stopped = devices[0].proc
        assert stopped is not None
        stopped.send_signal(signal.SIGTERM)
        for _ in range(5):
            try:
                sdk.chat.completions.create(model=MODEL, **chat)
                outcomes.append("200")
            except openai.APIStatusError as exc:  # a clear refusal, never a hang or a drop
                assert exc.status_code == 503 and exc.response.headers.get("Retry-After")
                outcomes.append("503")
        stopped.wait(30)
        assert outcomes.count("200") >= 4, outcomes
        before = _served(devices[1])
        sdk.chat.completions.create(model=MODEL, **chat)
        assert _served(devices[1]) == before + 1
    finally:
        balancer.terminate()
        balancer.wait(10)


def _through(port: int) -> bool:
    try:
        r = httpx.get(
            f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {HEALTH}"}
        )
    except httpx.HTTPError:
        return False
    return r.status_code == 200


def test_prometheus_scrapes_the_fleet_with_its_config(
    devices: list[Daemon], tmp_path: Path
) -> None:
    """deploy/prometheus.yml, with its two paths pointed here and a 1 s interval."""
    alive = [d for d in devices if d.alive()]
    (tmp_path / "token").write_text(HEALTH)
    (tmp_path / "fleet.json").write_text(
        json.dumps([{"targets": [d.url for d in alive], "labels": {"site": "test"}}])
    )
    config = (
        (DEPLOY / "prometheus.yml")
        .read_text()
        .replace("/etc/prometheus/edgellm.token", str(tmp_path / "token"))
        .replace("/etc/prometheus/edgellm-fleet.json", str(tmp_path / "fleet.json"))
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
    )
    (tmp_path / "prometheus.yml").write_text(config)
    with prometheus(tmp_path / "prometheus.yml") as query:

        def all_up() -> bool:
            values = [x["value"][1] for x in query('up{job="edgellm",site="test"}')]
            return len(values) == len(alive) and set(values) == {"1"}

        wait_for(all_up, timeout=60, interval=0.5)
        # what the devices did, as Prometheus scraped it with the scraper token
        counted = query('sum(llamacpp:tokens_predicted_total{job="edgellm"})')
        assert counted and float(counted[0]["value"][1]) > 0
