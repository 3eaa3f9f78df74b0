"""The audit log: an append-only SQLite table whose rows are chained by HMAC.

Each row carries HMAC-SHA256(audit key, previous row's MAC || canonical row), the
key derived from the vault's master key, so rewriting history needs the key.
Prompts and outputs are never stored; a keyed hash of the prompt lets an auditor
see that two requests asked the same thing. Writes fail closed: a row that cannot
be written (disk full, database locked past a short timeout) refuses the request.

Retention deletes the oldest rows and keeps one signed checkpoint: the last deleted
row's number and MAC, HMAC'd with the audit key, so the rows that remain still
verify from there, and deleting rows without the key is still detected.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import sqlite_utils

from edgellm.errors import AuditUnavailable, VaultLocked

FIELDS = (
    "seq",
    "time",
    "request_id",
    "uid",
    "user",
    "pid",
    "exe",
    "action",
    "resource",
    "decision",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "finish_reason",
    "prompt_hmac",
)
# columns added since: a row's MAC covers those it has (not NULL), so rows written
# before a column existed verify as they were written, and setting or clearing the
# column on any row breaks its MAC
LATER_FIELDS = (
    "tools_offered",  # the tools a generation offered, by name (comma-separated)
    "tools_called",  # those it called, in order (names only, never arguments)
    "address",  # a network caller's address (none on the Unix socket)
)
GENESIS = b"\x00" * 32
log = logging.getLogger("edgellm.vault")


INT64 = 1 << 63


def clean(value: Any) -> Any:
    """A field as the log keeps it, never failing: text that UTF-8 cannot encode (an
    executable's path with stray bytes, a lone surrogate) is escaped, not dropped —
    its bytes as ``\\xNN`` — and integers beyond SQLite's 64 bits are kept as text
    (``int:N``)."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raw = value.encode(
                "utf-8", "surrogateescape" if _escaped_bytes(value) else "surrogatepass"
            )
            return raw.decode("utf-8", "backslashreplace")
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):  # beyond 64 bits: as text SQLite will not read as a number
        return value if -INT64 <= value < INT64 else f"int:{value}"
    if value is None or isinstance(value, float):
        return value
    return clean(str(value))


def _escaped_bytes(text: str) -> bool:
    """Whether every surrogate is one of Python's escaped bytes (U+DC80–U+DCFF), as
    os.readlink and aiohttp give undecodable bytes."""
    return all("\udc80" <= c <= "\udcff" for c in text if "\ud800" <= c <= "\udfff")


def canonical(row: dict[str, Any]) -> bytes:
    values: list[Any] = [row.get(f) for f in FIELDS]
    later = {f: row[f] for f in LATER_FIELDS if row.get(f) is not None}
    if later:
        values.append(later)
    return json.dumps(values, separators=(",", ":"), ensure_ascii=False).encode()


def chain_mac(key: bytes, previous: bytes, row: dict[str, Any]) -> bytes:
    return hmac.new(key, previous + canonical(row), hashlib.sha256).digest()


