"""A seeded fuzzer for the socket API: every route and method, with hostile paths,
queries, headers and bodies, sent as raw bytes (so headers that are not UTF-8 and
lengths that lie can be sent at all). A case fails on a 5xx (other than a 503 with
Retry-After and one of the documented codes), a hang, or a connection dropped without
an answer. A failing case is shrunk — headers, query and body dropped or simplified
while it still fails — and printed as the raw request that reproduces it.

Used by tests/test_fuzz.py (about a minute, in CI) and bench/fuzz.py (longer runs).
"""

from __future__ import annotations

import contextlib
import json
import random
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from edgellm.server.app import add_routes

# 503s the appliance gives by design (busy, locked, shedding), always with Retry-After
DOCUMENTED_503 = {
    "queue_full",
    "vault_locked",
    "governor_shedding",
    "shutting_down",
    "audit_unavailable",
    "insufficient_memory",
    "model_backing_off",
    "engine_failed",
    "deadline_exceeded",
    "too_many_connections",
    "unavailable",
    "model_load_failed",
}
# what a fuzzing root must not do to the daemon it fuzzes (each has its own tests)
ROOT_SKIPS = {
    ("POST", "/api/vault/lock"),
    ("POST", "/api/vault/rotate"),
    ("PUT", "/api/governor"),
    ("POST", "/api/audit/prune"),
}

WEIRD_TEXT = [
    "",
    " ",
    "a" * 5000,
    "..",
    "../../etc/passwd",
    "\x00",
    "é",
    "\u202e",
    "💥",
    "\ud800",
    "\udcff",
    "%ff",
    "%00",
    "%C2%B2",
    "${jndi:x}",
    "'; DROP TABLE x; --",
    "-1",
    "0",
    "1e309",
    "99999999999999999999",
    "NaN",
    "true",
    "null",
    "[]",
    "{}",
]
WEIRD_NUMBERS: list[Any] = [
    -1,
    0,
    1,
    2**31,
    2**63,
    2**64 + 1,
    -(2**63) - 1,
    10**30,
    1e309,
    -1e309,
    0.5,
    3.14,
    True,
    False,
    None,
    "1",
    "²",
    int("9" * 4000),
]
FIELDS = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stream",
    "stream_options",
    "seed",
    "keep_alive",
    "timeout",
    "n",
    "logprobs",
    "input",
    "encoding_format",
    "dimensions",
    "inputs",
    "outputs",
    "encoding",
    "pin",
    "unpin",
    "thresholds",
    "subject",
    "role",
    "scope",
    "name",
    "older_than_days",
    "keep_rows",
    "passphrase",
    "key",
    "role",
    "content",
    "tools",
    "response_format",
]
QUERY_KEYS = [
    "limit",
    "since",
    "until",
    "user",
    "action",
    "decision",
    "model",
    "order",
    "prefix",
    "force",
    "replace",
    "to",
    "exclude",
]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "GE T"]


def route_table() -> list[tuple[str, str]]:
    app = web.Application()
    add_routes(app.router)
    return sorted(
        {
            (r.method, r.resource.canonical)
            for r in app.router.routes()
            if r.resource is not None and r.method != "HEAD"
        }
    )


@dataclass
class Case:
    method: str
    path: str
    query: list[tuple[str, str]] = field(default_factory=list)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    lying_length: int | None = None  # a Content-Length that is not the body's

    def raw(self) -> bytes:
        target = self.path.encode("utf-8", "surrogatepass")
        if self.query:
            target += b"?" + b"&".join(
                k.encode("utf-8", "surrogatepass") + b"=" + v.encode("utf-8", "surrogatepass")
                for k, v in self.query
            )
        lines = [
            self.method.encode() + b" " + target + b" HTTP/1.1",
            b"Host: edgellm",
            b"Connection: close",
        ]
        lines += [k + b": " + v for k, v in self.headers]
        length = len(self.body) if self.lying_length is None else self.lying_length
        if self.body or self.lying_length is not None:
            lines.append(b"Content-Length: %d" % length)
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


