"""The appliance under attack, black-box: as a local user with no grants, with hostile
bodies and headers, hostile model files, tampering at rest, and floods. Every test
here failed before its fix (issue "Hold under attack")."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from gguf_files import corruptions, with_template

from edgellm.server.app import add_routes
from edgellm.server.routes import Audit

from conftest import MODEL, Daemon, as_user, file_body, public_socket, unix_users, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating users needs root")

MALLORY, VICTIM = "edgt-mallory", "edgt-victim"
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
# routes every peer may call; each shows a caller only what is its own
PUBLIC = {
    ("GET", "/api/access/whoami"),
    ("GET", "/api/requests"),
    ("GET", "/api/data"),
    ("DELETE", "/api/requests/{id}"),
}


@pytest.fixture(scope="module")
def users() -> Iterator[None]:
    with unix_users(MALLORY, VICTIM):
        yield


@pytest.fixture(scope="module")
def target(
    users: None, tmp_path_factory: pytest.TempPathFactory, model_file: Path
) -> Iterator[Daemon]:
    d = public_socket(
        Daemon(
            tmp_path_factory.mktemp("target"),
            model_file,
            names=(MODEL, "other-model"),
            socket_mode="0666",
        ),
        "security",
    )
    d.start()
    with d.http() as h:
        assert (
            h.put("/api/data/secret/key.txt", content=b"the plaintext nobody may read").status_code
            == 201
        )
    with d.client() as c:
        c.grant(f"user:{VICTIM}", "client", MODEL)
    yield d
    d.stop()


def request(
    d: Daemon,
    method: str,
    path: str,
    body: Any = None,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    def go() -> Any:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(d.socket)), base_url="http://edgellm", timeout=60
        ) as h:
            r = h.request(method, path, json=body, content=content, headers=headers)
        is_json = r.headers.get("content-type", "").startswith("application/json")
        return [r.status_code, r.json() if is_json and r.content else r.text, dict(r.headers)]

    return go


def routes() -> list[tuple[str, str]]:
    """The app's own route table: a route added later is walked too."""
    app = web.Application()
    add_routes(app.router)
    return sorted(
        {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    )


def concrete(path: str) -> str:
    return path.replace(
        "{name}", "secret/key.txt" if path.startswith("/api/data") else MODEL
    ).replace("{id}", "req-0")


def test_every_route_declares_its_policy() -> None:
    app = web.Application()
    policies = add_routes(app.router)
    for route in app.router.routes():
        assert route in policies, f"{route.method} {route.resource} has no declared policy"
    # and what the declarations say, for the routes whose treatment is not the default
    declared = {(r.method, r.resource.canonical): policies[r] for r in app.router.routes()}
    assert declared[("GET", "/api/data/{name}")].audit is Audit.BEFORE  # a secret's read
    assert declared[("POST", "/api/vault/unlock")].audit is Audit.HANDLER
    assert declared[("HEAD", "/api/audit")] == declared[("GET", "/api/audit")]
    uses = {k for k, p in declared.items() if p.audit is Audit.PIPELINE}
    assert uses == {
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("POST", "/api/onnx/{name}/infer"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("POST", "/apply-template"),
        ("POST", "/v1/responses"),
        ("POST", "/ollama/api/chat"),
        ("POST", "/ollama/api/generate"),
        ("POST", "/ollama/api/embed"),
        ("POST", "/ollama/api/embeddings"),
    }


def test_every_route_and_method_refuses_an_ungranted_caller(target: Daemon) -> None:
    seen = []
    for method, path in routes():
        status, body, headers = as_user(MALLORY, request(target, method, concrete(path)))
        seen.append(method)
        if (method if method != "HEAD" else "GET", path) in PUBLIC:
            assert status in (200, 404), (method, path, status, body)
            continue
        assert status in (403, 404), (method, path, status, body)
        assert "X-Content-Sha256" not in headers and "x-content-sha256" not in headers
        if method != "HEAD":
            error = body["error"]  # Ollama's routes answer in its shape, a string
            assert error if path.startswith("/ollama") else error["message"], (method, path)
    assert "HEAD" in seen  # aiohttp's implicit HEAD of each GET is walked too
    # what the public routes give away: nothing that is not the caller's own
    assert as_user(MALLORY, request(target, "GET", "/api/access/whoami"))[1]["roles"] == {}
    assert as_user(MALLORY, request(target, "GET", "/api/requests"))[1]["requests"] == []
    assert as_user(MALLORY, request(target, "GET", "/api/data"))[1]["data"] == []
    with target.client() as root:
        rows = root.audit(user=MALLORY)
    # denied, all of it; the one public state change (cancelling one's own request) is
    # recorded as attempted, before it is looked up
    allowed = {(r["action"], r["resource"]) for r in rows if r["decision"] != "deny"}
    assert rows and allowed <= {("DELETE /api/requests/{id}", "req-0")}, allowed


def test_head_gets_no_secret(target: Daemon) -> None:
    status, body, headers = as_user(MALLORY, request(target, "HEAD", "/api/data/secret/key.txt"))
    assert (
        status == 403 and body == "" and not any(k.lower() == "x-content-sha256" for k in headers)
    )
    status, _, _ = as_user(MALLORY, request(target, "HEAD", "/api/audit"))
    assert status == 403
    with target.client() as root:
        denied = root.audit(user=MALLORY, decision="deny")
    assert any(r["resource"] == "secret/key.txt" for r in denied)


def test_others_models_and_requests_look_unknown(target: Daemon) -> None:
    status, body, _ = as_user(VICTIM, request(target, "GET", "/api/models/other-model"))
    _, unknown, _ = as_user(VICTIM, request(target, "GET", "/api/models/no-such-model"))
    assert status == 404 and body["error"]["message"] == unknown["error"]["message"].replace(
        "no-such-model", "other-model"
    )
    _, health, _ = as_user(VICTIM, request(target, "GET", "/health"))
    assert set(health["models"]) == {MODEL}
    with target.http() as h:
        assert h.post("/api/models/other-model/load").status_code == 200
    _, ps, _ = as_user(VICTIM, request(target, "GET", "/api/ps"))
    assert "other-model" not in {m["name"] for m in ps["models"]}


def test_a_client_cannot_pin_its_model(target: Daemon) -> None:
    for keep_alive in (-1, "10h"):
        status, body, _ = as_user(
            VICTIM,
            request(target, "POST", "/v1/chat/completions", {**CHAT, "keep_alive": keep_alive}),
        )
        assert (
            status == 403
            and "keep_alive" in body["error"]["message"]
            and "models.load" in body["error"]["message"]
        )
    status, _, _ = as_user(
        VICTIM, request(target, "POST", "/v1/chat/completions", {**CHAT, "keep_alive": "5s"})
    )
    assert status == 200  # shorter than configured is the client's own business


def test_request_ids_are_unguessable(target: Daemon) -> None:
    ids = []
    with target.http() as h:
        for _ in range(3):
            ids.append(h.post("/v1/chat/completions", json=CHAT).headers["X-Request-Id"])
    # random throughout, not a per-daemon prefix and a counter
    assert len({i[4:10] for i in ids}) == 3 and all(len(i) >= 20 for i in ids)


@pytest.mark.parametrize(
    "method,path,body,headers,expect",
    [
        ("POST", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, {}, "nested more deeply"),
        (
            "POST",
            "/v1/chat/completions",
            b'{"max_tokens": ' + b"9" * 4301 + b"}",
            {},
            "number edgellm cannot read",
        ),
        ("GET", "/health", None, {"Authorization": b"Bearer \xff\xfe\x80"}, "not ASCII"),
        ("GET", "/v1/models", None, {"Authorization": b"Bearer \xc3\xa9"}, "not ASCII"),
        ("PUT", "/api/governor", b'{"thresholds": 5}', {}, "thresholds must be an object"),
        ("PUT", "/api/governor", b'{"pin": 5}', {}, "unknown level"),
        ("POST", "/api/audit/prune", b'{"keep_rows": 9223372036854775808}', {}, "too large"),
        ("GET", "/api/audit?limit=%C2%B2", None, {}, "whole number"),
        ("GET", "/api/audit?limit=99999999999999999999", None, {}, "too large"),
        (
            "POST",
            "/api/access/grants",
            b'{"subject": "user:\\ud800", "role": "client"}',
            {},
            "not valid Unicode",
        ),
        ("POST", "/api/access/tokens", b'{"name": "\\udfff"}', {}, "not valid Unicode"),
        ("GET", "/api/audit?user=%ED%A0%80", None, {}, None),
    ],
    ids=[
        "deep-json",
        "4301-digits",
        "bearer-bytes",
        "bearer-utf8",
        "thresholds-5",
        "pin-5",
        "keep-rows-2-63",
        "limit-superscript",
        "limit-20-digits",
        "grant-surrogate",
        "token-surrogate",
        "query-bad-utf8",
    ],
)
def test_what_the_probe_found_is_a_400_naming_the_problem(
    target: Daemon,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, bytes],
    expect: str | None,
) -> None:
    with target.http() as h:
        r = h.request(method, path, content=body, headers=headers)
        if expect is None:  # decoded as replacement characters: harmless, and served
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 400 and expect in r.json()["error"]["message"], r.text
        assert h.get("/health").status_code == 200


# --- one request must never take the engine down --------------------------------------------
def test_a_lone_surrogate_is_refused_at_the_door_and_the_neighbour_lives(target: Daemon) -> None:
    out: dict[str, Any] = {}

    def neighbour() -> None:
        with target.client() as c:
            stream = c.chat(
                [{"role": "user", "content": "Count to fifty."}],
                stream=True,
                max_tokens=120,
                ignore_eos=True,
            )
            out["text"], out["finish"] = "".join(stream), stream.finish_reason

    t = threading.Thread(target=neighbour)
    t.start()
    with target.client() as c:
        wait_for(lambda: any(r["completion_tokens"] for r in c.requests()))
    raw = b'{"messages":[{"role":"user","content":"a\\ud800b"}],"max_tokens":4}'
    with target.http() as h:
        for _ in range(5):
            r = h.post(
                "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
            )
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "body.messages[0].content" and "surrogate" in err["message"]
    t.join(120)
    assert out["finish"] == "length" and out["text"]
    with target.client() as c:
        assert c.requests() == []
        assert c.chat([{"role": "user", "content": "Hi"}], max_tokens=2)["choices"]


def test_the_engine_fails_a_request_it_cannot_start_alone(model_file: Path, tmp_path: Path) -> None:
    """Past the door (an in-process caller): the engine answers that request with an
    error and keeps decoding its neighbour."""
    from edgellm.config import load_settings
    from edgellm.runtime.manager import Runtime
    from edgellm.runtime.types import Failed, Finished, GenerationRequest, Sampling
    from edgellm.vault.open import open_vault

    settings = load_settings(
        overrides={"state_dir": tmp_path, "n_ctx": 512, "vault_key_file": tmp_path / "vault.key"},
        environ={},
    )
    store = open_vault(settings)
    store.add_file(model_file, MODEL)
    rt = Runtime(settings, store)
    events: dict[str, list[Any]] = {"good": [], "bad": []}
    done = threading.Semaphore(0)

    def sink(key: str) -> Any:
        def put(ev: Any) -> None:
            events[key].append(ev)
            if isinstance(ev, Finished | Failed):
                done.release()

        return put

    try:
        rt.load(MODEL)
        rt.submit(
            GenerationRequest(
                model=MODEL,
                prompt="Once upon a time",
                max_tokens=40,
                sampling=Sampling(ignore_eos=True),  # unseeded, it could end before 40
                sink=sink("good"),
            )
        )
        rt.submit(
            GenerationRequest(
                model=MODEL, messages=[{"role": "user", "content": "x\ud800"}], sink=sink("bad")
            )
        )
        assert done.acquire(timeout=120) and done.acquire(timeout=120)
        assert isinstance(events["bad"][-1], Failed)
        assert "keeps serving" in str(events["bad"][-1].error)
        assert isinstance(events["good"][-1], Finished)
        assert events["good"][-1].finish_reason == "length"
        assert rt.loaded()[0].name == MODEL and rt.stats["engine_failures"] == 0
    finally:
        rt.close()


# --- the audit log ----------------------------------------------------------------------------
def test_a_caller_with_an_undecodable_executable_is_audited(target: Daemon) -> None:
    """curl renamed to cu\\xffrl: its path is not UTF-8, and still every call is
    recorded, with the byte escaped, and nobody else's rows suffer."""
    where = tempfile.mkdtemp(prefix="edgellm-exe-")
    os.chmod(where, 0o755)
    odd = os.fsencode(where) + b"/cu\xffrl"
    shutil.copy(shutil.which("curl") or "/usr/bin/curl", odd)
    os.chmod(odd, 0o755)

    def curl(*prefix: str, path: str, data: str | None = None) -> str:
        args = [
            *prefix,
            odd,
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
            str(target.socket),
            f"http://edgellm{path}",
        ]
        if data is not None:
            args += ["-H", "Content-Type: application/json", "-d", data]
        return subprocess.run(args, capture_output=True, text=True).stdout

    as_mallory = ("setpriv", f"--reuid={MALLORY}", "--regid=nogroup", "--clear-groups")
    chat = json.dumps(CHAT)
    assert [curl(*as_mallory, path="/api/audit") for _ in range(5)] == ["403"] * 5
    assert curl(*as_mallory, path="/v1/chat/completions", data=chat) == "403"
    assert curl(path="/api/audit") == "200"
    assert curl(path="/v1/chat/completions", data=chat) == "200"
    with target.client() as root:
        rows = root.audit()
        assert root.audit_verify()["ok"]
    odd_rows = [r for r in rows if (r["exe"] or "").endswith("/cu\\xffrl")]
    assert sum(1 for r in odd_rows if r["user"] == MALLORY and r["decision"] == "deny") == 6
    assert {r["decision"] for r in odd_rows if r["user"] == "root"} >= {"allow", "outcome"}


def test_truncation_deletion_and_rollback_of_the_audit_log_are_detected(
    make_daemon: Any, tmp_path: Path
) -> None:
    d = make_daemon()
    with d.client() as c:
        for _ in range(3):
            c.chat([{"role": "user", "content": "Hi"}], max_tokens=2)
        assert c.audit_verify()["ok"]
    d.stop()
    vault = d.state_dir / "vault"
    pristine = tmp_path / "pristine"
    shutil.copytree(vault, pristine)

    def verify_offline() -> subprocess.CompletedProcess[str]:
        return d.cli("audit", "verify", "--offline")

    assert verify_offline().returncode == 0

    def tamper(action: Any) -> str:
        shutil.rmtree(vault)
        shutil.copytree(pristine, vault)
        action()
        r = verify_offline()
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        return r.stderr

    def delete_newest() -> None:
        with sqlite3.connect(vault / "audit.db") as db:
            db.execute("DELETE FROM audit WHERE seq > (SELECT max(seq) - 2 FROM audit)")

    assert "deleted from the end" in tamper(delete_newest)

    def delete_all() -> None:
        with sqlite3.connect(vault / "audit.db") as db:
            db.execute("DELETE FROM audit")

    assert "deleted from the end" in tamper(delete_all)
    assert "deleted from the end" in tamper(
        lambda: [
            (vault / n).unlink(missing_ok=True)
            for n in ("audit.db", "audit.db-wal", "audit.db-shm")
        ]
    )
    assert "head is missing" in tamper(lambda: (vault / "audit.head").unlink())

    def downgrade() -> None:  # set vault.json back to version 1, to skip the head
        meta = json.loads((vault / "vault.json").read_text())
        (vault / "vault.json").write_text(json.dumps({**meta, "version": 1}))

    assert "altered" in tamper(downgrade)
    # the evidence stays once the daemon writes on: a restart cannot heal a truncation
    shutil.rmtree(vault)
    shutil.copytree(pristine, vault)
    delete_newest()
    d.start()
    with d.client() as c:
        c.chat([{"role": "user", "content": "Hi"}], max_tokens=2)
        result = c.audit_verify()
    assert not result["ok"] and "deleted from the end" in result["problem"]


def test_locking_the_vault_mid_generation_keeps_the_outcome_row(make_daemon: Any) -> None:
    """The lock ends the generation, but its handler is still sending the stream to a
    client that has stopped reading: the key must be kept until its outcome row is
    written (the lock used to return at once, and that row was lost)."""
    d = make_daemon(n_ctx=4096)
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "Count."}],
            "stream": True,
            "max_tokens": 3000,
            "ignore_eos": True,
            # ~2.5 KB a token: the stream outruns the socket's buffers within a few
            # hundred tokens (plain chunks of ~200 bytes took 1,500, a minute of suite)
            "logprobs": True,
            "top_logprobs": 20,
        }
    ).encode()
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(d.socket))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    head = s.recv(4096)  # the answer has begun; then this client stops reading
    request_id = head.split(b"X-Request-Id: ")[1].split(b"\r\n")[0].decode()
    with d.client() as c:
        # the stream has outrun the socket's buffer: the handler is blocked writing
        wait_for(lambda: any(r["completion_tokens"] > 500 for r in c.requests()), 120)
        locked: dict[str, Any] = {}
        t = threading.Thread(target=lambda: locked.update(c.vault_lock()))
        t.start()
        time.sleep(1.0)
        s.settimeout(30)
        while s.recv(65536):  # the client reads again, to the end
            pass
        s.close()
        t.join(60)
        assert locked.get("state") == "locked"
        c.vault_unlock()
        rows = c.audit(action="models.use")
        assert c.audit_verify()["ok"]
    decisions = [r["decision"] for r in rows if r["request_id"] == request_id]
    assert decisions == ["allow", "outcome"], decisions