def cutoff(days: float) -> str:
    """The audit time stamp ``days`` ago (rows older than it go at retention)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - days * 86400)) + "Z"


def _locked() -> Exception:
    return VaultLocked(
        "vault is locked: the audit log cannot be written or verified until `edgellm vault unlock`"
    )


def head_mac(key: bytes, head: dict[str, Any]) -> str:
    body = json.dumps([head["seq"], head["mac"], head.get("tampered")], separators=(",", ":"))
    return hmac.new(key, b"head\x00" + body.encode(), hashlib.sha256).hexdigest()


def checkpoint_mac(key: bytes, cp: dict[str, Any]) -> str:
    body = json.dumps([cp["seq"], cp["mac"], cp["time"], cp["pruned"]], separators=(",", ":"))
    return hmac.new(key, b"checkpoint\x00" + body.encode(), hashlib.sha256).hexdigest()


class _Pending:
    """A row waiting for a commit, and what became of it."""

    __slots__ = ("fields", "seq", "error", "done")

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields, self.seq, self.done = fields, 0, False
        self.error: Exception | None = None


class AuditLog:
    def __init__(
        self,
        path: Any,
        key: bytes | None = None,
        busy_timeout: float = 2.0,
        head: Path | None = None,
    ) -> None:
        self._key = key
        # the signed head: the newest row's number and MAC, outside the database, so
        # rows deleted from its end (or the database itself) are detected (HEAD below)
        self.head_path = head
        self.head_required = False
        # its own connection: a slow or locked audit write must not hold the catalog's
        self._conn = sqlite3.connect(
            path, timeout=busy_timeout, check_same_thread=False, isolation_level=None
        )
        # a write-ahead log: one fsync per row instead of a rollback journal's three,
        # still durable at every commit (synchronous=FULL); 1.1 ms → 0.34 ms a row here
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self.db = sqlite_utils.Database(self._conn)
        self._lock = threading.Lock()  # the connection, and the one writer at a time
        self._pending_lock = threading.Lock()
        self._pending: list[_Pending] = []  # rows waiting for the next commit
        if "audit" not in self.db.table_names():
            columns: dict[str, Any] = {f: str for f in FIELDS + LATER_FIELDS}
            columns.update(
                seq=int,
                uid=int,
                pid=int,
                status=int,
                prompt_tokens=int,
                completion_tokens=int,
                latency_ms=float,
                mac=str,
            )
            self.db.table("audit").create(columns, pk="seq")
        audit = self.db.table("audit")
        for f in LATER_FIELDS:  # a log from before the column: its rows keep NULL
            if f not in audit.columns_dict:
                audit.add_column(f, str)
        if "checkpoint" not in self.db.table_names():
            self.db.table("checkpoint").create(
                {"id": int, "seq": int, "mac": str, "time": str, "pruned": int, "sig": str}, pk="id"
            )

    def set_key(self, key: bytes | None, head_required: bool | None = None) -> None:
        self._key = key
        if head_required is not None:
            self.head_required = head_required

    # --- the signed head -------------------------------------------------------------
    def read_head(self, key: bytes) -> tuple[dict[str, Any] | None, str | None]:
        """The head and what is wrong with it (None: nothing)."""
        if self.head_path is None:
            return None, None
        try:
            head = json.loads(self.head_path.read_text())
            good = hmac.compare_digest(str(head.get("sig")), head_mac(key, head))
        except FileNotFoundError:
            return None, (
                "the signed audit head is missing (audit.head was deleted, or the log replaced)"
            ) if self.head_required else None
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            return None, "the signed audit head is unreadable"
        if not good:
            return None, "the signed audit head was altered (its signature does not match)"
        return head, None

    def _head_problem(
        self, key: bytes, last_seq: int, mac_at: Any
    ) -> tuple[dict[str, Any] | None, str | None]:
        """Compare the head with the log: the row it names must be there, with its MAC
        (the log may be ahead of the head, if a crash came between commit and head)."""
        head, problem = self.read_head(key)
        if head is None or problem:
            return head, problem
        if head["seq"] > last_seq:
            return head, (
                f"rows {last_seq + 1}–{head['seq']} were deleted from the end of "
                f"the log (the signed head says it reached row {head['seq']})"
            )
        if mac_at(head["seq"]) != head["mac"]:
            return head, (
                f"row {head['seq']} is not the row the signed head names: the log "
                "was rolled back or replaced"
            )
        return head, None

    def _mac_at(self, seq: int) -> str | None:
        if seq == 0:
            return GENESIS.hex()
        row = self._conn.execute("SELECT mac FROM audit WHERE seq = ?", [seq]).fetchone()
        if row is not None:
            return row[0]
        cp = self.checkpoint()
        return cp["mac"] if cp and cp["seq"] == seq else None

    def _check_head(self, key: bytes, last_seq: int, last_mac: str) -> dict[str, Any] | None:
        """Before a commit: what the new head carries on (a tamper finding stays in
        every later head, signed, so writing on does not erase the evidence)."""
        if self.head_path is None:
            return None
        head, problem = self._head_problem(key, last_seq, self._mac_at)
        carried = head.get("tampered") if head else None
        if problem and not carried:
            log.error("event=audit_tampered problem=%r", problem)
        return {"tampered": carried or problem}

    def _write_head(self, key: bytes, seq: int, mac: str, base: dict[str, Any] | None) -> None:
        if self.head_path is None:
            return
        head = {"seq": seq, "mac": mac, "tampered": (base or {}).get("tampered")}
        head["sig"] = head_mac(key, head)
        # no fsync: the commit before it is durable, so after a crash the head is at
        # worst behind the log, never ahead of it (which is what verify allows)
        tmp = self.head_path.with_name(f".tmp-{self.head_path.name}")
        tmp.write_text(json.dumps(head))
        os.replace(tmp, self.head_path)

    def start_head(self) -> None:
        """Write the head from the log as it is (a new vault, or one from before heads:
        the log is taken as it stands then, and guarded from there on)."""
        key = self._need_key()
        with self._lock:
            last = self._conn.execute(
                "SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            if last is None:
                cp = self.checkpoint()
                last = (cp["seq"], cp["mac"]) if cp else (0, GENESIS.hex())
            self._write_head(key, last[0], last[1], None)

    def _need_key(self) -> bytes:
        if self._key is None:
            raise _locked()
        return self._key

    def prompt_hash(self, text: str) -> str:
        mac = hmac.new(self._need_key(), b"prompt\x00" + text.encode(), hashlib.sha256)
        return mac.hexdigest()[:32]

    def append(self, **fields: Any) -> int:
        """Write one row, chained to the last, and return its number once it is durable;
        raise AuditUnavailable if it cannot be written.

        Group commit: rows that arrive while a commit is under way wait for it, and the
        next writer commits all of them in one transaction (one fsync), so concurrent
        requests share the cost of durability instead of queueing for one fsync each."""
        key = self._need_key()
        mine = _Pending(fields)
        with self._pending_lock:
            self._pending.append(mine)
        with self._lock:
            if not mine.done:
                self._commit_queued(key)
        if mine.error is not None:
            raise mine.error
        return mine.seq

    def defer(self, **fields: Any) -> _Pending:
        """Queue a row that nothing waits on for the next commit, whoever makes it (an
        ``append`` or ``flush``); its ``done`` and ``error`` tell what became of it."""
        self._need_key()
        pending = _Pending(fields)
        with self._pending_lock:
            self._pending.append(pending)
        return pending

    def flush(self) -> None:
        """Commit the rows queued by ``defer`` now, if no commit has taken them yet."""
        key = self._need_key()
        with self._lock:
            self._commit_queued(key)

    def _commit_queued(self, key: bytes) -> None:
        """Commit every queued row (called with the writer's lock held)."""
        with self._pending_lock:
            batch, self._pending = self._pending, []
        if batch:
            self._commit(key, batch)

    def _commit(self, key: bytes, batch: list[_Pending]) -> None:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                last = self._conn.execute(
                    "SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1"
                ).fetchone()
                if last is None:
                    cp = self.checkpoint()
                    last = (cp["seq"], cp["mac"]) if cp else (0, GENESIS.hex())
                seq, previous = last[0], bytes.fromhex(last[1])
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
                head = self._check_head(key, seq, previous.hex())
                rows, written = [], []
                for pending in batch:
                    try:  # one row that cannot be made fails alone, never its neighbours
                        row = {f: clean(pending.fields.get(f)) for f in FIELDS + LATER_FIELDS}
                        row.update(seq=seq + 1, time=stamp)
                        mac = chain_mac(key, previous, row)
                    except Exception as exc:
                        log.error("event=audit_row_refused error=%r", str(exc))
                        pending.error = AuditUnavailable(
                            f"this request's audit row cannot be written ({exc})"
                        )
                        continue
                    seq += 1
                    row["mac"], previous = mac.hex(), mac
                    rows.append(row)
                    written.append(pending)
                if rows:
                    cols = ", ".join(rows[0])
                    self._conn.executemany(
                        f"INSERT INTO audit ({cols}) VALUES ({', '.join('?' * len(rows[0]))})",
                        [list(r.values()) for r in rows],
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            for pending, row in zip(written, rows, strict=True):
                pending.seq = row["seq"]
            if rows:
                self._write_head(key, seq, previous.hex(), head)
        except Exception as exc:  # every row of the batch shares the commit's fate
            error = (
                AuditUnavailable(
                    f"the audit log cannot be written ({exc}); refusing "
                    "the request rather than serving it unaudited",
                    retry_after=5,
                )
                if isinstance(exc, sqlite3.Error)
                else exc
            )
            for pending in batch:
                if pending.error is None:
                    pending.error = error
        finally:
            for pending in batch:
                pending.done = True

    def rows(
        self,
        since: str | None = None,
        until: str | None = None,
        user: str | None = None,
        action: str | None = None,
        decision: str | None = None,
        model: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[dict[str, Any]]:
        where, args = [], []
        for column, value in (
            ("time >= ?", since),
            ("time <= ?", until),
            ("user = ?", user),
            ("action = ?", action),
            ("decision = ?", decision),
            ("resource = ?", model),
        ):
            if value is not None:
                where.append(column)
                args.append(value)
        order = "seq desc" if newest_first else "seq"
        with self._lock:
            return list(
                self.db.table("audit").rows_where(
                    " and ".join(where) or None, args, order_by=order, limit=limit
                )
            )

    def checkpoint(self) -> dict[str, Any] | None:
        rows = list(self.db.table("checkpoint").rows)
        return rows[0] if rows else None

    def prune(self, before: str | None = None, keep_rows: int | None = None) -> int:
        """Delete rows older than ``before`` (ISO time) and beyond the newest
        ``keep_rows``, leaving a signed checkpoint; returns how many went."""
        key = self._need_key()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                bounds = []
                if before is not None:
                    bounds.append(
                        self._conn.execute(
                            "SELECT max(seq) FROM audit WHERE time < ?", [before]
                        ).fetchone()[0]
                    )
                if keep_rows is not None:
                    top = self._conn.execute("SELECT max(seq) FROM audit").fetchone()[0]
                    bounds.append(None if top is None else top - keep_rows)
                upto = max((b for b in bounds if b is not None), default=None)
                row = (
                    self._conn.execute(
                        "SELECT seq, mac FROM audit WHERE seq <= ? ORDER BY seq DESC LIMIT 1",
                        [upto],
                    ).fetchone()
                    if upto is not None
                    else None
                )
                if row is None:
                    self._conn.execute("ROLLBACK")
                    return 0
                gone = self._conn.execute("DELETE FROM audit WHERE seq <= ?", [row[0]]).rowcount
                old = self.checkpoint()
                cp = {
                    "id": 1,
                    "seq": row[0],
                    "mac": row[1],
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "pruned": (old["pruned"] if old else 0) + gone,
                }
                cp["sig"] = checkpoint_mac(key, cp)
                self._conn.execute(
                    "INSERT OR REPLACE INTO checkpoint (id, seq, mac, time, "
                    "pruned, sig) VALUES (:id, :seq, :mac, :time, :pruned, "
                    ":sig)",
                    cp,
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return gone

    def apply_retention(self, keep_days: float, keep_rows: int) -> int:
        """The configured retention (0 keeps everything); the pruning is itself
        recorded, with the number of rows in ``completion_tokens``."""
        if not keep_days and not keep_rows:
            return 0
        gone = self.prune(
            before=cutoff(keep_days) if keep_days else None, keep_rows=keep_rows or None
        )
        if gone:
            log.info("event=audit_pruned rows=%d", gone)
            self.append(
                action="audit.retention",
                resource="audit",
                decision="allow",
                status=200,
                completion_tokens=gone,
                user="edgellm",
            )
        return gone

    def verify(self) -> dict[str, Any]:
        """Walk the chain from the genesis or the retention checkpoint; name the first
        row that was changed, deleted, inserted or reordered."""
        key = self._need_key()
        previous, expected_seq, count = GENESIS, 1, 0
        cp = self.checkpoint()
        base: dict[str, Any] = {"checkpoint": None}
        if cp is not None:
            if not hmac.compare_digest(cp["sig"] or "", checkpoint_mac(key, cp)):
                return {
                    "ok": False,
                    "rows": 0,
                    "first_bad": None,
                    **base,
                    "problem": "the retention checkpoint was altered (its signature "
                    "does not match)",
                }
            previous, expected_seq = bytes.fromhex(cp["mac"]), cp["seq"] + 1
            base["checkpoint"] = {"seq": cp["seq"], "time": cp["time"], "pruned": cp["pruned"]}
        for row in self.rows():
            count += 1
            if row["seq"] != expected_seq:
                what = "deleted" if row["seq"] > expected_seq else "reordered or inserted"
                return {
                    "ok": False,
                    "rows": count,
                    "first_bad": row["seq"],
                    **base,
                    "problem": f"row(s) before {row['seq']} were {what} "
                    f"(expected row {expected_seq})",
                }
            if not hmac.compare_digest(
                bytes.fromhex(row["mac"] or "00"), chain_mac(key, previous, row)
            ):
                return {
                    "ok": False,
                    "rows": count,
                    "first_bad": row["seq"],
                    **base,
                    "problem": f"row {row['seq']} was changed, inserted or moved "
                    "(its MAC does not match)",
                }
            previous, expected_seq = bytes.fromhex(row["mac"]), expected_seq + 1
        with self._lock:  # the chain holds: its end must be the row the signed head names
            head, problem = self._head_problem(key, expected_seq - 1, self._mac_at)
        if problem is None and head is not None and head.get("tampered"):
            problem = "earlier: " + head["tampered"]
        if problem:
            return {"ok": False, "rows": count, "first_bad": None, **base, "problem": problem}
        return {"ok": True, "rows": count, "first_bad": None, "problem": None, **base}
