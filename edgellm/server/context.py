"""What every route shares: the composed components and body reading."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import ClientPayloadError, web
from aiohttp.web_protocol import RequestPayloadError

from edgellm.config import Settings
from edgellm.errors import (
    BodyTimeout,
    ClientGone,
    EdgeError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    PermissionDenied,
    ShuttingDown,
    VaultLocked,
)
from edgellm.runtime.manager import Runtime
from edgellm.runtime.source import ModelRecord
from edgellm.server.jobs import Jobs
from edgellm.server.limits import PrincipalLimits
from edgellm.server.metrics import Metrics
from edgellm.server.network import NetworkDoor
from edgellm.vault.access import AccessPolicy, Principal
from edgellm.vault.audit import AuditLog
from edgellm.vault.store import VaultStore

if TYPE_CHECKING:
    from edgellm.governor.governor import Governor

log = logging.getLogger("edgellm.requests")
# how long an outcome row waits for another commit to join before it makes its own
OUTCOME_DELAY = 0.005


@dataclass
class State:
    settings: Settings
    runtime: Runtime
    store: VaultStore  # the models' store, the data objects, access, the audit log
    started: float = field(default_factory=time.monotonic)
    draining: bool = False
    load_failures: dict[str, str] = field(default_factory=dict)
    governor: Governor | None = None
    locking: bool = False  # the vault is being locked: no new audited work starts
    _unwritten: set[asyncio.Future[None]] = field(default_factory=set)
    _open: int = 0  # audited requests between their allow row and their outcome row
    _settled: asyncio.Event = field(default_factory=asyncio.Event)
    door: NetworkDoor = field(init=False)  # who a network caller is (network.py)
    limits: PrincipalLimits = field(init=False)  # per-principal limits (limits.py)
    tls: ssl.SSLContext | None = None  # the network listeners' TLS, reloaded on SIGHUP
    jobs: Jobs = field(default_factory=Jobs)  # long work in progress, for GET /api/jobs

    def __post_init__(self) -> None:
        self.door = NetworkDoor(self.settings.auth_failures_per_minute)
        self.limits = PrincipalLimits(self.settings.limits, self.store.access)

    def opened(self) -> None:
        self._open += 1
        self._settled.clear()

    def closed(self) -> None:
        self._open -= 1
        if self._open == 0:
            self._settled.set()

    async def requests_settled(self, timeout: float) -> None:
        """Wait until every audited request has written its outcome row (a vault lock
        waits for them, so none loses its outcome to the forgotten key)."""
        if self._open:
            try:
                await asyncio.wait_for(self._settled.wait(), timeout)
            except TimeoutError:
                log.error("event=outcomes_unsettled open=%d", self._open)

    @property
    def vault(self) -> VaultStore:
        return self.store

    @property
    def access(self) -> AccessPolicy:
        return self.vault.access

    @property
    def audit(self) -> AuditLog | None:
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
        if self.vault.locked or (self.locking and fields.get("decision") == "allow"):
            raise VaultLocked()
        creds, who = request.get(PRINCIPAL, {}), request.get(WHO)
        user = (who.user if who else "") + (f"+token:{who.token}" if who and who.token else "")
        if who and who.cert:
            user += f"+cert:{who.cert}"
        return dict(
            uid=creds.get("uid"),
            pid=creds.get("pid"),
            user=user,
            exe=creds.get("exe", ""),
            address=creds.get("address"),
            **fields,
        )

    async def write_audit(self, row: dict[str, Any] | None) -> None:
        """Write a row (raises AuditUnavailable). The write is a SQLite commit that may
        wait on a lock or share a commit with other requests': it runs off the loop."""
        if row is not None:
            audit = self.vault.audit
            await asyncio.get_running_loop().run_in_executor(None, lambda: audit.append(**row))

    async def record(self, request: Any, **fields: Any) -> None:
        """One audit row about this request's caller, written before going on."""
        await self.write_audit(self.audit_row(request, **fields))

    def record_soon(
        self, request: Any, after: asyncio.Future[None] | None = None, **fields: Any
    ) -> None:
        """A row that nothing waits for (a request's outcome, once its answer is sent),
        queued after ``after`` (the request's allow row), so the two stay in order. It
        joins the next commit, usually the next request's allow row, or is committed
        on its own after OUTCOME_DELAY; a failure is logged. ``settle_records`` waits
        for every such row, so a reader of the audit log sees them all."""
        try:
            row = self.audit_row(request, **fields)
        except EdgeError:
            log.error(
                "event=audit_failed decision=%s id=%s",
                fields.get("decision"),
                fields.get("request_id"),
            )
            return

        async def write() -> None:
            if after is not None:
                await asyncio.gather(after, return_exceptions=True)
            audit = self.vault.audit
            assert row is not None  # the daemon always has its vault
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


