"""Accepting connections without being exhausted by them: a cap on open connections,
globally and per peer (a uid on the socket), and a deadline for a new connection's
first request headers (slowloris). aiohttp closes idle keep-alive connections and
slow headers after the first request itself (``keepalive_timeout``); it has nothing
for a connection that never completes a request, and no cap at all.

A connection over a cap is answered at once with a 503 (Retry-After) and closed,
before aiohttp sees it; the refusal is logged once per peer every ``LOG_EVERY``
seconds, with how many were refused since, so a flood cannot fill the journal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from edgellm.server.peer import connection_peer

log = logging.getLogger("edgellm.server")
LOG_EVERY = 10.0
HEAD_END = b"\r\n\r\n"


def peer_key(transport: asyncio.BaseTransport) -> str:
    """Whose connection this is, for the per-peer cap: the uid on a Unix socket, the
    address on TCP."""
    creds = connection_peer(transport)
    if creds.get("uid") is not None:
        return f"uid:{creds['uid']}"
    addr = transport.get_extra_info("peername")
    return f"addr:{addr[0]}" if isinstance(addr, tuple) else "unknown"


def refusal(message: str, retry_after: int = 1) -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "server_error",
                "code": "too_many_connections",
                "param": None,
            }
        }
    ).encode()
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Retry-After: %d\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
        % (retry_after, len(body))
    ) + body


class RateLimitedLog:
    """One line per key every LOG_EVERY seconds; the lines in between are counted."""

    def __init__(self, every: float = LOG_EVERY) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def __call__(self, key: str, emit: Callable[[int], None]) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.every) >= self.every:
            emit(self._held.pop(key, 0))
            self._last[key] = now
        else:
            self._held[key] += 1


class ConnectionGuard:
    """The protocol factory given to the event loop in place of aiohttp's: it makes
    aiohttp's handler for each connection and watches it."""

    def __init__(
        self, server: web.Server, max_connections: int, per_peer: int, header_timeout: float
    ) -> None:
        self.server = server
        self.max_connections, self.per_peer = max_connections, per_peer
        self.header_timeout = header_timeout
        self.open = 0
        self.by_peer: Counter[str] = Counter()
        self.refused = 0
        self.log = RateLimitedLog()

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self, self.server())

    def admit(self, key: str) -> str | None:
        """Count a new connection in, or say why it is refused."""
        if self.open >= self.max_connections:
            return f"edgellm has {self.open} connections open (max_connections)"
        if self.by_peer[key] >= self.per_peer:
            return f"{key} has {self.by_peer[key]} connections open (max_connections_per_peer)"
        self.open += 1
        self.by_peer[key] += 1
        return None

    def release(self, key: str) -> None:
        self.open -= 1
        self.by_peer[key] -= 1
        if self.by_peer[key] <= 0:
            del self.by_peer[key]


class _Guarded(asyncio.Protocol):
    """aiohttp's handler for one connection, behind the guard (the handler has
    __slots__, so it is wrapped rather than patched)."""

    def __init__(self, guard: ConnectionGuard, inner: Any) -> None:
        self.guard, self.inner = guard, inner
        self.key: str | None = None
        self.head = b""  # the last bytes read while the first headers are awaited
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        key = peer_key(transport)
        why = self.guard.admit(key)
        if why is not None:
            self.guard.refused += 1
            self.guard.log(
                key,
                lambda held: log.warning(
                    "event=connection_refused peer=%s reason=%r refused_since_last=%d",
                    key,
                    why,
                    held,
                ),
            )
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(
                refusal(f"too many connections: {why}; close idle ones or retry shortly")
            )
            transport.close()
            return
        self.key = key
        self.timer = asyncio.get_running_loop().call_later(
            self.guard.header_timeout, self._too_slow, transport
        )
        self.inner.connection_made(transport)

    def _too_slow(self, transport: asyncio.BaseTransport) -> None:
        self.timer = None
        self.guard.log(
            "slow_headers",
            lambda held: log.warning(
                'event=connection_timed_out peer=%s reason="no request headers within %.0fs" '
                "timed_out_since_last=%d",
                self.key,
                self.guard.header_timeout,
                held,
            ),
        )
        transport.close()

    def data_received(self, data: bytes) -> None:
        if self.key is None:
            return
        if self.timer is not None:
            if HEAD_END in self.head + data[:65536]:
                self.timer.cancel()
                self.timer, self.head = None, b""
            else:  # the end of the headers may straddle two reads
                self.head = data[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.key is not None else None

    def pause_writing(self) -> None:
        if self.key is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.key is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.key is None:
            return  # refused: aiohttp never had it
        if self.timer is not None:
            self.timer.cancel()
        self.guard.release(self.key)
        self.inner.connection_lost(exc)


class GuardedSockSite(web.SockSite):
    """aiohttp's SockSite, serving through a ConnectionGuard."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: Any,
        guard: Callable[[web.Server], ConnectionGuard],
        ssl_context: Any = None,
        handshake_timeout: float | None = None,
    ) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context)
        self._make_guard = guard
        self._handshake_timeout = handshake_timeout if ssl_context is not None else None
        self.guard: ConnectionGuard | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self.guard = self._make_guard(server)
        self._server = await asyncio.get_running_loop().create_server(
            self.guard,
            sock=self._sock,
            backlog=self._backlog,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._handshake_timeout,
        )


def raise_file_limit(needed: int) -> int:
    """Raise the soft limit on open files to the hard one, so the connection cap (and
    not EMFILE) is what refuses a flood; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft < needed:
        log.warning(
            'event=file_limit_low soft=%d needed=%d note="max_connections is above '
            'what the open-file limit allows; lower it or raise LimitNOFILE"',
            soft,
            needed,
        )
    return soft


def quiet_exhaustion(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs a traceback for each accept() that fails for want of file
    descriptors; keep one line per kind of failure every LOG_EVERY seconds."""
    limited = RateLimitedLog()
    default = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (
            isinstance(exc, OSError)
            and exc.errno is not None
            and "accept" in str(context.get("message", ""))
        ):
            limited(
                f"accept:{exc.errno}",
                lambda held: log.error(
                    "event=accept_failed error=%r suppressed_since_last=%d", str(exc), held
                ),
            )
            return
        if default is not None:
            default(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


class BadHttpLines(logging.Filter):
    """aiohttp logs a traceback for every request it cannot parse (bad bytes in the
    path, a malformed header): the client got its 400; the journal gets one line per
    ``LOG_EVERY`` seconds, with how many were held back."""

    def __init__(self) -> None:
        super().__init__()
        self._limited = RateLimitedLog()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True

        def emit(held: int) -> None:
            first = (str(exc.message).strip().splitlines() or [type(exc).__name__])[0]
            log.warning(
                "event=bad_http status=%s problem=%r held_back=%d", exc.code, first[:200], held
            )

        self._limited("bad_http", emit)
        return False