def _complete(data: bytes) -> bool:
    """Whether a whole response with a Content-Length has arrived."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return value.strip().isdigit() and len(body) >= int(value.strip())
    return False


@dataclass
class Outcome:
    status: int | None  # None: no answer
    problem: str | None  # why the case fails, or None
    head: bytes = b""


def send(sock_path: str, case: Case, timeout: float) -> Outcome:
    """Send the case and read the answer at the same time, as a socket peer may (a
    large answer to a request whose body is still being sent must not deadlock)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    out, data = memoryview(case.raw()), b""
    deadline = time.monotonic() + timeout
    try:
        s.connect(sock_path)
        s.setblocking(False)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return Outcome(None, f"no answer within {timeout:g}s (a hang)")
            readable, writable, _ = select.select([s], [s] if out else [], [], left)
            if writable:
                try:
                    out = out[s.send(out[:65536]) :]
                except (BrokenPipeError, ConnectionResetError):
                    out = memoryview(b"")  # answered early (a 413): the answer is there
            if readable:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    break
                data += chunk
                if len(data) > 1 << 22 or _complete(data):
                    break  # answered (the server may linger to drain an unread body)
    finally:
        s.close()
    if not data.startswith(b"HTTP/1."):
        return Outcome(None, "the connection closed without an answer")
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return Outcome(None, f"an unreadable status line: {head[:80]!r}")
    if status >= 500:
        code = ""
        with contextlib.suppress(ValueError, KeyError, TypeError):
            code = json.loads(body)["error"]["code"]
        retry = b"\r\nretry-after:" in head.lower()
        if not (status == 503 and retry and code in DOCUMENTED_503):
            return Outcome(status, f"{status} {code or body[:200]!r}", head)
    return Outcome(status, None, head)


class Fuzzer:
    def __init__(self, seed: int, names: dict[str, str], as_root: bool) -> None:
        self.rng = random.Random(seed)
        self.names = names  # route parameter → a real value (a model, a data object)
        self.as_root = as_root
        self.routes = [r for r in route_table() if not (as_root and r in ROOT_SKIPS)]

    # --- values ---------------------------------------------------------------------
    def text(self) -> str:
        r = self.rng
        pick = r.random()
        if pick < 0.5:
            return r.choice(WEIRD_TEXT)
        if pick < 0.8:
            return "".join(
                chr(
                    r.choice(
                        [
                            r.randrange(32, 127),
                            r.randrange(0x80, 0x3000),
                            r.randrange(0xD800, 0xE000),
                        ]
                    )
                )
                for _ in range(r.randrange(1, 40))
            )
        return r.choice(list(self.names.values()) or ["x"])

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        pick = r.random()
        if depth > 3 or pick < 0.35:
            return r.choice(WEIRD_NUMBERS)
        if pick < 0.65:
            return self.text()
        if pick < 0.8:
            return [self.value(depth + 1) for _ in range(r.randrange(0, 4))]
        return {self.rng.choice(FIELDS): self.value(depth + 1) for _ in range(r.randrange(0, 4))}

    def body(self, path: str) -> bytes:
        r = self.rng
        pick = r.random()
        if pick < 0.08:
            depth = r.choice([50, 1200, 100_000])
            return b"[" * depth + b"]" * depth
        if pick < 0.12:
            return b'{"max_tokens": ' + b"9" * r.choice([4301, 20000]) + b"}"
        if pick < 0.17:
            return bytes(r.randrange(256) for _ in range(r.randrange(1, 200)))  # not UTF-8
        if pick < 0.2:
            return b""
        if pick < 0.23:
            return b'{"a": "' + b"x" * r.choice([2 << 20, 900_000]) + b'"}'
        base = self.valid(path)
        for _ in range(r.randrange(0, 4)):  # mutate a valid body: wrong types, extra keys
            key = r.choice(list(base) + FIELDS)
            base[key] = self.value()
        if r.random() < 0.1:
            base = self.value()  # not even an object
        text = json.dumps(base, ensure_ascii=r.random() < 0.5, default=str)
        return text.encode("utf-8", "surrogatepass")

    def valid(self, path: str) -> dict[str, Any]:
        """A body that route takes (small: one token), as the start of a mutation."""
        model = self.names.get("model", "m")
        if "chat" in path:
            return {
                "model": model,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 1,
            }
        if "completions" in path:
            return {"model": model, "prompt": "Hi", "max_tokens": 1}
        if "embeddings" in path:
            return {"input": "hello"}
        if "grants" in path:
            return {"subject": "user:nobody", "role": "client", "scope": "x"}
        if "tokens" in path:
            return {"name": "fuzz"}
        if "prune" in path:
            return {"keep_rows": 10}
        if "governor" in path:
            return {"thresholds": {"memory": {"elevated": 0.9}}}
        return {}

    def path(self, template: str, method: str) -> str:
        r = self.rng
        out = template
        for param in ("name", "id"):
            token = "{" + param + "}"
            if token in out:
                # root never aims a removal or a replacement at the real model
                use_real = (
                    param in self.names
                    and r.random() < 0.4
                    and not (self.as_root and method in ("DELETE", "PUT"))
                )
                value = self.names.get(param, "x") if use_real else self.text()
                if self.as_root and method in ("DELETE", "PUT") and value in self.names.values():
                    value = "not-" + value
                out = out.replace(
                    token,
                    value.replace("?", "%3F")
                    .replace("#", "%23")
                    .replace(" ", "%20")
                    .replace("\r", "")
                    .replace("\n", ""),
                )
        if r.random() < 0.05:
            out += r.choice(["/", "//", "/..", "%2F..", "/%00", "/\udcff"])
        return out

    def headers(self) -> list[tuple[bytes, bytes]]:
        r = self.rng
        out: list[tuple[bytes, bytes]] = []
        if r.random() < 0.5:
            out.append(
                (
                    b"Content-Type",
                    r.choice(
                        [
                            b"application/json",
                            b"text/plain",
                            b"application/octet-stream",
                            b"multipart/form-data; boundary=x",
                        ]
                    ),
                )
            )
        if r.random() < 0.3:
            out.append(
                (
                    b"Authorization",
                    r.choice(
                        [
                            b"Bearer " + bytes(r.randrange(128, 256) for _ in range(12)),
                            b"Bearer edg_" + b"A" * r.choice([1, 43, 5000]),
                            b"Bearer",
                            b"Basic Zm9vOmJhcg==",
                            b"Bearer \xff\xfe",
                            b"Bearer " + "é".encode(),
                        ]
                    ),
                )
            )
        if r.random() < 0.15:
            out.append((b"X-Content-Sha256", r.choice([b"0" * 64, b"zz", b"\xff" * 10])))
        if r.random() < 0.1:
            out.append(
                (
                    b"X-" + bytes(r.randrange(65, 90) for _ in range(5)),
                    bytes(r.randrange(0x20, 256) for _ in range(r.randrange(0, 50))),
                )
            )
        if r.random() < 0.05:
            out.append((b"Transfer-Encoding", b"chunked"))
        return out

    def query(self) -> list[tuple[str, str]]:
        r = self.rng
        if r.random() < 0.6:
            return []
        return [
            (
                r.choice(QUERY_KEYS),
                r.choice([self.text(), str(r.choice(WEIRD_NUMBERS))])
                .replace("&", "%26")
                .replace("#", "%23")
                .replace(" ", "%20")
                .replace("\r", "")
                .replace("\n", ""),
            )
            for _ in range(r.randrange(1, 4))
        ]

    def case(self) -> Case:
        r = self.rng
        method, template = r.choice(self.routes)
        if r.random() < 0.1:
            method = r.choice(METHODS)
        case = Case(method, self.path(template, method), self.query(), self.headers())
        if method in ("POST", "PUT", "DELETE", "PATCH") or r.random() < 0.05:
            case.body = self.body(template)
        if r.random() < 0.015:
            case.lying_length = max(0, len(case.body) + r.choice([-5, -1, 7, 10**6]))
        return case