STATE = web.AppKey("state", State)
METRICS = web.AppKey("metrics", Metrics)
PRINCIPAL = web.RequestKey("principal", dict)  # the peer as the kernel says: uid, gid, pid, exe
WHO = web.RequestKey("who", Principal)  # who that is to the access policy (user, token)
RECEIVED = web.RequestKey("received", float)  # monotonic time its headers were read
REQUEST_ID = web.RequestKey("request_id", str)  # the runtime request's id, once it has one


def may_see(request: web.Request, name: str) -> bool:
    """Whether this caller may know that model ``name`` exists: a model outside its
    grants is answered as unknown, so names cannot be probed."""
    st: State = request.app[STATE]
    policy, who = st.access, request.get(WHO)
    return (
        policy is None
        or who is None
        or policy.allowed(who, "models.load")
        or policy.allowed(who, "models.use", name)
    )


def capabilities(record: ModelRecord) -> list[str]:
    """What a model answers, by name (as Ollama's /api/show lists them)."""
    if record.format == "onnx":
        return (["embedding"] if "embedding" in record.extra else []) + ["tensor"]
    return [
        "completion",
        *(["chat"] if record.has_chat_template else []),
        *(["tools"] if record.has_chat_template else []),  # any template: generic at least
        "json_schema",
        "grammar",
        "logprobs",
        "tokenize",
    ]


def model_view(st: State, record: ModelRecord) -> dict[str, Any]:
    """A stored model as the API shows it: its record, what it can do, its context per
    request, its state, whether it is the default."""
    view = {**record.as_dict(), "capabilities": capabilities(record)}
    if record.format != "onnx":
        view["n_ctx"] = st.settings.for_model(record.name).context_for(record.context_length)
        view["tool_format"] = tool_format_of(st, record)
    return {
        **view,
        "state": st.runtime.model_state(record.name),
        "default": record.name == st.settings.default_model,
    }


def tool_format_of(st: State, record: ModelRecord) -> str | None:
    """How tools reach the model (tool_format.py): its setting, else its template's."""
    from edgellm.runtime.llama.tool_format import format_for

    setting = st.settings.for_model(record.name).tool_format
    return format_for(setting, record.tool_syntax, record.has_chat_template)


def tool_format_for(st: State, model: str) -> str:
    """A model's tool format by name; an unknown model's request fails where it is
    submitted, so it gets the generic format here."""
    try:
        record = st.store.get(model)
    except EdgeError:
        return "generic"
    return tool_format_of(st, record) or "generic"


def visible_record(request: web.Request, name: str) -> Any:
    """A model's record, or ModelNotFound (the same answer) when the caller may not see it."""
    if not may_see(request, name):
        raise ModelNotFound(f"model {name!r} not found", param="model")
    return request.app[STATE].store.get(name)


