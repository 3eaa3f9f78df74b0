"""Who may do what: principals from the kernel, roles, grants, and the check.

A principal is what SO_PEERCRED says about the peer (uid, gid, pid), resolved to a
user name and its groups; an optional bearer token adds a named identity for
services that share a uid. On the network there is no uid: a bearer token, or the
common name of a verified client certificate (``cert:NAME``), is the identity.
Grants bind a subject (``user:NAME``, ``group:NAME``, ``uid:N``, ``token:NAME`` or
``cert:NAME``) to a role within a scope: client grants to a model (or
``*``), data grants to a data object, or to a prefix of names when the scope ends in
``/`` or ``*`` (``docs/`` covers ``docs/a.txt``). root and the daemon's own user are
admins; nobody else has anything until granted.
"""

from __future__ import annotations

import grp
import hashlib
import hmac
import os
import pwd
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from edgellm.errors import InvalidRequest, PermissionDenied

ROLES: dict[str, set[str]] = {
    "admin": {"*"},
    "operator": {
        "models.list",
        "models.load",
        "requests.read_all",
        "requests.cancel_any",
        "metrics.read",
        "health.read",
        "audit.read",
        "governor.configure",
        "vault.verify",
    },
    "auditor": {
        "audit.read",
        "audit.verify",
        "metrics.read",
        "health.read",
        "models.list",
        "vault.verify",
    },
    "client": {"models.use", "models.list", "health.read"},
    "scraper": {"metrics.read", "health.read"},  # a Prometheus: metrics and nothing else
    "data-reader": {"data.read", "health.read"},
    "data-writer": {"data.read", "data.write", "health.read"},
}
# permissions that hold only within the grant's scope (which model, which data)
SCOPED = {"models.use", "data.read", "data.write"}
SCOPED_ROLES = {"client", "data-reader", "data-writer"}
SUBJECT_KINDS = ("user", "group", "uid", "token", "cert")
TOKEN_SHAPE = re.compile(r"edg_[A-Za-z0-9_-]{32,256}")


@dataclass
class Principal:
    uid: int | None
    gid: int | None = None
    pid: int | None = None
    user: str = ""
    groups: list[str] = field(default_factory=list)
    token: str | None = None  # the name of a valid bearer token, if one was presented
    cert: str | None = None  # a verified client certificate's common name (mutual TLS)
    address: str | None = None  # the network peer's address (None on the Unix socket)

    def subjects(self) -> list[str]:
        out = [f"uid:{self.uid}"] if self.uid is not None else []
        if self.user:
            out.append(f"user:{self.user}")
        out += [f"group:{g}" for g in self.groups]
        if self.token:
            out.append(f"token:{self.token}")
        if self.cert:
            out.append(f"cert:{self.cert}")
        return out

    def key(self) -> str:
        """Whose limits a request counts against: its token, certificate, or user."""
        if self.token:
            return f"token:{self.token}"
        if self.cert:
            return f"cert:{self.cert}"
        return f"user:{self.user}" if self.user else f"uid:{self.uid}"

    def describe(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "gid": self.gid,
            "pid": self.pid,
            "user": self.user,
            "groups": self.groups,
            "token": self.token,
            "cert": self.cert,
            "address": self.address,
        }


def resolve(creds: dict[str, Any]) -> Principal:
    uid = creds.get("uid")
    principal = Principal(uid=uid, gid=creds.get("gid"), pid=creds.get("pid"))
    if uid is not None:
        principal.user, groups = _account(uid, creds.get("gid"))
        principal.groups = list(groups)
    return principal


ACCOUNT_TTL = 2.0  # seconds a uid's name and groups are reused: a change applies after it
_accounts: dict[tuple[int, int | None], tuple[float, str, tuple[str, ...]]] = {}


def _account(uid: int, gid: int | None) -> tuple[str, tuple[str, ...]]:
    """A uid's name and groups from the system's user database (NSS), asked at most
    every ACCOUNT_TTL seconds: every request needs them, and a lookup reads files."""
    now = time.monotonic()
    cached = _accounts.get((uid, gid))
    if cached is not None and cached[0] > now:
        return cached[1], cached[2]
    user = ""
    try:
        entry = pwd.getpwuid(uid)
        user = entry.pw_name
        gids = os.getgrouplist(entry.pw_name, entry.pw_gid)
    except KeyError:  # a uid with no passwd entry (a container, a deleted user)
        gids = [gid] if gid is not None else []
    names = []
    for g in gids:
        try:
            names.append(grp.getgrgid(g).gr_name)
        except KeyError:
            names.append(str(g))
    groups = tuple(sorted(set(names)))
    if len(_accounts) > 1024:
        _accounts.clear()
    _accounts[(uid, gid)] = (now + ACCOUNT_TTL, user, groups)
    return user, groups


def check_subject(subject: str) -> str:
    kind, _, name = subject.partition(":")
    if kind not in SUBJECT_KINDS or not name:
        raise InvalidRequest(
            f"invalid subject {subject!r}: use user:NAME, group:NAME, uid:N or token:NAME",
            param="subject",
        )
    return subject