# --- the vault's objects ----------------------------------------------------------------------
def test_swapped_objects_and_catalog_edits_fail_verification(
    make_daemon: Any, tmp_path: Path
) -> None:
    d = make_daemon()
    with d.http() as h:
        for name, text in (("d/one.txt", b"one " * 100), ("d/two.txt", b"two, longer " * 100)):
            assert h.put(f"/api/data/{name}", content=text).status_code == 201
    d.stop()
    vault = d.state_dir / "vault"
    with sqlite3.connect(vault / "catalog.db") as db:
        files = dict(db.execute("SELECT name, file FROM objects WHERE kind = 'data'"))
    one, two = vault / "objects" / files["d/one.txt"], vault / "objects" / files["d/two.txt"]
    a, b = one.read_bytes(), two.read_bytes()
    one.write_bytes(b)
    two.write_bytes(a)
    r = d.cli("vault", "verify", "--state-dir", str(d.state_dir))
    assert r.returncode == 1 and "data:d/one.txt" in r.stdout + r.stderr, r.stdout + r.stderr
    d.start()
    with d.http() as h:
        got = h.get("/api/data/d/one.txt")
    assert got.status_code == 409 and "integrity check failed" in got.json()["error"]["message"]
    cli = d.cli("data", "get", "d/one.txt")  # one line, at once: no hang, no traceback
    assert cli.returncode == 1 and cli.stderr.count("\n") == 1 and "Traceback" not in cli.stderr
    d.stop()
    one.write_bytes(a)
    two.write_bytes(b)
    with sqlite3.connect(vault / "catalog.db") as db:  # repoint a row, then edit a sha256
        db.execute("UPDATE objects SET file = ? WHERE name = 'd/one.txt'", [files["d/two.txt"]])
    r = d.cli("vault", "verify", "--state-dir", str(d.state_dir))
    assert r.returncode == 1 and "data:d/one.txt" in r.stdout + r.stderr
    with sqlite3.connect(vault / "catalog.db") as db:
        db.execute(
            "UPDATE objects SET file = ?, sha256 = ? WHERE name = 'd/one.txt'",
            [files["d/one.txt"], "0" * 64],
        )
    r = d.cli("vault", "verify", "--state-dir", str(d.state_dir))
    assert r.returncode == 1 and "data:d/one.txt" in r.stdout + r.stderr


