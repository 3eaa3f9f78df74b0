"""The OpenAI-compatible generation endpoints: /v1/chat/completions and /v1/completions."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web

from edgellm.errors import EdgeError
from edgellm.runtime.types import Delta, Failed, Finished, GenerationRequest
from edgellm.server.context import State, check_keep_alive, read_json
from edgellm.server.schemas import ChatCompletionRequest, CompletionRequest, parse

log = logging.getLogger("edgellm.requests")


def _log_done(
    gen: GenerationRequest, event: Finished, ttft: float | None, request: web.Request | None = None
) -> None:
    if request is not None:
        request["outcome"] = {"status": 200, "finish_reason": event.finish_reason}
    log.info(
        "event=request_done id=%s model=%s uid=%s finish=%s prompt_tokens=%d "
        "completion_tokens=%d prompt_s=%.3f decode_s=%.3f ttft_s=%s total_s=%.3f",
        gen.id,
        gen.model,
        gen.principal.get("uid"),
        event.finish_reason,
        event.usage.prompt_tokens,
        event.usage.completion_tokens,
        event.prompt_seconds,
        event.decode_seconds,
        "-" if ttft is None else f"{ttft:.3f}",
        time.monotonic() - gen.started,
    )


async def _record_outcome(
    state: State, request: web.Request, gen: GenerationRequest, prompt_hmac: str | None
) -> None:
    outcome = request.get("outcome") or {}
    try:
        await state.record(
            request,
            request_id=gen.id,
            action="models.use",
            resource=gen.model,
            decision="outcome",
            status=outcome.get("status", 499),
            prompt_tokens=gen.prompt_tokens,
            completion_tokens=gen.completion_tokens,
            latency_ms=round((time.monotonic() - gen.started) * 1000, 1),
            finish_reason=outcome.get("finish_reason", "cancelled"),
            prompt_hmac=prompt_hmac,
        )
    except EdgeError:
        log.error("event=audit_failed decision=outcome id=%s", gen.id)


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = parse(ChatCompletionRequest, await read_json(request))
    messages = [m.flat() for m in body.messages]
    return await _generate(request, body, messages=messages, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    body = parse(CompletionRequest, await read_json(request))
    return await _generate(request, body, prompt=body.prompt, chat=False)


async def _generate(
    request: web.Request,
    body: Any,
    *,
    chat: bool,
    messages: list[dict[str, Any]] | None = None,
    prompt: str | None = None,
) -> web.StreamResponse:
    state: State = request.app["state"]
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Any] = asyncio.Queue()
    gen = GenerationRequest(
        model=body.model or state.settings.default_model,
        sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
        prompt=prompt,
        messages=messages,
        max_tokens=body.limit(),
        stop=body.stop,
        sampling=body.sampling(),
        keep_alive=body.keep_alive,
        timeout=min(body.timeout or state.settings.request_timeout, state.settings.request_timeout),
        principal=request.get("principal", {}),
    )
    request["request_id"] = gen.id
    if state.access is not None:
        state.access.require(request["who"], "models.use", gen.model)
    check_keep_alive(request, gen.model, gen.keep_alive)
    state.check_accepting()
    prompt_text = prompt if prompt is not None else json.dumps(messages, sort_keys=True)
    prompt_hmac = state.audit.prompt_hash(prompt_text) if state.audit else None
    await state.record(
        request,
        request_id=gen.id,
        action="models.use",
        resource=gen.model,
        decision="allow",
        prompt_hmac=prompt_hmac,
    )  # no row, no service
    finished = False
    state.opened()
    try:
        try:
            state.runtime.submit(gen)  # EdgeErrors (unknown model, queue full) answer at once
        except EdgeError as exc:
            finished = True
            request["outcome"] = {"status": exc.status, "finish_reason": "error"}
            raise
        first = await events.get()
        if isinstance(first, Failed):
            finished = True
            err = first.error
            request["outcome"] = {"status": getattr(err, "status", 500), "finish_reason": "error"}
            raise err
        kind = "chat.completion" if chat else "text_completion"
        base = {
            "id": ("chatcmpl-" if chat else "cmpl-") + gen.id,
            "created": int(time.time()),
            "model": gen.model,
        }
        if body.stream:
            response = await _stream(request, gen, body, base, first, events, chat, kind)
        else:
            response = await _collect(request, gen, base, first, events, chat, kind)
        finished = True
        return response
    finally:
        if not finished:  # the client went away, or writing to it failed
            gen.cancel()
        try:
            await _record_outcome(state, request, gen, prompt_hmac)
        finally:
            state.closed()


async def _collect(
    request: web.Request,
    gen: GenerationRequest,
    base: dict[str, Any],
    first: Any,
    events: asyncio.Queue[Any],
    chat: bool,
    kind: str,
) -> web.Response:
    parts: list[str] = []
    event = first
    while not isinstance(event, Finished):
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Delta):
            parts.append(event.text)
        event = await events.get()
    _log_done(gen, event, None, request)
    text = "".join(parts)
    choice: dict[str, Any] = {"index": 0, "finish_reason": event.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice.update(text=text, logprobs=None)
    payload = {**base, "object": kind, "choices": [choice], "usage": event.usage.as_dict()}
    return web.json_response(payload, headers={"X-Request-Id": gen.id})


async def _stream(
    request: web.Request,
    gen: GenerationRequest,
    body: Any,
    base: dict[str, Any],
    first: Any,
    events: asyncio.Queue[Any],
    chat: bool,
    kind: str,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Request-Id": gen.id,
        }
    )
    await response.prepare(request)
    obj = f"{kind}.chunk" if chat else kind

    def chunk(text: str | None, finish: str | None = None, role: bool = False) -> bytes:
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse({**base, "object": obj, "choices": [choice]})

    if chat:
        await response.write(chunk("", role=True))
    ttft = time.monotonic() - gen.started
    event = first
    while True:
        if isinstance(event, Delta):
            await response.write(chunk(event.text))
        elif isinstance(event, Failed):
            err = event.error
            body_err = (
                err.body() if isinstance(err, EdgeError) else {"error": {"message": str(err)}}
            )
            await response.write(_sse(body_err))
            break
        elif isinstance(event, Finished):
            _log_done(gen, event, ttft, request)
            await response.write(chunk(None, event.finish_reason))
            if body.include_usage:
                await response.write(
                    _sse({**base, "object": obj, "choices": [], "usage": event.usage.as_dict()})
                )
            break
        event = await events.get()
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response
