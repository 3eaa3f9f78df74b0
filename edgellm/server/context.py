"""What every route shares: the composed components and body reading."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from edgellm.config import Settings
from edgellm.errors import EdgeError, InvalidRequest, PayloadTooLarge, ShuttingDown
from edgellm.runtime.manager import Runtime
from edgellm.runtime.source import ModelStore

log = logging.getLogger("edgellm.requests")
# how long an outcome row waits for another commit to join before it makes its own
OUTCOME_DELAY = 0.005


@dataclass
class State:
    settings: Settings
    runtime: Runtime
    store: ModelStore
    started: float = field(default_factory=time.monotonic)
    draining: bool = False
    load_failures: dict[str, str] = field(default_factory=dict)
    governor: Any = None
    _unwritten: set[asyncio.Future[None]] = field(default_factory=set)

    @property
    def vault(self) -> Any:
        """The store when it is the vault (it always is in the daemon)."""
        return self.store if hasattr(self.store, "access") else None

    @property
    def access(self) -> Any:
        return self.vault.access if self.vault is not None else None

    @property
    def audit(self) -> Any:
        """The audit log while the vault is unlocked; None while it is locked."""
        v = self.vault
        return v.audit if v is not None and not v.locked else None

    def check_accepting(self) -> None:
        if self.draining:
            raise ShuttingDown("the daemon is shutting down; retry once it is back", retry_after=5)

    def audit_row(self, request: Any, **fields: Any) -> dict[str, Any] | None:
        """The audit row about this request's caller; None with no vault. Raises
        VaultLocked while the vault is locked: nothing is done that cannot be audited."""
        if self.vault is None:
            return None
        if self.vault.locked:
            from edgellm.vault.keys import VaultLocked

            raise VaultLocked()
        creds, who = request.get("principal", {}), request.get("who")
        user = (who.user if who else "") + (f"+token:{who.token}" if who and who.token else "")
        return dict(uid=creds.get("uid"), pid=creds.get("pid"), user=user,
                    exe=creds.get("exe", ""), **fields)

    async def write_audit(self, row: dict[str, Any] | None) -> None:
        """Write a row (raises AuditUnavailable). The write is a SQLite commit that may
        wait on a lock or share a commit with other requests': it runs off the loop."""
        if row is not None:
            audit = self.vault.audit
            await asyncio.get_running_loop().run_in_executor(None, lambda: audit.append(**row))

    async def record(self, request: Any, **fields: Any) -> None:
        """One audit row about this request's caller, written before going on."""
        await self.write_audit(self.audit_row(request, **fields))

    def record_soon(self, request: Any, after: asyncio.Future[None] | None = None,
                    **fields: Any) -> None:
        """A row that nothing waits for (a request's outcome, once its answer is sent),
        queued after ``after`` (the request's allow row), so the two stay in order. It
        joins the next commit, usually the next request's allow row, or is committed
        on its own after OUTCOME_DELAY; a failure is logged. ``settle_records`` waits
        for every such row, so a reader of the audit log sees them all."""
        try:
            row = self.audit_row(request, **fields)
        except EdgeError:
            log.error("event=audit_failed decision=%s id=%s", fields.get("decision"),
                      fields.get("request_id"))
            return

        async def write() -> None:
            if after is not None:
                await asyncio.gather(after, return_exceptions=True)
            audit = self.vault.audit
            pending = audit.defer(**row)
            await asyncio.sleep(OUTCOME_DELAY)
            if not pending.done:
                await asyncio.get_running_loop().run_in_executor(None, audit.flush)
            if pending.error is not None:
                raise pending.error

        task = asyncio.ensure_future(write())
        self._unwritten.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Future[None]) -> None:
        self._unwritten.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event=audit_failed decision=outcome error=%r", str(task.exception()))

    async def settle_records(self) -> None:
        while self._unwritten:
            await asyncio.gather(*list(self._unwritten), return_exceptions=True)


def body_chunks(request: web.Request) -> Iterator[bytes]:
    """The request body in 1 MiB pieces, for a worker thread to consume (an import
    streams to the vault without holding the body in memory)."""
    loop = asyncio.get_running_loop()

    def chunks() -> Iterator[bytes]:
        while data := asyncio.run_coroutine_threadsafe(
                request.content.read(1 << 20), loop).result():
            yield data

    return chunks()


async def read_json(request: web.Request) -> Any:
    limit = request.app["state"].settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(
            f"request body is {request.content_length} bytes; the limit is {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes") from None
    if not raw.strip():
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
