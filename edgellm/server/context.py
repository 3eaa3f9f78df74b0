"""What every route shares: the composed components and body reading."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from edgellm.config import Settings
from edgellm.errors import InvalidRequest, PayloadTooLarge, ShuttingDown
from edgellm.runtime.manager import Runtime
from edgellm.runtime.source import ModelStore


@dataclass
class State:
    settings: Settings
    runtime: Runtime
    store: ModelStore
    started: float = field(default_factory=time.monotonic)
    draining: bool = False
    load_failures: dict[str, str] = field(default_factory=dict)
    access: Any = None  # the vault's AccessPolicy
    audit: Any = None  # the vault's AuditLog

    def check_accepting(self) -> None:
        if self.draining:
            raise ShuttingDown("the daemon is shutting down; retry once it is back", retry_after=5)

    async def record(self, request: Any, **fields: Any) -> None:
        """One audit row about this request's caller (raises AuditUnavailable). The
        write is a SQLite commit that may wait on a lock: it runs off the event loop."""
        if self.audit is None:
            return
        from edgellm.vault.audit import executable

        creds, who = request.get("principal", {}), request.get("who")
        user = (who.user if who else "") + (f"+token:{who.token}" if who and who.token else "")
        row = dict(uid=creds.get("uid"), pid=creds.get("pid"), user=user,
                   exe=executable(creds.get("pid")), **fields)
        await asyncio.get_running_loop().run_in_executor(None, lambda: self.audit.append(**row))


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
