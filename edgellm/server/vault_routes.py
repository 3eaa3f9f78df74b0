"""The vault's routes: its key (status, unlock, lock, rotate, verify), data objects,
access grants and tokens, and the audit log."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from aiohttp import web

from edgellm.config import parse_duration
from edgellm.errors import InvalidRequest, NotFound, VaultKeyError
from edgellm.progress import Report, counted
from edgellm.server.context import STATE, WHO, State, body_chunks, read_json, who_of
from edgellm.server.routes import Audit, RouteTable
from edgellm.vault.keys import KEY_LEN, MasterKey, from_passphrase
from edgellm.vault.open import key_from_settings, rotate_to_new_key_file

log = logging.getLogger("edgellm.vault")

route = RouteTable()


def _state(request: web.Request) -> State:
    return request.app[STATE]


def _run(fn: Any, *args: Any) -> Any:
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


# --- the key -------------------------------------------------------------------------------
@route.get("/api/vault", permission="health.read")
async def vault_status(request: web.Request) -> web.Response:
    v = _state(request).vault
    meta = v.meta
    models, data = v.list(), v.list_data()
    return web.json_response(
        {
            "state": "locked" if v.locked else "unlocked",
            "path": str(v.root),
            "key_id": meta.key_id,
            "passphrase": meta.kdf is not None,
            "key_source": v.key_source.split(" ")[0] if v.key_source else None,
            "models": len(models),
            "data": len(data),
            "bytes": sum(m.size for m in models) + sum(d["size"] for d in data),
        }
    )


def _key_from_body(st: State, body: Any, who: str) -> MasterKey:
    meta = st.vault.meta
    if not isinstance(body, dict):
        body = {}
    if "passphrase" in body:
        if meta.kdf is None:
            raise InvalidRequest(
                "this vault is opened by a key file, not a passphrase", param="passphrase"
            )
        return from_passphrase(str(body["passphrase"]), meta.kdf)
    if "key" in body:
        try:
            raw = bytes.fromhex(str(body["key"]))
        except ValueError:
            raw = b""
        if len(raw) != KEY_LEN:
            raise InvalidRequest("key must be 64 hex digits (a 256-bit key)", param="key")
        return MasterKey(raw, f"key sent by {who}")
    return key_from_settings(st.settings, meta)  # the daemon's own key file or credential


# no audit key until it has run: the handler writes its row once it has
@route.post("/api/vault/unlock", permission="vault.manage", audit=Audit.HANDLER)
async def vault_unlock(request: web.Request) -> web.Response:
    st = _state(request)
    body = await read_json(request) if request.can_read_body else {}
    if not st.vault.locked:
        return web.json_response({"state": "unlocked", "already": True})
    who = request[WHO].user or f"uid {request['who'].uid}"
    try:
        key = await _run(_key_from_body, st, body, who)
        await _run(st.vault.unlock, key)
    except VaultKeyError as exc:
        log.warning("event=vault_unlock_failed by=%s reason=%s", who, exc.message)
        raise
    log.info("event=vault_unlocked by=%s", who)
    await st.record(
        request, action="vault.manage", resource="/api/vault/unlock", decision="allow", status=200
    )
    return web.json_response({"state": "unlocked", "already": False})


@route.post("/api/vault/lock", permission="vault.manage")
async def vault_lock(request: web.Request) -> web.Response:
    """Unload every model (their requests end) and forget the key."""
    st = _state(request)
    st.locking = True  # new requests are refused as if locked; running ones end
    try:
        unloaded = [m.name for m in st.runtime.loaded()]
        for name in unloaded:
            await _run(st.runtime.unload, name)
        await st.requests_settled(timeout=st.settings.shutdown_grace + 5)
        await st.settle_records()  # their outcome rows, under the key still held
        st.vault.lock()
    finally:
        st.locking = False
    log.info("event=vault_locked unloaded=%s", ",".join(unloaded) or "-")
    return web.json_response({"state": "locked", "unloaded": unloaded})


@route.post("/api/vault/rotate", permission="vault.manage")
async def vault_rotate(request: web.Request) -> web.Response:
    """A new master key: ``{"passphrase": …}`` switches to that passphrase; ``{}``
    writes a new random key into the daemon's key file."""
    st = _state(request)
    body = await read_json(request) if request.can_read_body else {}
    vault = st.vault
    with st.jobs.run("vault.rotate", "vault", who_of(request)) as job:
        count = await _rotate(st, body, job.report)
    return web.json_response(
        {
            "rotated": count,
            "key_id": vault.meta.key_id,
            "key_source": vault.key_source.split(" ")[0],
        }
    )


