"""The audit log against a real daemon: what is recorded, tampering of each kind,
and refusing to serve when a row cannot be written."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

import pytest

from edgellm.errors import AuditUnavailable
from edgellm.vault.audit import AuditLog

from conftest import MODEL, Daemon, wait_for

CHAT = {
    "messages": [{"role": "user", "content": "The secret word is PARSNIP."}],
    "max_tokens": 3,
    "ignore_eos": True,
}


@pytest.fixture
def d(make_daemon: Any) -> Daemon:
    return make_daemon()


def _db(d: Daemon) -> sqlite3.Connection:
    return sqlite3.connect(d.state_dir / "vault" / "audit.db", isolation_level=None)


def test_requests_are_recorded_without_their_text(d: Daemon) -> None:
    with d.http() as h:
        first = h.post("/v1/chat/completions", json=CHAT)
        again = h.post("/v1/chat/completions", json=CHAT)
        h.post(f"/api/models/{MODEL}/unload")
    with d.client() as c:
        rows = c.audit()
        verdict = c.audit_verify()
    uses = [r for r in rows if r["action"] == "models.use"]
    assert [r["decision"] for r in uses] == ["allow", "outcome", "allow", "outcome"]
    outcome = uses[1]
    assert outcome["request_id"] == first.headers["X-Request-Id"]
    assert outcome["status"] == 200 and outcome["completion_tokens"] == 3
    assert outcome["finish_reason"] == "length" and outcome["latency_ms"] > 0
    assert outcome["uid"] == 0 and outcome["user"] == "root" and outcome["pid"] > 0
    assert outcome["exe"].endswith(("python3", "python3.11", "python"))
    assert uses[0]["prompt_hmac"] == uses[2]["prompt_hmac"]  # same prompt, same keyed hash
    assert uses[2]["request_id"] == again.headers["X-Request-Id"]
    assert any(r["action"] == "models.load" and r["resource"] == MODEL for r in rows)
    raw = b"".join(p.read_bytes() for p in (d.state_dir / "vault").glob("audit.db*"))
    assert b"PARSNIP" not in raw and b"secret word" not in raw
    assert verdict == {
        "ok": True,
        "rows": len(rows),
        "first_bad": None,
        "problem": None,
        "checkpoint": None,
    }


def test_search_and_the_cli(d: Daemon) -> None:
    with d.http() as h:
        h.post("/v1/chat/completions", json=CHAT)
        h.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    with d.client() as c:
        outcomes = c.audit(decision="outcome")
        assert [r["status"] for r in outcomes] == [200, 404]
        assert [r["resource"] for r in c.audit(model="nope")] == ["nope", "nope"]
        assert c.audit(user="nobody") == []
    tail = d.cli("audit", "tail", "-n", "2")
    assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 2
    assert "status=404" in tail.stdout
    exported = d.cli("audit", "export").stdout.splitlines()
    assert len(exported) == 4 and '"mac":' in exported[0]
    assert d.cli("audit", "verify").stdout.strip() == "audit chain intact: 4 rows"


def _rows(d: Daemon, n: int = 4) -> None:
    with d.http() as h:
        for _ in range(n // 2):
            h.post("/v1/chat/completions", json=CHAT)


FORGED = (
    "INSERT INTO audit (seq, time, action, decision, mac) "
    "VALUES (3, '2026-01-01T00:00:00Z', 'models.use', 'allow', '00')"
)
TAMPERING: dict[str, tuple[list[str], int]] = {
    "changed": (["UPDATE audit SET completion_tokens = 999 WHERE seq = 2"], 2),
    "deleted": (["DELETE FROM audit WHERE seq = 2"], 3),
    # rows 3.. move up by one to make room for a forged row 3
    "inserted": (
        [
            "UPDATE audit SET seq = seq + 100 WHERE seq >= 3",
            "UPDATE audit SET seq = seq - 99 WHERE seq >= 103",
            FORGED,
        ],
        3,
    ),
    "reordered": (
        [
            "UPDATE audit SET seq = -2 WHERE seq = 2",
            "UPDATE audit SET seq = 2 WHERE seq = 3",
            "UPDATE audit SET seq = 3 WHERE seq = -2",
        ],
        2,
    ),
}


@pytest.mark.parametrize("kind", list(TAMPERING))
def test_tampering_is_detected_and_named(d: Daemon, kind: str) -> None:
    _rows(d)
    statements, first_bad = TAMPERING[kind]
    db = _db(d)
    for sql in statements:
        db.execute(sql)
    db.close()
    with d.client() as c:
        result = c.audit_verify()
    assert result["ok"] is False and result["first_bad"] == first_bad, result
    verdict = d.cli("audit", "verify")
    assert verdict.returncode == 1
    assert f"audit chain broken at row {first_bad}" in verdict.stderr


def test_no_row_no_service(d: Daemon) -> None:
    with d.http() as h:
        assert h.post("/v1/chat/completions", json=CHAT).status_code == 200
        blocker = _db(d)
        blocker.execute("BEGIN EXCLUSIVE")  # the audit log cannot be written
        try:
            refused = h.post("/v1/chat/completions", json=CHAT)
            assert refused.status_code == 503 and "Retry-After" in refused.headers
            assert "audit log cannot be written" in refused.json()["error"]["message"]
            load = h.post(f"/api/models/{MODEL}/unload")
            assert load.status_code == 503
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert h.post("/v1/chat/completions", json=CHAT).status_code == 200
    with d.client() as c:
        assert c.audit_verify()["ok"] is True
        assert c.ps()  # the unload was refused, the model is still loaded


def test_rows_that_arrive_during_a_commit_share_the_next_one(tmp_path: Any) -> None:
    """Group commit: writers that queue while one commit is under way are written
    together, in one transaction, each still chained and numbered in order."""
    log = AuditLog(tmp_path / "audit.db", key=b"k" * 32)
    commits: list[str] = []
    log._conn.set_trace_callback(lambda sql: sql == "COMMIT" and commits.append(sql))
    log.append(action="first", decision="allow")
    seqs: list[int] = []
    with log._lock:  # a commit under way: the next eight writers queue behind it
        threads = [
            threading.Thread(
                target=lambda i=i: seqs.append(log.append(action=f"a{i}", decision="allow"))
            )
            for i in range(8)
        ]
        for t in threads:
            t.start()
        wait_for(lambda: len(log._pending) == 8)
    for t in threads:
        t.join()
    assert len(commits) == 2  # the first row's, then all eight in one
    assert sorted(seqs) == list(range(2, 10))
    assert [r["action"] for r in log.rows()][0] == "first"
    assert log.verify() == {
        "ok": True,
        "rows": 9,
        "first_bad": None,
        "problem": None,
        "checkpoint": None,
    }


def test_a_failed_group_commit_fails_every_row_in_it(tmp_path: Any) -> None:
    log = AuditLog(tmp_path / "audit.db", key=b"k" * 32, busy_timeout=0.1)
    blocker = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    errors: list[str] = []

    def write(i: int) -> None:
        try:
            log.append(action=f"a{i}", decision="allow")
        except AuditUnavailable as exc:
            errors.append(exc.message)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    blocker.execute("ROLLBACK")
    assert len(errors) == 4 and all("audit log cannot be written" in e for e in errors)
    assert log.append(action="after", decision="allow") == 1  # nothing half-written
    assert log.verify()["ok"] is True


def test_a_deferred_row_rides_the_next_commit_or_is_flushed_alone(tmp_path: Any) -> None:
    """An outcome row nobody waits on joins the next writer's transaction; ``flush``
    commits it alone when no writer comes, and commits nothing when none is queued."""
    log = AuditLog(tmp_path / "audit.db", key=b"k" * 32)
    commits: list[str] = []
    log._conn.set_trace_callback(lambda sql: sql == "COMMIT" and commits.append(sql))
    outcome = log.defer(action="outcome", decision="ok")
    assert not outcome.done and log.rows() == []
    assert log.append(action="next", decision="allow") == 2  # the deferred row is first
    assert outcome.done and outcome.error is None and len(commits) == 1
    log.flush()
    assert len(commits) == 1  # nothing was queued
    alone = log.defer(action="alone", decision="ok")
    log.flush()
    assert alone.done and len(commits) == 2
    assert [r["action"] for r in log.rows()] == ["outcome", "next", "alone"]
    assert log.verify()["ok"] is True


def test_text_that_is_not_utf8_is_escaped_and_one_bad_row_fails_alone(tmp_path: Any) -> None:
    """An executable's path with a stray byte (as os.readlink gives it), a lone
    surrogate: both stored, escaped. A row that cannot be made at all fails alone,
    never the rows committed with it."""

    class Unprintable:
        def __str__(self) -> str:
            raise ValueError("no text for this")

    log = AuditLog(tmp_path / "audit.db", key=b"k" * 32)
    first = log.defer(action="a", decision="allow", exe="/tmp/cu\udcffrl")
    bad = log.defer(action="b", decision="allow", resource=Unprintable())
    third = log.defer(action="c", decision="allow", user="x\ud800y", uid=2**70)
    log.flush()
    assert first.error is None and third.error is None and first.seq == 1 and third.seq == 2
    assert isinstance(bad.error, AuditUnavailable) and "no text for this" in str(bad.error)
    rows = log.rows()
    assert [r["exe"] for r in rows][0] == "/tmp/cu\\xffrl"
    assert rows[1]["user"] == "x\\xed\\xa0\\x80y" and rows[1]["uid"] == f"int:{2**70}"
    assert log.verify()["ok"] is True


def test_the_signed_head_catches_what_the_chain_cannot(tmp_path: Any) -> None:
    head = tmp_path / "audit.head"
    log = AuditLog(tmp_path / "audit.db", key=b"k" * 32, head=head)
    log.set_key(b"k" * 32, head_required=True)
    log.start_head()
    for i in range(5):
        log.append(action=f"a{i}", decision="allow")
    assert log.verify()["ok"] is True
    db = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    db.execute("DELETE FROM audit WHERE seq >= 4")
    result = log.verify()
    assert not result["ok"] and "rows 4–5 were deleted from the end" in result["problem"]
    log.append(action="after", decision="allow")  # writing on keeps the finding
    result = log.verify()
    assert not result["ok"] and result["problem"].startswith("earlier: rows 4–5")
    head.write_text(head.read_text().replace('"seq": 4', '"seq": 3'))
    assert "altered" in log.verify()["problem"]
    head.unlink()
    assert "missing" in log.verify()["problem"]


def test_a_log_from_before_the_tool_columns_verifies_and_the_new_rows_cover_them(
    tmp_path: Any,
) -> None:
    """A log written before tools_offered and tools_called existed gains the columns
    when opened; its rows verify as they were written, a new row's MAC covers them,
    and setting or clearing either on any row is detected."""
    import sqlite3

    from edgellm.vault import audit

    path = tmp_path / "audit.db"
    old = AuditLog(path, key=b"k" * 32)
    old._conn.execute("ALTER TABLE audit DROP COLUMN tools_offered")
    old._conn.execute("ALTER TABLE audit DROP COLUMN tools_called")
    later, audit.LATER_FIELDS = audit.LATER_FIELDS, ()
    try:  # as an older edgellm wrote it
        old.append(action="models.use", decision="allow")
    finally:
        audit.LATER_FIELDS = later
        old._conn.close()
    log = AuditLog(path, key=b"k" * 32)
    log.append(action="models.use", decision="outcome", tools_offered="a,b", tools_called="b")
    log.append(action="models.use", decision="outcome")
    rows = log.rows()
    assert [(r["tools_offered"], r["tools_called"]) for r in rows] == [
        (None, None),
        ("a,b", "b"),
        (None, None),
    ]
    assert log.verify()["ok"] is True
    log._conn.close()
    for seq, column, value in [
        (2, "tools_called", "a"),
        (2, "tools_called", None),
        (1, "tools_offered", "x"),
    ]:
        with sqlite3.connect(path) as conn:
            before = conn.execute(f"SELECT {column} FROM audit WHERE seq = ?", (seq,)).fetchone()[0]
            conn.execute(f"UPDATE audit SET {column} = ? WHERE seq = ?", (value, seq))
        check = AuditLog(path, key=b"k" * 32)
        result = check.verify()
        check._conn.close()
        assert result["ok"] is False and result["first_bad"] == seq, (column, value)
        with sqlite3.connect(path) as conn:
            conn.execute(f"UPDATE audit SET {column} = ? WHERE seq = ?", (before, seq))
