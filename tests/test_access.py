"""Access control with real, separate Unix users: the kernel says who is calling
(SO_PEERCRED), grants decide. The tests run as root; they create users and a group,
and each client runs in a child process that has become that user."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import MODEL, Daemon, as_user, public_socket, unix_users, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating users needs root")

ALICE, BOB, CAROL, TEAM = "edgt-alice", "edgt-bob", "edgt-carol", "edgt-team"
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def users() -> Iterator[None]:
    subprocess.run(["groupadd", "-f", TEAM], check=True)
    with unix_users(ALICE, BOB, CAROL):
        subprocess.run(["usermod", "-aG", TEAM, ALICE], check=True)
        yield
    subprocess.run(["groupdel", TEAM], capture_output=True)


@pytest.fixture(scope="module")
def shared(
    users: None, tmp_path_factory: pytest.TempPathFactory, model_file: Path
) -> Iterator[Daemon]:
    d = Daemon(
        tmp_path_factory.mktemp("access"), model_file, names=(MODEL, "smol-b"), socket_mode="0666"
    )
    public_socket(d, "access")
    d.start()
    yield d
    d.stop()


def call(
    d: Daemon, method: str, path: str, body: Any = None, token: str | None = None
) -> Callable[[], Any]:
    def go() -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(d.socket)), base_url="http://edgellm", timeout=60
        ) as h:
            r = h.request(method, path, json=body, headers=headers)
        is_json = r.headers.get("content-type", "").startswith("application/json")
        return [r.status_code, r.json() if is_json else r.text]

    return go


def test_nobody_has_anything_until_granted(shared: Daemon) -> None:
    status, body = as_user(ALICE, call(shared, "GET", "/health"))
    assert status == 403 and body["error"]["message"].startswith(
        f"permission denied: {ALICE} lacks health.read"
    )
    status, body = as_user(ALICE, call(shared, "POST", "/v1/chat/completions", CHAT))
    assert status == 403 and "models.use" in body["error"]["message"]
    assert body["error"]["type"] == "permission_error"
    status, me = as_user(ALICE, call(shared, "GET", "/api/access/whoami"))
    assert status == 200 and me["user"] == ALICE and TEAM in me["groups"]
    assert me["roles"] == {} and me["uid"] == pwd.getpwnam(ALICE).pw_uid


def test_client_grants_bind_users_to_models(shared: Daemon) -> None:
    with shared.client() as root:
        root.grant(f"group:{TEAM}", "client", MODEL)
        try:
            status, body = as_user(ALICE, call(shared, "POST", "/v1/chat/completions", CHAT))
            assert status == 200 and body["usage"]["completion_tokens"] == 2
            status, listed = as_user(ALICE, call(shared, "GET", "/v1/models"))
            assert [m["id"] for m in listed["data"]] == [MODEL]  # not smol-b
            status, body = as_user(
                ALICE, call(shared, "POST", "/v1/chat/completions", {**CHAT, "model": "smol-b"})
            )
            assert status == 403 and "models.use on model smol-b" in body["error"]["message"]
            status, _ = as_user(BOB, call(shared, "POST", "/v1/chat/completions", CHAT))
            assert status == 403  # not in the group
        finally:
            root.revoke(f"group:{TEAM}", "client", MODEL)
    status, _ = as_user(ALICE, call(shared, "POST", "/v1/chat/completions", CHAT))
    assert status == 403  # revoked


def test_operators_manage_but_do_not_query(shared: Daemon) -> None:
    status, body = as_user(CAROL, call(shared, "GET", "/api/jobs"))  # no role yet
    assert status == 403 and "metrics.read" in body["error"]["message"]
    with shared.client() as root:
        root.grant(f"user:{CAROL}", "operator")
        try:
            assert as_user(CAROL, call(shared, "GET", "/api/jobs")) == [200, {"jobs": []}]
            assert as_user(CAROL, call(shared, "POST", f"/api/models/{MODEL}/load"))[0] == 200
            assert as_user(CAROL, call(shared, "POST", f"/api/models/{MODEL}/unload"))[0] == 200
            assert as_user(CAROL, call(shared, "GET", "/metrics"))[0] == 200
            status, body = as_user(CAROL, call(shared, "POST", "/v1/chat/completions", CHAT))
            assert status == 403 and "models.use" in body["error"]["message"]
            status, body = as_user(CAROL, call(shared, "DELETE", "/api/models/smol-b"))
            assert status == 403 and "models.manage" in body["error"]["message"]
            status, body = as_user(
                CAROL,
                call(
                    shared,
                    "POST",
                    "/api/access/grants",
                    {"subject": f"user:{CAROL}", "role": "admin"},
                ),
            )
            assert status == 403 and "access.manage" in body["error"]["message"]
        finally:
            root.revoke(f"user:{CAROL}", "operator")


def test_tokens_tell_services_on_one_uid_apart(shared: Daemon) -> None:
    with shared.client() as root:
        token = root.create_token("svc")["token"]
        root.grant("token:svc", "client", MODEL)
        try:
            assert (
                as_user(BOB, call(shared, "POST", "/v1/chat/completions", CHAT, token=token))[0]
                == 200
            )
            assert as_user(BOB, call(shared, "POST", "/v1/chat/completions", CHAT))[0] == 403
            assert (
                as_user(
                    BOB, call(shared, "POST", "/v1/chat/completions", CHAT, token="edg_not-a-token")
                )[0]
                == 403
            )
        finally:
            root.revoke("token:svc", "client", MODEL)
    assert "edg_" not in (shared.state_dir / "vault" / "catalog.db").read_bytes().decode(
        "latin-1"
    )  # stored hashed


def test_clients_see_and_cancel_only_their_own_requests(shared: Daemon) -> None:
    import threading

    with shared.client() as root:
        root.grant(f"user:{ALICE}", "client", MODEL)
        root.grant(f"user:{BOB}", "client", MODEL)
        long = {**CHAT, "max_tokens": 2000, "ignore_eos": True}
        result: dict[str, Any] = {}
        t = threading.Thread(
            target=lambda: result.update(
                alice=as_user(ALICE, call(shared, "POST", "/v1/chat/completions", long))
            )
        )
        t.start()
        try:
            running = wait_for(lambda: [r for r in root.requests() if r["completion_tokens"]])
            alice_req = running[0]["id"]
            status, theirs = as_user(BOB, call(shared, "GET", "/api/requests"))
            assert status == 200 and theirs["requests"] == []
            # another's live request is answered exactly as an unknown id is: ids and
            # their owners cannot be probed
            status, body = as_user(BOB, call(shared, "DELETE", f"/api/requests/{alice_req}"))
            _, unknown = as_user(BOB, call(shared, "DELETE", "/api/requests/req-unknown"))
            assert status == 404 and body["error"]["message"] == unknown["error"][
                "message"
            ].replace("req-unknown", alice_req)
            status, mine = as_user(ALICE, call(shared, "GET", "/api/requests"))
            assert [r["id"] for r in mine["requests"]] == [alice_req]
            assert as_user(ALICE, call(shared, "DELETE", f"/api/requests/{alice_req}"))[0] == 200
        finally:
            t.join(60)
            root.revoke(f"user:{ALICE}", "client", MODEL)
            root.revoke(f"user:{BOB}", "client", MODEL)
    assert result["alice"][1]["choices"][0]["finish_reason"] == "cancelled"


def test_data_grants_cover_an_object_or_a_prefix(shared: Daemon, tmp_path: Path) -> None:
    secret = tmp_path / "s.txt"
    secret.write_bytes(b"wifi password: hunter2")
    with shared.client() as root:
        for name in ("docs/manual.txt", "docs/faq.txt", "secrets/wifi.txt"):
            root.data_put(name, secret)
        root.grant(f"user:{ALICE}", "data-reader", "docs/")
        root.grant(f"user:{BOB}", "data-writer", "secrets/wifi.txt")
        try:
            status, listed = as_user(ALICE, call(shared, "GET", "/api/data"))
            assert status == 200
            assert [r["name"] for r in listed["data"]] == ["docs/faq.txt", "docs/manual.txt"]
            status, text = as_user(ALICE, call(shared, "GET", "/api/data/docs/manual.txt"))
            assert (status, text) == (200, "wifi password: hunter2")
            status, body = as_user(ALICE, call(shared, "GET", "/api/data/secrets/wifi.txt"))
            assert status == 403 and body["error"]["message"].startswith(
                f"permission denied: {ALICE} lacks data.read on data secrets/wifi.txt"
            )
            status, body = as_user(ALICE, call(shared, "DELETE", "/api/data/docs/faq.txt"))
            assert status == 403 and "data.write on data docs/faq.txt" in body["error"]["message"]
            assert as_user(BOB, call(shared, "GET", "/api/data/secrets/wifi.txt"))[0] == 200
            assert as_user(BOB, call(shared, "DELETE", "/api/data/secrets/wifi.txt"))[0] == 200
            assert as_user(BOB, call(shared, "GET", "/api/data/docs/faq.txt"))[0] == 403
            assert as_user(CAROL, call(shared, "GET", "/api/data"))[1]["data"] == []
        finally:
            root.revoke(f"user:{ALICE}", "data-reader", "docs/")
            root.revoke(f"user:{BOB}", "data-writer", "secrets/wifi.txt")
            for name in ("docs/manual.txt", "docs/faq.txt"):
                root.data_remove(name)
        rows = root.audit(action="data.read", decision="deny")
        assert [(r["user"], r["resource"]) for r in rows] == [
            (ALICE, "secrets/wifi.txt"),
            (BOB, "docs/faq.txt"),
        ]
        reads = root.audit(action="data.read", decision="allow", user=ALICE)
        assert [r["resource"] for r in reads] == ["docs/manual.txt"]


def test_grant_errors_and_the_cli(shared: Daemon) -> None:
    with shared.http() as h:
        bad = h.post("/api/access/grants", json={"subject": "wizard:x", "role": "client"})
        assert bad.status_code == 400 and "invalid subject" in bad.json()["error"]["message"]
        bad = h.post("/api/access/grants", json={"subject": "user:x", "role": "king"})
        assert bad.status_code == 400 and "unknown role 'king'" in bad.json()["error"]["message"]
        gone = h.request(
            "DELETE", "/api/access/grants", json={"subject": "user:x", "role": "client"}
        )
        assert gone.status_code == 404
    env = {**shared.env, "EDGELLM_SOCKET": str(shared.socket)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        import sys

        return subprocess.run(
            [sys.executable, "-m", "edgellm", "access", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert (
        "granted client to user:edgt-bob on smol-b"
        in cli("grant", f"user:{BOB}", "client", "--model", "smol-b").stdout
    )
    assert (
        "granted data-reader to user:edgt-bob on docs/"
        in cli("grant", f"user:{BOB}", "data-reader", "--data", "docs/").stdout
    )
    assert f"user:{BOB}" in cli("list").stdout
    assert cli("revoke", f"user:{BOB}", "data-reader", "--data", "docs/").returncode == 0
    assert "roles: admin" in cli("whoami").stdout
    assert cli("revoke", f"user:{BOB}", "client", "--model", "smol-b").returncode == 0
    assert "no grants" in cli("list").stdout
    assert shared.alive()