async def _rotate(st: State, body: Any, report: Report) -> int:
    vault = st.vault
    if isinstance(body, dict) and "passphrase" in body:
        from edgellm.vault.keys import new_kdf_params

        passphrase = str(body["passphrase"])
        if len(passphrase) < 8:
            raise InvalidRequest(
                "the new passphrase is shorter than 8 characters", param="passphrase"
            )
        kdf = new_kdf_params()
        report("derive the key from the passphrase")
        new = await _run(from_passphrase, passphrase, kdf)
        return int(await _run(vault.rotate_key, new, kdf, report))
    return int(await _run(rotate_to_new_key_file, vault, st.settings.vault_key_file, report))


@route.get("/api/vault/verify", permission="vault.verify")
async def vault_verify(request: web.Request) -> web.Response:
    """Every object, or with ``?model=NAME`` that model's."""
    bad = await _run(_state(request).vault.verify, request.query.get("model"))
    return web.json_response({"ok": not bad, "bad": [{"name": n, "problem": p} for n, p in bad]})


# --- data objects ----------------------------------------------------------------------------
@route.get("/api/data", permission=None)  # the objects the caller may read
async def list_data(request: web.Request) -> web.Response:
    st, who = _state(request), request[WHO]
    rows = st.vault.list_data(request.query.get("prefix", ""))
    rows = [r for r in rows if st.access.allowed(who, "data.read", r["name"])]
    return web.json_response({"data": rows})


# reading a secret is worth a row
@route.get("/api/data/{name:.+}", permission="data.read", scope="name", audit=Audit.BEFORE)
async def get_data(request: web.Request) -> web.StreamResponse:
    """The plaintext, once every segment is authenticated (it is decrypted into
    memory first, so a bad object is an error, never a truncated download)."""
    vault, name = _state(request).vault, request.match_info["name"]
    info = vault.data_info(name)
    opened = vault.open(name, "data")
    path = await _run(opened.__enter__)
    try:
        # the object's own length: checked against the catalog's sha256 on opening
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(os.path.getsize(path)),
                "X-Content-Sha256": info["sha256"],
            }
        )
        await response.prepare(request)
        with open(path, "rb") as f:  # a memory file: reading it does not block
            while chunk := f.read(1 << 20):
                await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        await _run(opened.__exit__, None, None, None)


@route.put("/api/data/{name:.+}", permission="data.write", scope="name")
async def put_data(request: web.Request) -> web.Response:
    st, name = _state(request), request.match_info["name"]
    with st.jobs.run("data.put", name, who_of(request)) as job:
        chunks = counted(body_chunks(request), job.report, "receive", request.content_length)
        info = await _run(
            lambda: st.vault.put_data(
                chunks,
                name,
                replace=request.query.get("replace", "1") != "0",
                expected_sha256=request.headers.get("X-Content-Sha256"),
                source=request.headers.get("X-Data-Source", "upload"),
            )
        )
    return web.json_response(info, status=201)


@route.delete("/api/data/{name:.+}", permission="data.write", scope="name")
async def remove_data(request: web.Request) -> web.Response:
    info = _state(request).vault.remove_data(request.match_info["name"])
    return web.json_response({**info, "removed": True})


# --- access --------------------------------------------------------------------------------
@route.get("/api/access/whoami", permission=None)  # the caller's own roles
async def whoami(request: web.Request) -> web.Response:
    st, who = _state(request), request[WHO]
    roles = st.access.roles(who) if st.access else {"admin": {"*"}}
    return web.json_response({**who.describe(), "roles": {k: sorted(v) for k, v in roles.items()}})