def check_keep_alive(request: web.Request, model: str, keep_alive: float | None) -> None:
    """A client may shorten how long its model stays loaded, not pin it (-1) nor keep
    it longer than the operator configured: that takes models.load, as loading does."""
    st: State = request.app[STATE]
    if keep_alive is None or st.access is None:
        return
    configured = st.settings.for_model(model).keep_alive
    limit = st.settings.keep_alive if configured is None else configured
    beyond = limit >= 0 and (keep_alive < 0 or keep_alive > limit)
    if beyond and not st.access.allowed(request[WHO], "models.load"):
        what = (
            "pins the model (-1)" if keep_alive < 0 else f"is longer than the configured {limit:g}s"
        )
        raise PermissionDenied(
            f"permission denied: keep_alive {keep_alive:g} {what}, "
            "which needs models.load; ask an operator, or leave "
            "keep_alive out",
            param="models.load",
        )


def who_of(request: web.Request) -> str:
    """The caller, as a person reads it: user name, token or certificate, else uid."""
    who, creds = request.get(WHO), request.get(PRINCIPAL, {})
    if who is not None and (who.user or who.token or who.cert):
        return who.user or (f"token:{who.token}" if who.token else f"cert:{who.cert}")
    return f"uid {creds.get('uid')}" if creds.get("uid") is not None else "unknown"


def body_chunks(request: web.Request) -> Iterator[bytes]:
    """The request body in 1 MiB pieces, for a worker thread to consume (an import
    streams to the vault without holding the body in memory)."""
    loop = asyncio.get_running_loop()

    idle = request.app[STATE].settings.idle_timeout

    async def piece() -> bytes:
        try:
            return await asyncio.wait_for(request.content.read(1 << 20), idle)
        except TimeoutError:
            raise BodyTimeout(f"the upload stalled: no data for {idle:g}s (idle_timeout)") from None
        except (ConnectionResetError, ClientPayloadError, RequestPayloadError):
            raise ClientGone("the client closed the connection mid-upload") from None

    def chunks() -> Iterator[bytes]:
        while data := asyncio.run_coroutine_threadsafe(piece(), loop).result():
            yield data

    return chunks()


async def read_json(request: web.Request) -> Any:
    limit = request.app[STATE].settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(
            f"request body is {request.content_length} bytes; the limit is {limit} bytes"
        )
    idle = request.app[STATE].settings.idle_timeout
    try:
        raw = await asyncio.wait_for(request.read(), idle)
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes") from None
    except TimeoutError:
        raise BodyTimeout(
            f"the request body did not arrive within {idle:g}s (idle_timeout; "
            f"Content-Length said {request.content_length} bytes)"
        ) from None
    except (ConnectionResetError, ClientPayloadError, RequestPayloadError):
        raise ClientGone("the client closed the connection before sending its whole body") from None
    if not raw.strip():
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        # strict UTF-8 first: json.loads of bytes decodes with "surrogatepass", which
        # lets UTF-8-encoded surrogates through as text
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise InvalidRequest(
            "the request body is nested more deeply than edgellm parses "
            "(arrays and objects within each other)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    except ValueError as exc:  # Python's limit on digits in an integer
        raise InvalidRequest(f"the request body has a number edgellm cannot read: {exc}") from None
    if b"\\ud" in raw or b"\\uD" in raw:  # the only way JSON spells a lone surrogate
        check_text(data)
    return data


def check_text(value: Any, path: str = "body") -> None:
    """Refuse strings that are not Unicode text (lone surrogates, which JSON can spell
    but UTF-8 cannot encode): they would fail later, deep in an engine or the audit log."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                raise InvalidRequest(
                    f"{where} holds text that is not valid Unicode (a lone "
                    "surrogate such as \\ud800)",
                    param=where,
                )
        elif isinstance(item, dict):
            for k, v in item.items():
                if not _encodable(k):
                    raise InvalidRequest(
                        f"a key in {where} is not valid Unicode (a lone surrogate such as \\ud800)",
                        param=where,
                    )
                stack.append((v, f"{where}.{k}"))
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
