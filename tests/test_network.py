"""The opt-in TCP listener: bearer tokens (401 without one), TLS with a CA made here,
mutual TLS whose certificate names a grant subject, the plaintext refusal at start-up,
slowed guessing, per-principal limits, and clients nobody here wrote over it: the
openai SDK (plain and TLS) and Simon Willison's `llm` CLI."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import MODEL, Daemon, wait_for

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def prometheus(config: Path) -> Iterator[Callable[[str], list[Any]]]:
    """A real Prometheus (Debian's) on ``config``, on a free loopback port, its data
    beside the config; yields a query function (the result vector, [] until there)."""
    port = free_port()
    with open(config.with_suffix(".log"), "wb") as log:
        prom = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={config.parent / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )

    def query(expression: str) -> list[Any]:
        try:
            r = httpx.get(
                f"http://127.0.0.1:{port}/api/v1/query", params={"query": expression}, timeout=2
            )
        except httpx.HTTPError:
            return []
        return list(r.json()["data"]["result"]) if r.is_success else []

    try:
        yield query
    finally:
        prom.terminate()
        prom.wait(10)


# --- certificates, made here -------------------------------------------------------------
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert: x509.Certificate, key: Any = None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


class CA:
    def __init__(self, name: str) -> None:
        self.key = _key()
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, cn: str, server: bool) -> tuple[x509.Certificate, Any]:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return builder.sign(self.key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca, other, renewal = CA("edgellm test CA"), CA("someone else's CA"), CA("renewal CA")
    server, server_key = ca.issue("localhost", server=True)
    renewed, renewed_key = renewal.issue("localhost", server=True)
    robot, robot_key = ca.issue("robot-7", server=False)
    stranger, stranger_key = other.issue("robot-7", server=False)
    return {
        "ca": _write(d / "ca.pem", ca.cert),
        "server": _write(d / "server.pem", server, server_key),
        "robot": _write(d / "robot.pem", robot, robot_key),
        "stranger": _write(d / "stranger.pem", stranger, stranger_key),
        "renewal-ca": _write(d / "renewal-ca.pem", renewal.cert),
        "renewed": _write(d / "renewed.pem", renewed, renewed_key),
    }


# --- daemons -----------------------------------------------------------------------------
def _grant_token(d: Daemon, name: str, role: str = "client", **kw: Any) -> str:
    with d.client() as c:
        token = c.create_token(name, **kw)["token"]
        c.grant(f"token:{name}", role, MODEL if role == "client" else "*")
    return token


@pytest.fixture(scope="module")
def tcp(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[Daemon]:
    """Plaintext on loopback (allowed: nothing crosses a network), limits for clients."""
    port = free_port()
    d = Daemon(
        tmp_path_factory.mktemp("tcp"),
        model_file,
        listen=[f"tcp://127.0.0.1:{port}"],
        auth_failures_per_minute=5,
        limits={"client": {"max_in_flight": 1, "per_minute": 40}, "auditor": {"per_minute": 3}},
    ).start()
    d.url = f"http://127.0.0.1:{port}"
    yield d
    if d.alive():
        d.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def tls(
    tmp_path_factory: pytest.TempPathFactory, model_file: Path, pki: dict[str, Path]
) -> Iterator[Daemon]:
    """TLS with mutual TLS optional: a token or a certificate from the test CA."""
    port = free_port()
    d = Daemon(
        tmp_path_factory.mktemp("tls"),
        model_file,
        listen=[f"tcp://127.0.0.1:{port}"],
        tls_cert_file=str(pki["server"]),
        tls_key_file=str(pki["server"].with_suffix(".key")),
        tls_client_ca_file=str(pki["ca"]),
    ).start()
    d.url = f"https://127.0.0.1:{port}"
    yield d
    if d.alive():
        d.stop(signal.SIGKILL)


def _sdk(url: str, token: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{url}/v1", api_key=token, max_retries=0, http_client=httpx.Client(**kw)
    )


def test_a_token_is_needed_and_its_grants_are_what_it_may_do(tcp: Daemon) -> None:
    url = tcp.url
    token = _grant_token(tcp, "lan-app")
    r = _sdk(url, token).chat.completions.create(model=MODEL, **CHAT)
    assert r.choices[0].message.content is not None
    scraper = _grant_token(tcp, "prom", role="scraper")
    expiring = _grant_token(tcp, "short", expires_in=1)
    revoked = _grant_token(tcp, "gone")
    with tcp.client() as c:
        c.revoke_token("gone")
        names = {t["name"]: t for t in c.tokens()}
    assert names["short"]["expires"] and names["lan-app"]["expires"] is None
    assert "gone" not in names
    wait_for(lambda: names["short"]["expires"] < time.time(), timeout=3)
    with httpx.Client(base_url=url) as h:
        cases = [
            ({}, 401, "needs a bearer token"),
            ({"Authorization": "Bearer edg_wrong"}, 401, "not valid"),
            ({"Authorization": f"Bearer {revoked}"}, 401, "not valid"),
            ({"Authorization": f"Bearer {expiring}"}, 401, "has expired"),
            ({"Authorization": f"Bearer {scraper}"}, 403, "lacks models.use"),
        ]
        for headers, status, words in cases:
            got = h.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert got.status_code == status, (headers, got.text)
            assert words in got.json()["error"]["message"], got.text
            if status == 401:
                assert got.json()["error"]["code"] == "invalid_api_key"
                assert got.headers["WWW-Authenticate"].startswith("Bearer")
        # the scraper reads metrics and nothing else
        m = h.get("/metrics", headers={"Authorization": f"Bearer {scraper}"})
        assert m.status_code == 200 and "llamacpp:tokens_predicted_total" in m.text
    # the daemon serves on, and the audit log has the denials with the address
    with tcp.client() as c:
        rows = c.audit(decision="deny")
        assert c.audit_verify()["ok"] is True
    denied = [(r["status"], r["address"]) for r in rows if r["action"] == "authenticate"]
    assert denied.count((401, "127.0.0.1")) >= 4
    assert _sdk(url, token).chat.completions.create(model=MODEL, **CHAT).choices


def test_guessing_from_one_address_is_slowed(tcp: Daemon) -> None:
    """Past auth_failures_per_minute (5 here) failures, an address is answered 429
    until its minute is over, its tokens not even looked at. (From 127.0.0.2, also
    loopback, so this test's failures are its own.)"""
    url = tcp.url
    guesser = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=url, transport=guesser) as h:
        statuses = [
            h.get("/health", headers={"Authorization": f"Bearer edg_guess{i}"}).status_code
            for i in range(8)
        ]
        assert statuses == [401] * 5 + [429] * 3, statuses
        slowed = h.get("/health", headers={"Authorization": "Bearer edg_more"})
        assert slowed.status_code == 429 and int(slowed.headers["Retry-After"]) >= 1
        assert "failed authentications from 127.0.0.2" in slowed.json()["error"]["message"]
    # another address, and the Unix socket, are served on
    token = _grant_token(tcp, "neighbour", role="scraper")
    assert httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {token}"}).is_success
    with tcp.client() as c:
        assert c.health()["status"] == "ready"
        assert 'edgellm_rate_limited_total{reason="auth_failures"} 4.0' in c.metrics()


def test_a_principal_over_its_limits_gets_429(tcp: Daemon) -> None:
    """max_in_flight 1 for clients: a second request while one streams is refused;
    the streaming one finishes. (per_minute is counted the same way.)"""
    url = tcp.url
    token = _grant_token(tcp, "busy-app")
    sdk = _sdk(url, token)
    started = threading.Event()
    done: list[str] = []

    def stream() -> None:
        s = sdk.chat.completions.create(
            model=MODEL,
            messages=CHAT["messages"],
            max_tokens=80,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in s:
            started.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                done.append(chunk.choices[0].finish_reason)

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.chat.completions.create(model=MODEL, **CHAT)
    t.join()
    assert done == ["length"]
    assert "in flight" in str(refused.value) and refused.value.response.headers["Retry-After"]
    # per_minute (3 for auditors here): the fourth request within the minute
    auditor = _grant_token(tcp, "auditor-app", role="auditor")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {auditor}"}) as h:
        statuses = [h.get("/health").status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429], statuses
        late = h.get("/health")
        assert "within a minute" in late.json()["error"]["message"]
        assert 1 <= int(late.headers["Retry-After"]) <= 60
    with tcp.client() as c:  # root on the socket: an admin, unlimited
        metrics = c.metrics()
    assert 'edgellm_rate_limited_total{reason="max_in_flight"}' in metrics
    assert 'edgellm_rate_limited_total{reason="per_minute"}' in metrics


def test_tls_with_a_token_or_a_client_certificate(tls: Daemon, pki: dict[str, Path]) -> None:
    url = tls.url
    token = _grant_token(tls, "tls-app")
    with tls.client() as c:
        c.grant("cert:robot-7", "client", MODEL)
    robot = (str(pki["robot"]), str(pki["robot"].with_suffix(".key")))
    stranger = (str(pki["stranger"]), str(pki["stranger"].with_suffix(".key")))
    ca = str(pki["ca"])

    def context(cert: tuple[str, str] | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(*cert)
        return ctx

    # the openai SDK over TLS: a certificate names the caller, or a token does
    r = _sdk(url, "unused", verify=context(robot)).chat.completions.create(model=MODEL, **CHAT)
    assert r.choices
    with pytest.raises(openai.APIConnectionError):  # no client certificate: no handshake
        _sdk(url, token, verify=context(None)).chat.completions.create(model=MODEL, **CHAT)
    with pytest.raises(openai.APIConnectionError):  # signed by another CA
        _sdk(url, token, verify=context(stranger)).chat.completions.create(model=MODEL, **CHAT)
    with pytest.raises(openai.APIConnectionError):  # the server is not who a default CA knows
        _sdk(url, token).chat.completions.create(model=MODEL, **CHAT)
    # plaintext to the TLS port: the connection fails, the daemon serves on
    with pytest.raises(httpx.HTTPError):
        httpx.get(url.replace("https", "http") + "/health", timeout=5)
    with httpx.Client(base_url=url, verify=context(robot)) as h:
        me = h.get("/api/access/whoami").json()
        assert me["cert"] == "robot-7" and me["uid"] is None and me["address"] == "127.0.0.1"
        assert h.get("/health").status_code == 200
    # a renewed certificate, read again on SIGHUP: new connections get it
    for suffix in (".pem", ".key"):
        pki["server"].with_suffix(suffix).write_bytes(
            pki["renewed"].with_suffix(suffix).read_bytes()
        )
    assert tls.proc is not None
    tls.proc.send_signal(signal.SIGHUP)
    renewed = ssl.create_default_context(cafile=str(pki["renewal-ca"]))
    renewed.load_cert_chain(*robot)

    def serves_renewed() -> bool:
        try:
            return httpx.get(f"{url}/health", verify=renewed, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(serves_renewed, timeout=10, interval=0.2)
    assert "event=tls_certificate_reloaded" in tls.log_text()
    # the edgellm CLI itself, at the URL with the CA
    reach = ["--url", url, "--ca-file", str(pki["renewal-ca"]), "--token", token]
    refused = tls.cli(*reach, "ask", "Hi", "--max-tokens", "3")  # no client certificate
    assert refused.returncode == 1 and "cannot reach the edgellm daemon at" in refused.stderr
    assert "Traceback" not in refused.stderr
    mine = ["--cert-file", robot[0], "--cert-key-file", robot[1]]
    out = tls.cli(*reach, *mine, "ask", "Hi", "--max-tokens", "3")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr


def test_a_network_address_without_tls_is_refused_at_start(
    tmp_path: Path, model_file: Path
) -> None:
    d = Daemon(tmp_path, model_file, listen=["tcp://0.0.0.0:9"])
    out = d.cli("serve", "--no-pull", timeout=60)
    assert out.returncode == 1
    assert "reachable from the network" in out.stderr and "tls_cert_file" in out.stderr
    assert "Traceback" not in out.stderr


def test_llm_cli_answers_through_the_listener(tcp: Daemon, tmp_path: Path) -> None:
    """Simon Willison's llm, configured as its docs say for an OpenAI-compatible server
    (extra-openai-models.yaml), with the token as its key."""
    url = tcp.url
    token = _grant_token(tcp, "llm-cli")
    home = tmp_path / "llm"
    home.mkdir()
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: edgellm\n  model_name: {MODEL}\n  api_base: {url}/v1\n"
        "  api_key_name: edgellm\n"
    )
    (home / "keys.json").write_text(json.dumps({"edgellm": token}))
    llm = Path(sys.executable).parent / "llm"
    env = {**os.environ, "LLM_USER_PATH": str(home)}
    out = subprocess.run(
        [str(llm), "-m", "edgellm", "-o", "max_tokens", "8", "-o", "temperature", "0", "Hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_a_tcp_socket_passed_in_serves_a_daemon_with_no_network(
    tmp_path: Path, model_file: Path
) -> None:
    """As edgellm-tcp.socket does under systemd, with systemd's own
    systemd-socket-activate: it binds the Unix socket and a TCP port, then the daemon
    starts in a network namespace of its own (unshare --net, what PrivateNetwork=yes
    makes), with no network but the sockets it was handed. A request over TCP, with a
    token, is served."""
    port = free_port()
    d = Daemon(tmp_path, model_file)
    command = [
        "systemd-socket-activate",
        "-l",
        str(d.socket),
        "-l",
        f"127.0.0.1:{port}",
        # its child gets only what it is given, as a service does
        *[f"--setenv={k}" for k in d.env if k.startswith("EDGELLM_") or k in ("PATH", "HOME")],
        "unshare",
        "--net",
        sys.executable,
        "-m",
        "edgellm",
        "serve",
        "--no-pull",
    ]
    d.socket.parent.mkdir(parents=True, exist_ok=True)
    with open(d.log, "ab") as log:
        d.proc = subprocess.Popen(command, env=d.env, stdout=log, stderr=log)
    try:
        wait_for(lambda: d.socket.exists() and _healthy(d), timeout=60, interval=0.2)
        own = os.readlink(f"/proc/{d.proc.pid}/ns/net")
        assert own != os.readlink("/proc/self/ns/net")  # a network namespace of its own
        token = _grant_token(d, "activated")
        r = _sdk(f"http://127.0.0.1:{port}", token).chat.completions.create(model=MODEL, **CHAT)
        assert r.choices
        assert "event=listening address=tcp://127.0.0.1:" in d.log_text()
    finally:
        d.stop()


def _healthy(d: Daemon) -> bool:
    try:
        with d.client() as c:
            return bool(c.health())
    except Exception:
        return False


def test_the_tui_reaches_a_daemon_over_the_network(
    tcp: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's TUI at a URL with a token (EDGELLM_URL, EDGELLM_TOKEN: what
    `edgellm --url … --token … tui` sets): the dashboard shows the daemon, and who
    it sees (the token, as an operator)."""
    from test_tui import Recording, drive, text, until

    url = tcp.url
    assert url is not None
    monkeypatch.setenv("EDGELLM_URL", url)
    monkeypatch.setenv("EDGELLM_TOKEN", _grant_token(tcp, "tui-operator", role="operator"))
    app = Recording(None)

    async def scenario(pilot: Any) -> None:
        health = await until(
            pilot, lambda: "governor" in text(app, "#health") and text(app, "#health")
        )
        assert "ready" in health and "operator" in health

    drive(app, scenario)
    assert app.client.url == url