def test_a_version_1_vault_is_migrated_and_a_prior_swap_is_caught(
    model_file: Path, tmp_path: Path
) -> None:
    """Vaults written before format 2: unlock binds every object to its row; an object
    swapped before the upgrade fails its checksum and stays refused."""
    from edgellm.vault import format as fmt
    from edgellm.vault.keys import VaultMeta, create_key_file
    from edgellm.vault.store import VaultStore

    key = create_key_file(tmp_path / "key")
    store = VaultStore.create(tmp_path / "v", key)
    for name, text in (("a", b"alpha" * 50), ("b", b"bravo!" * 50), ("c", b"charlie" * 9)):
        store.put_data(iter([text]), name)
    root = store.root
    # write it back as version 1: headers sealed without identity, vault.json v1
    wrap = key.derive("object-wrap")
    rows = list(store.db["objects"].rows)
    for row in rows:
        path = root / "objects" / row["file"]
        raw = path.read_bytes()
        ident = fmt.identity(row["kind"], row["name"], row["sha256"])
        head = fmt.Header.decode(raw[: fmt.HEADER_LEN])
        dek = fmt.unwrap_dek(wrap, head, ident)
        v1 = fmt.Header(head.segment_shift, head.prefix, head.key_id, b"", 1)
        v1 = fmt.Header(
            v1.segment_shift, v1.prefix, v1.key_id, fmt.wrap_dek(wrap, v1.fixed(), dek), 1
        )
        path.write_bytes(v1.encode() + raw[fmt.HEADER_LEN :])
    meta = VaultMeta.load(root / "vault.json")
    from edgellm.vault.keys import seal_secret

    audit_key = meta.audit_key_for(key)
    (root / "vault.json").write_text(
        json.dumps(
            {**vars(meta), "version": 1, "audit_key": seal_secret(key, audit_key, "audit key")}
        )
    )
    (root / "audit.head").unlink()
    files = {r["name"]: root / "objects" / r["file"] for r in rows}
    fa, fb = files["a"].read_bytes(), files["b"].read_bytes()
    files["a"].write_bytes(fb)
    files["b"].write_bytes(fa)
    del store
    migrated = VaultStore(root, key)
    assert VaultMeta.load(root / "vault.json").version == 2
    assert (root / "audit.head").exists() and migrated.audit.verify()["ok"]
    bad = dict(migrated.verify())
    assert set(bad) == {"data:a", "data:b"} and "version 1 object" in bad["data:a"]
    assert b"".join(open_data(migrated, "c")) == b"charlie" * 9