@route.post("/api/access/tokens", permission="access.manage")
async def create_token(request: web.Request) -> web.Response:
    """A bearer token (a service that shares a uid with others, or a caller on the
    network); shown once. ``expires_in`` (seconds, or "30d"): when it stops working."""
    body = await read_json(request)
    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest('send {"name": …}: the token\'s name', param="name")
    unknown = set(body) - {"name", "expires_in", "token"}
    if unknown:
        raise InvalidRequest(f"unknown field {sorted(unknown)[0]!r}", param=sorted(unknown)[0])
    expires_in = None
    if body.get("expires_in") is not None:
        try:
            expires_in = parse_duration(body["expires_in"])
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="expires_in") from None
        if expires_in <= 0:
            raise InvalidRequest("expires_in must be a positive duration", param="expires_in")
    given = body.get("token")
    if given is not None and not isinstance(given, str):
        raise InvalidRequest("token is a string (edg_…)", param="token")
    token = _state(request).access.create_token(name.strip(), expires_in, given)
    return web.json_response(
        {"name": name.strip(), "subject": f"token:{name.strip()}", "token": token}, status=201
    )


@route.get("/api/access/tokens", permission="access.manage")
async def list_tokens(request: web.Request) -> web.Response:
    """The tokens by name, when made and until when (never the tokens themselves)."""
    return web.json_response({"tokens": _state(request).access.tokens()})


@route.delete("/api/access/tokens/{name}", permission="access.manage")
async def revoke_token(request: web.Request) -> web.Response:
    """The token stops working at once (its grants to token:NAME stay, for a new one)."""
    name = request.match_info["name"]
    if not _state(request).access.revoke_token(name):
        raise NotFound(f"no token named {name!r}", param="name")
    return web.json_response({"name": name, "revoked": True})


@route.get("/api/access/grants", permission="access.manage")
async def list_grants(request: web.Request) -> web.Response:
    return web.json_response({"grants": _state(request).access.grants()})


@route.post("/api/access/grants", permission="access.manage")
@route.delete("/api/access/grants", permission="access.manage")
async def change_grant(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict) or not {"subject", "role"} <= set(body):
        raise InvalidRequest('send {"subject": …, "role": …, "scope": …}')
    policy = _state(request).access
    subject, role = str(body["subject"]), str(body["role"])
    scope = str(body.get("scope") or body.get("model") or "*")
    if request.method == "POST":
        return web.json_response(policy.grant(subject, role, scope), status=201)
    if not policy.revoke(subject, role, scope):
        raise NotFound(
            f"no grant of {role} to {subject}" + (f" on {scope}" if scope != "*" else "")
        )
    return web.json_response({"subject": subject, "role": role, "scope": scope, "revoked": True})


# --- audit ----------------------------------------------------------------------------------
def _whole(q: Any, name: str) -> int | None:
    value = q.get(name)
    if value is None:
        return None
    text = str(value)
    # ASCII digits only: "²".isdigit() holds, and int() refuses it
    if isinstance(value, bool) or not (text.isascii() and text.isdigit()):
        raise InvalidRequest(f"{name} must be a whole number", param=name)
    if len(text) > 18:  # what SQLite's 64-bit integers hold, with room
        raise InvalidRequest(f"{name} is too large (at most 18 digits)", param=name)
    return int(text)


@route.get("/api/audit", permission="audit.read")
async def audit_rows(request: web.Request) -> web.Response:
    q = request.query
    await _state(request).settle_records()  # outcome rows still being written
    rows = _state(request).vault.audit.rows(
        since=q.get("since"),
        until=q.get("until"),
        user=q.get("user"),
        action=q.get("action"),
        decision=q.get("decision"),
        model=q.get("model"),
        limit=_whole(q, "limit"),
        newest_first=q.get("order") == "newest",
    )
    return web.json_response({"rows": rows})


@route.get("/api/audit/verify", permission="audit.verify")
async def audit_verify(request: web.Request) -> web.Response:
    await _state(request).settle_records()
    return web.json_response(await _run(_state(request).vault.audit.verify))


@route.post("/api/audit/prune", permission="audit.manage")
async def audit_prune(request: web.Request) -> web.Response:
    """Retention by hand: ``{"older_than_days": N}`` and/or ``{"keep_rows": N}``."""
    from edgellm.vault.audit import cutoff

    body = await read_json(request)
    if not isinstance(body, dict) or not {"older_than_days", "keep_rows"} & set(body):
        raise InvalidRequest('send {"older_than_days": N} and/or {"keep_rows": N}')
    days, keep = _whole(body, "older_than_days"), _whole(body, "keep_rows")
    await _state(request).settle_records()
    audit = _state(request).vault.audit
    gone = await _run(
        lambda: audit.prune(before=cutoff(days) if days is not None else None, keep_rows=keep)
    )
    return web.json_response({"pruned": gone, "checkpoint": audit.checkpoint()})
