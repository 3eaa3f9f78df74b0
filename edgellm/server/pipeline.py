"""The one way a request reaches the runtime (DESIGN.md, "a request's way through").

    async with serve(request, job, prompt=text) as events:
        first = await events.start()   # an error before any output raises here
        async for event in events: ...  # Delta…, then one Finished (or Failed)

``serve`` does, in order: access to the model, the keep-alive limit, the accepting
check, the allow row (no row, no service), submit; then hands the route the job's
typed events; on leaving it cancels the job unless it ended, and writes the outcome
row. A dialect (OpenAI, ONNX, …) only turns its wire shapes into a job and events
back into its wire shapes.

The allow row is durable before anything is answered: it commits while the model
starts (every run is side-effect free until it is answered: the prompt's evaluation
overlaps the row's fsync), and the route gets the events only once the row is durable,
so the first token is held until then. ``overlap_audit``: for runs that answer in
milliseconds (ONNX), the outcome row is written after the answer, in the next group
commit (a vault lock and /api/audit wait for it), instead of before the handler
returns.

Each job's ``marks`` record when it reached each step on its way to its first token
(received, parsed, submitted, audited; the engine adds admitted, tokenized,
first_token; the route first_write): ``ttft_marks`` turns them into the breakdown the
request log and the benchmark show.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from edgellm.errors import EdgeError
from edgellm.runtime.types import (
    Delta,
    Event,
    Failed,
    Finished,
    GenerationRequest,
    Request,
    Result,
    Sink,
    TensorRequest,
    TextRequest,
    ToolCallDelta,
)
from edgellm.server.context import (
    PRINCIPAL,
    RECEIVED,
    REQUEST_ID,
    STATE,
    WHO,
    State,
    check_keep_alive,
    who_of,
)

log = logging.getLogger("edgellm.requests")
TERMINAL = (Finished, Failed, Result)


class Events:
    """A job's events as they arrive from its engine thread, and how it ended."""

    def __init__(self, job: Request) -> None:
        self.job = job
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._held: Event | None = None
        self.ended = False  # a terminal event arrived: nothing to cancel
        self.status = 499  # the outcome row's status until the job ends otherwise
        self.finish_reason = "cancelled"
        self.called: list[str] = []  # the tools called, by name, for the outcome row

    def sink_for(self, loop: asyncio.AbstractEventLoop) -> Sink:
        """Where the engine thread puts the job's events: onto this loop."""

        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(self._queue.put_nowait, event)

        return sink

    def refused(self, exc: EdgeError) -> None:
        self.ended, self.status, self.finish_reason = True, exc.status, "error"

    async def _next(self) -> Event:
        event = await self._queue.get()
        if isinstance(event, Failed):
            self.ended, self.finish_reason = True, "error"
            self.status = getattr(event.error, "status", 500)
        elif isinstance(event, Finished):
            self.ended, self.status, self.finish_reason = True, 200, event.finish_reason
        elif isinstance(event, Result):
            self.ended, self.status, self.finish_reason = True, 200, "stop"
        elif isinstance(event, ToolCallDelta) and event.name:
            self.called.append(event.name)
        return event

    async def start(self) -> Event:
        """The first event, kept for iteration; a failure raises its error (nothing has
        been answered yet, so it is the response)."""
        first = self._held = await self._next()
        if isinstance(first, Failed):
            raise first.error
        return first

    async def result(self) -> Result:
        """The one Result of a tensor job, or its error."""
        event = await self._next()
        if isinstance(event, Failed):
            raise event.error
        if not isinstance(event, Result):
            raise TypeError(f"a tensor job gave {type(event).__name__}, not a Result")
        return event

    def __aiter__(self) -> AsyncIterator[Delta | ToolCallDelta | Finished | Failed]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Delta | ToolCallDelta | Finished | Failed]:
        while True:
            event, self._held = (self._held, None) if self._held else (await self._next(), None)
            if isinstance(event, Delta | ToolCallDelta | Finished | Failed):
                yield event
            if isinstance(event, TERMINAL):
                return