def open_data(store: Any, name: str) -> list[bytes]:
    with store.open(name, "data") as path, open(path, "rb") as f:
        return [f.read()]


# --- hostile model files ----------------------------------------------------------------------
def test_corrupt_ggufs_are_refused_at_import(
    make_daemon: Any, model_file: Path, tmp_path: Path
) -> None:
    """Five ways llama.cpp would refuse a file only at load: each refused by the
    import's check (the vault hands it the header and the size, as here), and one of
    them through the socket, black-box, leaving nothing stored."""
    from edgellm.errors import InvalidRequest
    from edgellm.runtime.gguf_meta import check_gguf_tensors
    from edgellm.vault.store import HEAD_LIMIT

    made = corruptions(model_file, tmp_path)
    for kind, path in made.items():
        with open(path, "rb") as f:
            head = f.read(HEAD_LIMIT)
        with pytest.raises(InvalidRequest) as err:
            check_gguf_tensors(head, path.stat().st_size, kind)
        assert re.search("not a valid GGUF|truncated or corrupt|unknown type", err.value.message), (
            kind,
            err.value.message,
        )
    d = make_daemon()
    with d.http() as h:
        r = h.put("/api/models/bad", **file_body(made["offset_past_end"]))
        assert r.status_code == 400 and "truncated or corrupt" in r.text, r.text
        assert h.get("/health").json()["status"] == "ready"
        assert [m["name"] for m in h.get("/api/models").json()["models"]] == [MODEL]