def shrink(case: Case, fails: Callable[[Case], bool]) -> Case:
    """The smallest variant (by a few simple steps) that still fails."""
    changed = True
    while changed:
        changed = False
        candidates = [
            replace(case, headers=case.headers[:i] + case.headers[i + 1 :])
            for i in range(len(case.headers))
        ]
        if case.query:
            candidates.append(replace(case, query=[]))
        if case.lying_length is not None:
            candidates.append(replace(case, lying_length=None))
        if len(case.body) > 1:
            candidates.append(replace(case, body=case.body[: len(case.body) // 2]))
        for candidate in candidates:
            if fails(candidate):
                case, changed = candidate, True
                break
    return case


def run(
    sock_path: str,
    seed: int,
    count: int,
    names: dict[str, str],
    as_root: bool,
    seconds: float | None = None,
    timeout: float = 30.0,
    alive: Callable[[], bool] = lambda: True,
) -> dict[str, Any]:
    """Fuzz ``count`` cases (or until ``seconds`` pass); return the statuses seen and the
    failures, each with its shrunk reproducer."""
    fuzzer = Fuzzer(seed, names, as_root)
    statuses: dict[int, int] = {}
    failures: list[dict[str, Any]] = []
    started, done = time.monotonic(), 0
    for _ in range(count):
        if seconds is not None and time.monotonic() - started > seconds:
            break
        case = fuzzer.case()
        outcome = send(sock_path, case, timeout)
        done += 1
        if outcome.status is not None:
            statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
        if outcome.problem is not None or not alive():
            small = shrink(case, lambda c: send(sock_path, c, timeout).problem is not None)
            failures.append(
                {
                    "problem": outcome.problem or "the daemon exited",
                    "reproducer": repr(small.raw()[:2000]),
                }
            )
            if len(failures) >= 5 or not alive():
                break
    return {
        "cases": done,
        "statuses": statuses,
        "failures": failures,
        "seconds": round(time.monotonic() - started, 1),
    }
