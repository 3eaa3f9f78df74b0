"""The vault through a real daemon: locked mode, unlock and lock, passphrases, key
rotation, data objects, and audit retention."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edgellm.errors import EdgeError, VaultLocked, WrongKey

from conftest import MODEL, Daemon, wait_for

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def _start_without_key(make_daemon: Any, tmp_path: Path, **settings: Any) -> tuple[Daemon, Path]:
    """A daemon whose key file is not where its settings say: it starts locked."""
    d = make_daemon(**settings)
    d.stop()
    kept = tmp_path / "kept.key"
    d.key_file.rename(kept)
    return d.start(), kept


def test_a_locked_vault_refuses_what_needs_it_and_unlocks(make_daemon: Any, tmp_path: Path) -> None:
    d, kept = _start_without_key(make_daemon, tmp_path)
    assert "event=vault_locked" in d.log_text()
    with d.http() as h:
        assert h.get("/health").json()["status"] == "ready"  # up, and says it is locked:
        assert h.get("/api/vault").json()["state"] == "locked"
        assert [m["id"] for m in h.get("/v1/models").json()["data"]] == [MODEL]
        for method, path, body in [
            ("POST", "/v1/chat/completions", CHAT),
            ("POST", f"/api/models/{MODEL}/load", None),
            ("GET", "/api/data/anything", None),
            ("GET", "/api/audit/verify", None),
        ]:
            r = h.request(method, path, json=body)
            assert r.status_code == 503, path
            assert r.json()["error"]["code"] == "vault_locked"
            assert "vault is locked" in r.json()["error"]["message"]
            assert int(r.headers["Retry-After"]) > 0
        bad = h.post("/api/vault/unlock", json={"key": "00" * 32})
        assert bad.status_code == 400 and "wrong vault key" in bad.json()["error"]["message"]
        short = h.post("/api/vault/unlock", json={"key": "abc"})
        assert short.status_code == 400 and "64 hex digits" in short.json()["error"]["message"]
        nothing = h.post("/api/vault/unlock", json={})  # the daemon's own key file: missing
        assert nothing.status_code == 400 and "no vault key" in nothing.json()["error"]["message"]
    unlocked = d.cli("vault", "unlock", "--key-file", str(kept))
    assert unlocked.returncode == 0 and unlocked.stdout.strip() == "vault unlocked"
    with d.client() as c:
        assert c.chat([{"role": "user", "content": "Hi"}], max_tokens=2)["usage"]
        assert c.vault_status()["state"] == "unlocked"
        assert c.audit(action="vault.manage")[0]["resource"] == "/api/vault/unlock"
    locked = d.cli("vault", "lock")
    assert locked.returncode == 0 and f"unloaded: {MODEL}" in locked.stdout
    with d.client() as c:
        assert c.ps() == []
        with pytest.raises(EdgeError, match="vault is locked"):
            c.chat([{"role": "user", "content": "Hi"}], max_tokens=2)
        c.vault_unlock(key=kept.read_bytes())
        assert c.chat([{"role": "user", "content": "Hi"}], max_tokens=2)["usage"]
        rows = c.audit(action="vault.manage")
        assert [r["resource"] for r in rows] == [
            "/api/vault/unlock",
            "/api/vault/lock",
            "/api/vault/unlock",
        ]
        assert c.audit_verify()["ok"]
    assert d.alive()


def test_the_client_raises_the_daemons_own_error_and_its_retry_after(
    make_daemon: Any, tmp_path: Path
) -> None:
    d, kept = _start_without_key(make_daemon, tmp_path)
    with d.client() as c:
        with pytest.raises(VaultLocked) as locked:
            c.chat([{"role": "user", "content": "Hi"}], max_tokens=2)
        assert locked.value.status == 503 and locked.value.retry_after == 30
        with pytest.raises(WrongKey, match="wrong vault key"):
            c.vault_unlock(key=bytes(32))
    shown = d.cli("audit", "verify")
    assert shown.returncode == 1 and "Traceback" not in shown.stderr
    assert shown.stderr.startswith("error: vault is locked") and "retry in 30s" in shown.stderr
    assert d.alive()


def test_a_passphrase_vault_starts_locked_and_opens_by_the_passphrase(make_daemon: Any) -> None:
    d = make_daemon()
    d.stop()
    rotated = d.cli("vault", "rotate-key", "--passphrase", input="correct horse battery\n")
    assert rotated.returncode == 0, rotated.stderr
    assert "opens by the new passphrase" in rotated.stdout
    d.start()  # the key file is still there, but this vault now ignores it
    status = d.cli("vault", "status")
    assert "opened by passphrase): locked" in status.stdout
    wrong = d.cli("vault", "unlock", input="wrong horse\n")
    assert wrong.returncode == 1 and "wrong vault key" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    right = d.cli("vault", "unlock", input="correct horse battery\n")
    assert right.returncode == 0 and "vault unlocked" in right.stdout
    with d.client() as c:
        assert c.chat([{"role": "user", "content": "Hi"}], max_tokens=2)["usage"]


def test_rotation_through_the_daemon_and_a_restart(make_daemon: Any) -> None:
    d = make_daemon()
    old = d.key_file.read_bytes()
    with d.client() as c:
        before = c.chat(
            [{"role": "user", "content": "Say hi"}], max_tokens=4, seed=1, temperature=0
        )["choices"][0]["message"]["content"]
        result = c.vault_rotate()
        assert result["rotated"] == 1 and result["key_source"] == "key"
    assert d.key_file.read_bytes() != old and d.key_file.stat().st_mode & 0o777 == 0o600
    d.stop()
    d.start()  # opens with the new key file
    with d.client() as c:
        c.unload(MODEL)
        after = c.chat(
            [{"role": "user", "content": "Say hi"}], max_tokens=4, seed=1, temperature=0
        )["choices"][0]["message"]["content"]
        assert after == before  # the same model, decrypted with the rewrapped data key
        assert c.vault_verify() == {"ok": True, "bad": []}
        assert c.audit_verify()["ok"]  # the chain's key survived the rotation


def test_data_objects_through_the_cli_and_the_client(make_daemon: Any, tmp_path: Path) -> None:
    d = make_daemon()
    blob = os.urandom(3 << 20) + b"MARKER-7f3a-plaintext" * 1000
    src = tmp_path / "blob.bin"
    src.write_bytes(blob)
    put = d.cli("data", "put", "adapters/lora.bin", str(src))
    assert put.returncode == 0 and put.stdout.startswith("stored adapters/lora.bin")
    listed = d.cli("data", "ls", "adapters/")
    assert "adapters/lora.bin" in listed.stdout and str(len(blob)) in listed.stdout
    out = tmp_path / "out.bin"
    got = d.cli("data", "get", "adapters/lora.bin", "--out", str(out))
    assert got.returncode == 0 and out.read_bytes() == blob
    assert out.stat().st_mode & 0o777 == 0o600
    with d.client() as c:
        assert b"".join(c.data_get("adapters/lora.bin")) == blob
        assert c.data("adapters/")[0]["sha256"] == hashlib.sha256(blob).hexdigest()
    for p in d.state_dir.rglob("*"):  # encrypted at rest
        assert not p.is_file() or b"MARKER-7f3a" not in p.read_bytes()
    assert d.cli("data", "rm", "adapters/lora.bin").returncode == 0
    assert d.cli("data", "ls").stdout.strip() == "no data objects"
    # offline, with the key, when no daemon runs
    d.stop()
    assert d.cli("data", "put", "notes.txt", str(src)).returncode == 0
    offline = d.cli("data", "get", "notes.txt", "--out", str(out))
    assert offline.returncode == 0 and out.read_bytes() == blob


def test_bad_data_requests_get_clear_errors(make_daemon: Any, tmp_path: Path) -> None:
    d = make_daemon()
    src = tmp_path / "f.txt"
    src.write_bytes(b"x" * (3 << 20))
    with d.client() as c:
        c.data_put("a.txt", src)
    with d.http() as h:
        r = h.get("/api/data/missing.txt")
        assert r.status_code == 404 and "no data object named 'missing.txt'" in r.text
        r = h.put("/api/data/%2E%2E/etc/passwd", content=b"x")  # names are never paths
        assert r.status_code == 400 and "invalid data name '../etc/passwd'" in r.text
        r = h.put("/api/data/bad name", content=b"x")
        assert r.status_code == 400 and "invalid data name 'bad name'" in r.text
        r = h.put("/api/data/a.txt", params={"replace": "0"}, content=b"x")
        assert r.status_code == 409 and "already exists" in r.text
        r = h.put("/api/data/b.txt", content=b"abc", headers={"X-Content-Sha256": "0" * 64})
        assert r.status_code == 409 and "checksum mismatch for b.txt" in r.text
        assert h.get("/api/data").json()["data"][0]["name"] == "a.txt"  # nothing else stored
    catalog = sqlite3.connect(d.state_dir / "vault" / "catalog.db")
    file = catalog.execute(
        "SELECT file FROM objects WHERE kind = 'data' AND name = 'a.txt'"
    ).fetchone()[0]
    obj = d.state_dir / "vault" / "objects" / file
    raw = bytearray(obj.read_bytes())
    raw[(1 << 20) + 16 + 85 + 10] ^= 1  # inside segment 1
    obj.write_bytes(bytes(raw))
    with d.http() as h:
        r = h.get("/api/data/a.txt")
        assert r.status_code == 409
        assert r.json()["error"]["message"] == "integrity check failed for a.txt (segment 1)"
        assert h.get("/health").json()["status"] == "ready"
    bad = d.cli("vault", "verify")
    assert bad.returncode == 1 and "data:a.txt: segment 1 failed authentication" in bad.stdout
    assert d.alive()


def test_audit_retention_keeps_a_signed_checkpoint(make_daemon: Any) -> None:
    d = make_daemon()
    with d.client() as c:
        for _ in range(4):
            c.load(MODEL)
        total = len(c.audit()) + 1  # the prune request is recorded before it runs
        assert c.audit_prune(keep_rows=2)["pruned"] == total - 2
        assert [r["action"] for r in c.audit()] == ["models.load", "audit.manage"]
        verdict = c.audit_verify()
        assert verdict["ok"] and verdict["checkpoint"]["pruned"] == total - 2
    assert "signed checkpoint" in d.cli("audit", "verify").stdout
    db = sqlite3.connect(d.state_dir / "vault" / "audit.db", isolation_level=None)
    first = db.execute("SELECT min(seq) FROM audit").fetchone()[0]
    db.execute("DELETE FROM audit WHERE seq = ?", [first])  # prune without the key
    with d.client() as c:
        verdict = c.audit_verify()
        assert not verdict["ok"] and f"before {first + 1} were deleted" in verdict["problem"]
        db.execute(
            "UPDATE checkpoint SET seq = seq + 1, mac = (SELECT mac FROM audit "
            "ORDER BY seq LIMIT 1)"
        )  # and move the checkpoint to cover it
        verdict = c.audit_verify()
        assert not verdict["ok"] and "checkpoint was altered" in verdict["problem"]
    usage = d.cli("audit", "prune")
    assert usage.returncode == 2 and "--older-than" in usage.stderr


def test_the_daemon_prunes_by_its_settings(make_daemon: Any) -> None:
    d = make_daemon(audit_keep_rows=3)
    with d.client() as c:
        for _ in range(5):
            c.load(MODEL)
    d.stop()
    d.start()  # retention runs at start-up (then hourly)
    with d.client() as c:
        rows = wait_for(lambda: [r for r in c.audit() if r["action"] == "audit.retention"])
        assert rows[0]["completion_tokens"] == 2  # five rows, three kept
        assert [r["action"] for r in c.audit()] == ["models.load"] * 3 + ["audit.retention"]
        assert c.audit_verify()["ok"] and c.audit_verify()["checkpoint"] is not None