def test_a_model_llama_cpp_cannot_load_is_reported_failed_not_retried(
    make_daemon: Any, model_file: Path, tmp_path: Path
) -> None:
    """A file whose every tensor checks out but that llama.cpp refuses (here: an
    architecture it does not know)."""
    raw = bytearray(model_file.read_bytes())
    at = raw.find(b"llama", 0, 4096)
    raw[at : at + 5] = b"lxama"
    odd = tmp_path / "odd.gguf"
    odd.write_bytes(bytes(raw))
    d = make_daemon()
    with d.http() as h:
        assert h.put("/api/models/odd", **file_body(odd)).status_code == 201
        first = h.post("/v1/chat/completions", json={**CHAT, "model": "odd"})
        again = h.post("/v1/chat/completions", json={**CHAT, "model": "odd"})
        health = h.get("/health").json()
    assert first.status_code == 409 and first.headers["x-should-retry"] == "false"
    message = first.json()["error"]["message"]
    assert "lxama" in message and "/proc/self/fd" not in message, message
    assert again.json()["error"]["message"] == message and "Retry-After" not in again.headers
    assert health["models"]["odd"] == "failed" and health["status"] == "degraded"
    assert d.log_text().count("event=model_unusable") == 1


@pytest.mark.parametrize(
    "template,problem",
    [
        (
            "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
            "longer than",
        ),
        ("{{ 'A' * 10**9 }}", "rejected"),
        (
            "{% set ns = namespace(s='AAAAAAAA') %}{% for i in range(40) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            "memory|longer than",
        ),
    ],
)
def test_hostile_chat_templates_fail_their_request_only(
    make_daemon: Any, model_file: Path, tmp_path: Path, template: str, problem: str
) -> None:
    hostile = with_template(model_file, tmp_path / "hostile.gguf", template)
    d = make_daemon(names=(MODEL,))
    with d.client() as c:
        c.import_model("hostile", hostile)
    out: dict[str, Any] = {}

    def neighbour() -> None:  # on the same engine: it pauses at most template_timeout
        with d.http() as h:
            r = h.post(
                "/v1/completions",
                json={"model": "hostile", "prompt": "Count:", "max_tokens": 60, "ignore_eos": True},
            )
            out["finish"] = r.json()["choices"][0]["finish_reason"]

    t = threading.Thread(target=neighbour)
    t.start()
    with d.client() as c:
        wait_for(lambda: any(r["completion_tokens"] for r in c.requests()))
    with d.http() as h:
        r = h.post("/v1/chat/completions", json={**CHAT, "model": "hostile"})
        assert r.status_code == 400 and re.search(problem, r.json()["error"]["message"]), r.text
        assert r.json()["error"]["param"] == "messages"
        ok = h.post("/v1/completions", json={"model": "hostile", "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200  # the model itself still serves
    t.join(120)
    assert out["finish"] == "length"


# --- floods -----------------------------------------------------------------------------------
def test_connections_are_capped_and_slow_headers_time_out(make_daemon: Any) -> None:
    d = make_daemon(
        max_connections=40, max_connections_per_peer=30, header_timeout="3s", idle_timeout="2s"
    )
    held, refused = [], []
    try:
        for _ in range(35):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(d.socket))
            s.send(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # slowloris: never finished
            held.append(s)
        for s in held:
            s.setblocking(False)
        deadline = time.monotonic() + 2  # inside the 3 s header deadline
        settled = 0  # sweeps since the fifth refusal: a sixth may still be on its way
        while settled < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
            settled += len(refused) >= 5
            for s in list(held):
                try:
                    answer = s.recv(4096)
                except BlockingIOError:
                    continue
                held.remove(s)
                refused.append(answer)
        # 30 per peer: the fixture's own health check may still hold one of them
        assert len(refused) in (5, 6) and len(held) + len(refused) == 35, len(refused)
        assert all(
            a.startswith(b"HTTP/1.1 503")
            and b"max_connections_per_peer" in a
            and b"Retry-After: 1" in a
            for a in refused
        )
        for s in held:  # each is closed by the header deadline
            s.setblocking(True)
            s.settimeout(5)
            assert s.recv(100) == b""
        with d.http() as h:
            assert h.get("/health").status_code == 200
        idle = socket.socket(socket.AF_UNIX)  # a finished request, then silence
        idle.connect(str(d.socket))
        idle.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        idle.settimeout(10)
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and idle.recv(4096):
            pass
        assert time.monotonic() < deadline  # closed by the idle timeout
    finally:
        for s in held:
            s.close()
    assert d.log_text().count("event=connection_refused") == 1


def test_a_flood_gets_only_200_and_503(make_daemon: Any) -> None:
    """1,200 requests from 32 clients with max_queue 16: every answer is a 200 or a 503
    with Retry-After, the queue never holds more than max_queue, the daemon's memory
    does not drift, and /health answers throughout."""
    import psutil

    # a one-token prompt and one token back: the flood waits on the door, not on this
    # machine's prefill (a chat prompt's 31 tokens take ~180 ms here; the suite's time
    # is bounded)
    d = make_daemon(max_queue=16)
    assert d.proc is not None
    proc = psutil.Process(d.proc.pid)
    body = {"prompt": "Hi", "max_tokens": 1}
    statuses: list[int] = []
    waiting_seen: list[int] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        with d.http() as h:
            for _ in range(n):
                r = h.post("/v1/completions", json=body)
                with lock:
                    statuses.append(r.status_code)
                    if r.status_code == 503:
                        assert r.headers.get("Retry-After")
                        msg = r.json()["error"]["message"]
                        if "waiting" in msg:
                            waiting_seen.append(int(msg.split("(")[1].split()[0]))

    with d.http() as h:  # warm: the model loaded, allocators settled
        for _ in range(20):
            h.post("/v1/completions", json=body)
    before = proc.memory_info().rss
    threads = [
        threading.Thread(target=client, args=(1200 // 32 + (i < 1200 % 32),)) for i in range(32)
    ]
    for t in threads:
        t.start()
    health = []
    with d.http(timeout=10) as h:
        while any(t.is_alive() for t in threads):
            health.append(h.get("/health").status_code)
            time.sleep(0.5)
    for t in threads:
        t.join()
    after = proc.memory_info().rss
    assert len(statuses) == 1200 and set(statuses) <= {200, 503}, set(statuses)
    assert statuses.count(200) > 0
    assert not waiting_seen or max(waiting_seen) <= 16
    assert health and set(health) == {200}
    assert after < before * 1.10, (before, after)


def test_utf8_encoded_surrogates_are_refused_too(target: Daemon) -> None:
    """Found by bench/fuzz.py: json.loads of bytes decodes with "surrogatepass", so a
    surrogate written as UTF-8 bytes (not as a \\u escape) reached SQLite."""
    body = '{"subject": "user:\ud833", "role": "client"}'.encode("utf-8", "surrogatepass")
    with target.http() as h:
        r = h.post("/api/access/grants", content=body)
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        assert h.get("/health").status_code == 200
