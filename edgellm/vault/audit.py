"""The audit log: an append-only SQLite table whose rows are chained by HMAC.

Each row carries HMAC-SHA256(audit key, previous row's MAC || canonical row), the
key derived from the vault's master key, so rewriting history needs the key.
Prompts and outputs are never stored; a keyed hash of the prompt lets an auditor
see that two requests asked the same thing. Writes fail closed: a row that cannot
be written (disk full, database locked past a short timeout) refuses the request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import threading
import time
from typing import Any

import sqlite_utils

from edgellm.errors import Unavailable

FIELDS = ("seq", "time", "request_id", "uid", "user", "pid", "exe", "action", "resource",
          "decision", "status", "prompt_tokens", "completion_tokens", "latency_ms",
          "finish_reason", "prompt_hmac")
GENESIS = b"\x00" * 32


class AuditUnavailable(Unavailable):
    code = "audit_unavailable"


def canonical(row: dict[str, Any]) -> bytes:
    return json.dumps([row.get(f) for f in FIELDS], separators=(",", ":"),
                      ensure_ascii=False).encode()


def chain_mac(key: bytes, previous: bytes, row: dict[str, Any]) -> bytes:
    return hmac.new(key, previous + canonical(row), hashlib.sha256).digest()


def executable(pid: int | None) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe") if pid else ""
    except OSError:
        return ""


class AuditLog:
    def __init__(self, path: Any, key: bytes, busy_timeout: float = 2.0) -> None:
        self._key = key
        # its own connection: a slow or locked audit write must not hold the catalog's
        self._conn = sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False,
                                     isolation_level=None)
        self.db = sqlite_utils.Database(self._conn)
        self._lock = threading.Lock()
        if "audit" not in self.db.table_names():
            columns: dict[str, Any] = {f: str for f in FIELDS}
            columns.update(seq=int, uid=int, pid=int, status=int, prompt_tokens=int,
                           completion_tokens=int, latency_ms=float, mac=str)
            self.db["audit"].create(columns, pk="seq")

    def prompt_hash(self, text: str) -> str:
        return hmac.new(self._key, b"prompt\x00" + text.encode(), hashlib.sha256).hexdigest()[:32]

    def append(self, **fields: Any) -> int:
        """Write one row, chained to the last; raise AuditUnavailable if it cannot be."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    last = self._conn.execute(
                        "SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                    seq = (last[0] + 1) if last else 1
                    previous = bytes.fromhex(last[1]) if last else GENESIS
                    row = {f: fields.get(f) for f in FIELDS}
                    row.update(seq=seq, time=time.strftime("%Y-%m-%dT%H:%M:%S",
                                                           time.gmtime()) + "Z")
                    row["mac"] = chain_mac(self._key, previous, row).hex()
                    cols = ", ".join(row)
                    self._conn.execute(f"INSERT INTO audit ({cols}) VALUES "
                                       f"({', '.join('?' * len(row))})", list(row.values()))
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise AuditUnavailable(f"the audit log cannot be written ({exc}); refusing "
                                       "the request rather than serving it unaudited",
                                       retry_after=5) from None
            return seq

    def rows(self, since: str | None = None, until: str | None = None, user: str | None = None,
             action: str | None = None, decision: str | None = None, model: str | None = None,
             limit: int | None = None, newest_first: bool = False) -> list[dict[str, Any]]:
        where, args = [], []
        for column, value in (("time >= ?", since), ("time <= ?", until), ("user = ?", user),
                              ("action = ?", action), ("decision = ?", decision),
                              ("resource = ?", model)):
            if value is not None:
                where.append(column)
                args.append(value)
        order = "seq desc" if newest_first else "seq"
        with self._lock:
            return list(self.db["audit"].rows_where(" and ".join(where) or None, args,
                                                    order_by=order, limit=limit))

    def verify(self) -> dict[str, Any]:
        """Walk the chain; name the first row that was changed, deleted, inserted or
        reordered."""
        previous, expected_seq, count = GENESIS, 1, 0
        for row in self.rows():
            count += 1
            if row["seq"] != expected_seq:
                what = "deleted" if row["seq"] > expected_seq else "reordered or inserted"
                return {"ok": False, "rows": count, "first_bad": row["seq"],
                        "problem": f"row(s) before {row['seq']} were {what} "
                                   f"(expected row {expected_seq})"}
            if not hmac.compare_digest(bytes.fromhex(row["mac"] or "00"),
                                       chain_mac(self._key, previous, row)):
                return {"ok": False, "rows": count, "first_bad": row["seq"],
                        "problem": f"row {row['seq']} was changed, inserted or moved "
                                   "(its MAC does not match)"}
            previous, expected_seq = bytes.fromhex(row["mac"]), expected_seq + 1
        return {"ok": True, "rows": count, "first_bad": None, "problem": None}