def tools_offered(job: Request) -> str | None:
    """The audit rows' ``tools_offered``: the tools' names (None: none offered)."""
    if isinstance(job, GenerationRequest) and job.tools is not None:
        return ",".join(t.name for t in job.tools.tools)
    return None


def prompt_text(job: Request) -> str | None:
    """What the audit row's prompt HMAC is of: the prompt, the messages, or the texts."""
    if isinstance(job, GenerationRequest):
        return job.prompt if job.prompt is not None else json.dumps(job.messages, sort_keys=True)
    if isinstance(job, TensorRequest) and job.texts is not None:
        return "\n".join(job.texts)
    if isinstance(job, TextRequest):
        return json.dumps(job.messages, sort_keys=True) if job.op == "template" else job.text
    return None


@asynccontextmanager
async def serve(
    request: web.Request, job: Request, *, overlap_audit: bool = False
) -> AsyncIterator[Events]:
    st: State = request.app[STATE]
    request[REQUEST_ID] = job.id
    if st.access is not None:
        st.access.require(request[WHO], "models.use", job.model)
    check_keep_alive(request, job.model, job.keep_alive)
    st.check_accepting()
    limit = st.settings.request_timeout
    job.timeout = min(job.timeout or limit, limit)
    job.principal = {**request.get(PRINCIPAL, {}), "user": who_of(request)}
    job.marks.setdefault("received", request.get(RECEIVED, job.started))
    job.marks.setdefault("parsed", job.started)
    events = Events(job)
    job.sink = events.sink_for(asyncio.get_running_loop())
    text = prompt_text(job)
    prompt_hmac = st.audit.prompt_hash(text) if st.audit and text is not None else None
    row = st.audit_row(
        request,
        request_id=job.id,
        action="models.use",
        resource=job.model,
        decision="allow",
        prompt_hmac=prompt_hmac,
        tools_offered=tools_offered(job),
    )
    allow = asyncio.ensure_future(st.write_audit(row))
    st.opened()
    try:
        try:
            st.runtime.submit(job)  # unknown model, queue full…: answered at once
        except EdgeError as exc:
            events.refused(exc)
            raise
        job.marks["submitted"] = time.monotonic()
        await asyncio.shield(allow)  # no row, no answer: the model runs meanwhile
        job.marks["audited"] = time.monotonic()
        yield events
    finally:
        if not events.ended:  # the client went away, writing to it failed, or no row
            job.cancel()
        outcome = dict(
            request_id=job.id,
            action="models.use",
            resource=job.model,
            decision="outcome",
            status=events.status,
            prompt_tokens=job.prompt_tokens,
            completion_tokens=job.completion_tokens,
            latency_ms=round((time.monotonic() - job.started) * 1000, 1),
            finish_reason=events.finish_reason,
            prompt_hmac=prompt_hmac,
            tools_offered=tools_offered(job),
            tools_called=",".join(events.called) if tools_offered(job) is not None else None,
        )
        try:
            if overlap_audit:  # after the answer, in the next group commit
                st.record_soon(request, after=allow, **outcome)
            else:
                await _record_outcome(st, request, outcome)
        finally:
            st.closed()


async def _record_outcome(st: State, request: web.Request, outcome: dict[str, Any]) -> None:
    # awaited: under load, rows written this way commit faster than deferred ones that
    # contend for SQLite's write lock (the flood test took twice as long that way)
    try:
        await st.record(request, **outcome)
    except EdgeError:
        log.error("event=audit_failed decision=outcome id=%s", outcome["request_id"])


def ttft_marks(job: Request) -> dict[str, float]:
    """When the job reached each step, in milliseconds since the request arrived, in
    the order they happened (the steps it did not reach are left out)."""
    t0 = job.marks.get("received", job.started)
    ordered = sorted(job.marks.items(), key=lambda kv: kv[1])
    return {name: round((t - t0) * 1000, 2) for name, t in ordered}