class AccessPolicy:
    def __init__(self, db: sqlite_utils.Database, lock: threading.Lock) -> None:
        self.db, self._lock = db, lock
        with lock:
            if "grants" not in db.table_names():
                db.table("grants").create(
                    {"subject": str, "role": str, "scope": str}, pk=("subject", "role", "scope")
                )
            elif "model" in db.table("grants").columns_dict:  # from before data grants
                db.table("grants").transform(rename={"model": "scope"})
            if "tokens" not in db.table_names():
                db.table("tokens").create({"name": str, "hash": str}, pk="name")
            tokens = db.table("tokens")
            for column, kind in (("created", float), ("expires", float)):
                if column not in tokens.columns_dict:  # from before expiry
                    tokens.add_column(column, kind)
        self.daemon_uid = os.getuid()

    # --- grants ----------------------------------------------------------------------
    def grant(self, subject: str, role: str, scope: str = "*") -> dict[str, str]:
        check_subject(subject)
        if role not in ROLES:
            raise InvalidRequest(f"unknown role {role!r}: one of {', '.join(ROLES)}", param="role")
        if not scope:
            raise InvalidRequest(
                "the scope is empty: name a model, a data prefix, or *", param="scope"
            )
        row = {"subject": subject, "role": role, "scope": scope if role in SCOPED_ROLES else "*"}
        with self._lock:
            self.db.table("grants").upsert(row, pk=("subject", "role", "scope"))
        return row

    def revoke(self, subject: str, role: str, scope: str = "*") -> bool:
        with self._lock:
            found = self.db.table("grants").count_where(
                "subject = ? and role = ? and scope = ?", [subject, role, scope]
            )
            self.db.table("grants").delete_where(
                "subject = ? and role = ? and scope = ?", [subject, role, scope]
            )
        return bool(found)

    def grants(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self.db.table("grants").rows_where(order_by="subject, role, scope"))

    # --- tokens ------------------------------------------------------------------------
    def create_token(
        self, name: str, expires_in: float | None = None, token: str | None = None
    ) -> str:
        """A new bearer token NAME (replacing any of that name), valid for
        ``expires_in`` seconds (None: until revoked); only its hash is kept. ``token``
        sets its value (the same token on every device of a fleet): ``edg_`` and at
        least 32 URL-safe characters, as edgellm makes them."""
        if token is None:
            token = "edg_" + secrets.token_urlsafe(32)
        elif not TOKEN_SHAPE.fullmatch(token):
            raise InvalidRequest(
                "a token is edg_ followed by at least 32 URL-safe characters "
                "(letters, digits, - and _); make one with `edgellm access token`",
                param="token",
            )
        now = time.time()
        row = {
            "name": name,
            "hash": _hash(token),
            "created": now,
            "expires": None if expires_in is None else now + expires_in,
        }
        with self._lock:
            self.db.table("tokens").upsert(row, pk="name")
        return token

    def revoke_token(self, name: str) -> bool:
        with self._lock:
            found = self.db.table("tokens").count_where("name = ?", [name])
            self.db.table("tokens").delete_where("name = ?", [name])
        return bool(found)

    def tokens(self) -> list[dict[str, Any]]:
        """The tokens by name, when made and until when (never their hashes)."""
        with self._lock:
            rows = self.db.conn.execute(
                "SELECT name, created, expires FROM tokens ORDER BY name"
            ).fetchall()
        return [{"name": n, "created": c, "expires": e} for n, c, e in rows]

    def find_token(self, token: str | None) -> tuple[str | None, bool]:
        """The name of the token presented and whether it has expired; (None, False)
        for a token that is not (or no longer) one of ours. Every stored hash is
        compared, in constant time, so the answer's timing tells nothing."""
        if not token:
            return None, False
        digest = _hash(token)
        with self._lock:
            rows = self.db.conn.execute("SELECT name, hash, expires FROM tokens").fetchall()
        found = None
        for name, h, expires in rows:
            if hmac.compare_digest(h, digest):
                found = (name, expires is not None and expires <= time.time())
        return found or (None, False)

    def token_name(self, token: str | None) -> str | None:
        """The name of a valid (known, unexpired) token, else None."""
        name, expired = self.find_token(token)
        return None if expired else name

    # --- decisions -----------------------------------------------------------------------
    def roles(self, p: Principal) -> dict[str, set[str]]:
        """role → scopes (``*`` for all) that this principal holds."""
        if p.uid in (0, self.daemon_uid):
            return {"admin": {"*"}}
        subjects = p.subjects()
        if not subjects:
            return {}
        marks = ",".join("?" * len(subjects))
        with self._lock:  # plain SQL: asked on every request
            rows = self.db.conn.execute(
                f"SELECT role, scope FROM grants WHERE subject IN ({marks})", subjects
            ).fetchall()
        held: dict[str, set[str]] = {}
        for role, scope in rows:
            held.setdefault(role, set()).add(scope)
        return held

    def allowed(self, p: Principal, permission: str, resource: str | None = None) -> bool:
        """Whether ``p`` holds ``permission``; for a scoped one, on ``resource`` (a model
        or data name; None asks whether it holds it on anything)."""
        for role, scopes in self.roles(p).items():
            perms = ROLES[role]
            if "*" in perms:
                return True
            if permission in perms and (
                permission not in SCOPED
                or resource is None
                or any(in_scope(resource, s) for s in scopes)
            ):
                return True
        return False

    def require(self, p: Principal, permission: str, resource: str | None = None) -> None:
        if not self.allowed(p, permission, resource):
            who = p.user or f"uid {p.uid}"
            kind = "model" if permission.startswith("models.") else "data"
            what = f"{permission} on {kind} {resource}" if resource else permission
            raise PermissionDenied(
                f"permission denied: {who} lacks {what}; ask an admin "
                f"to grant it (edgellm access grant …)",
                param=permission,
            )


def in_scope(resource: str, scope: str) -> bool:
    if scope == "*" or scope == resource:
        return True
    if scope.endswith("*"):
        return resource.startswith(scope[:-1])
    return scope.endswith("/") and resource.startswith(scope)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
