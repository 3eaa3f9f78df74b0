"""The OpenAI-compatible generation endpoints: /v1/chat/completions and /v1/completions.

Only OpenAI's shapes live here: the body becomes a GenerationRequest, the pipeline
(server/pipeline.py) runs it, and its events become a response or SSE chunks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace
from typing import Any

from aiohttp import web

from edgellm.errors import EdgeError, InternalError
from edgellm.runtime.types import (
    Constraint,
    Delta,
    Failed,
    Finished,
    GenerationRequest,
    TokenLogprob,
    ToolCallDelta,
    ToolUse,
)
from edgellm.server.context import STATE, State, read_json, tool_format_for
from edgellm.server.pipeline import Events, serve, ttft_marks
from edgellm.server.routes import Audit, RouteTable
from edgellm.server.schemas import ChatCompletionRequest, CompletionRequest, parse

log = logging.getLogger("edgellm.requests")
route = RouteTable()


def _log_done(gen: GenerationRequest, event: Finished) -> None:
    marks = ttft_marks(gen)
    ttft = marks.get("first_write")
    log.info(
        "event=request_done id=%s model=%s uid=%s finish=%s prompt_tokens=%d "
        "completion_tokens=%d prompt_s=%.3f decode_s=%.3f ttft_s=%s total_s=%.3f marks_ms=%s",
        gen.id,
        gen.model,
        gen.principal.get("uid"),
        event.finish_reason,
        event.usage.prompt_tokens,
        event.usage.completion_tokens,
        event.prompt_seconds,
        event.decode_seconds,
        "-" if ttft is None else f"{ttft / 1000:.3f}",
        time.monotonic() - gen.marks.get("received", gen.started),
        ",".join(f"{k}:{v}" for k, v in marks.items()),
    )


def timings(event: Finished, gen: GenerationRequest | None = None) -> dict[str, Any]:
    """The daemon's own clock for one answer, under llama-server's names (clients that
    show speeds read these), beside OpenAI's ``usage``; on a stream, also when the
    request reached each step up to its first token's write (``ttft_marks_ms``)."""
    usage = event.usage
    rate = usage.completion_tokens / event.decode_seconds if event.decode_seconds > 0 else 0.0
    marks = ttft_marks(gen) if gen is not None and "first_write" in gen.marks else None
    return ({"ttft_marks_ms": marks} if marks else {}) | {
        "prompt_n": usage.prompt_tokens,
        "prompt_ms": round(event.prompt_seconds * 1000, 3),
        "predicted_n": usage.completion_tokens,
        "predicted_ms": round(event.decode_seconds * 1000, 3),
        "predicted_per_second": round(rate, 3),
    }


Calls = list[dict[int, dict[str, Any]]]  # per choice: tool calls by index, OpenAI's shape


def _hold_constraint(
    gen: GenerationRequest, texts: list[str], calls: Calls, finished: Finished
) -> None:
    """A finished JSON answer or tool call that does not validate is never handed
    back: the grammar should have made that impossible, so it is our bug (500),
    logged. An answer cut by max_tokens ends with finish_reason "length" and claims
    nothing."""
    from edgellm.runtime.llama.schema_grammar import answer_problem
    from edgellm.runtime.llama.tool_format import call_problem

    if gen.constraint is None:
        return
    for i, text in enumerate(texts):
        reason = finished.reason(i)
        problem = None
        if reason == "stop" and gen.tools is None:
            problem = answer_problem(gen.constraint, text)
        elif reason == "tool_calls" and gen.tools is not None:
            for call in calls[i].values():
                f = call["function"]
                problem = problem or call_problem(gen.tools, f["name"], f["arguments"])
        if problem is not None:
            log.error(
                "event=constraint_broken id=%s model=%s choice=%d problem=%r",
                gen.id,
                gen.model,
                i,
                problem,
            )
            raise InternalError(
                f"the answer broke its response_format ({problem}) although decoding was "
                "constrained; this is a bug in edgellm, and the answer is withheld"
            )


async def held_to_constraint(
    gen: GenerationRequest, texts: list[str], calls: Calls, finished: Finished
) -> None:
    """``_hold_constraint`` off the event loop (validating a long answer is CPU work)."""
    if gen.constraint is not None:
        await asyncio.get_running_loop().run_in_executor(
            None, _hold_constraint, gen, texts, calls, finished
        )


def add_call(calls: dict[int, dict[str, Any]], part: ToolCallDelta) -> None:
    if part.id is not None:
        calls[part.index] = {
            "id": part.id,
            "type": "function",
            "function": {"name": part.name, "arguments": ""},
        }
    calls[part.index]["function"]["arguments"] += part.arguments


# --- log-probabilities in OpenAI's two shapes -------------------------------------------
def _token_text(token: bytes) -> str:
    return token.decode("utf-8", "replace")


def _chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """Chat's: ``content`` lists each token with its bytes and top alternatives."""

    def entry(token: bytes, logprob: float) -> dict[str, Any]:
        return {"token": _token_text(token), "logprob": logprob, "bytes": list(token)}

    return {
        "content": [
            {**entry(t.token, t.logprob), "top_logprobs": [entry(b, lp) for b, lp in t.top]}
            for t in tokens
        ],
        "refusal": None,
    }


def _legacy_logprobs(tokens: list[TokenLogprob], offset: int) -> tuple[dict[str, Any], int]:
    """/v1/completions': parallel lists, offsets in characters from the text's start.
    Gives the shape and the offset after these tokens."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(_token_text(t.token))
    shape = {
        "tokens": [_token_text(t.token) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{_token_text(b): lp for b, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }
    return shape, offset


async def sse_response(request: web.Request, request_id: str) -> web.StreamResponse:
    """A server-sent-events answer, started (its events follow as they come)."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Request-Id": request_id,
        }
    )
    await response.prepare(request)
    return response


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@route.post("/v1/chat/completions", permission="models.use", audit=Audit.PIPELINE)
async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = parse(ChatCompletionRequest, await read_json(request))
    messages = [m.flat() for m in body.messages]
    return await _generate(request, body, messages=messages, chat=True)


@route.post("/v1/completions", permission="models.use", audit=Audit.PIPELINE)
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
    state: State = request.app[STATE]
    loop = asyncio.get_running_loop()

    model = body.model or state.settings.default_model

    def prepare() -> tuple[ToolUse | None, Constraint | None]:
        tools = body.tool_use() if chat else None
        if tools is not None:
            tools = replace(tools, format=tool_format_for(state, model))
        return tools, body.constraint(tools)

    # checking and compiling a schema is CPU work (cached afterwards): off the loop
    tools, constraint = await loop.run_in_executor(None, prepare)
    gen = GenerationRequest(
        model=model,
        prompt=prompt,
        messages=messages,
        max_tokens=body.limit(),
        stop=body.stop,
        sampling=body.sampling(),
        constraint=constraint,
        tools=tools,
        n=body.n,
        logprobs=body.token_logprobs(),
        keep_alive=body.keep_alive,
        timeout=body.timeout,
    )
    async with serve(request, gen) as events:
        await events.start()
        kind = "chat.completion" if chat else "text_completion"
        base = {
            "id": ("chatcmpl-" if chat else "cmpl-") + gen.id,
            "created": int(time.time()),
            "model": gen.model,
        }
        if body.stream:
            return await _stream(request, gen, body, base, events, chat, kind)
        return await _collect(gen, base, events, chat, kind)


async def _collect(
    gen: GenerationRequest, base: dict[str, Any], events: Events, chat: bool, kind: str
) -> web.Response:
    parts: list[list[str]] = [[] for _ in range(gen.n)]
    tokens: list[list[TokenLogprob]] = [[] for _ in range(gen.n)]
    calls: Calls = [{} for _ in range(gen.n)]
    finished: Finished | None = None
    async for event in events:
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Delta):
            parts[event.index].append(event.text)
            tokens[event.index].extend(event.logprobs)
        elif isinstance(event, ToolCallDelta):
            add_call(calls[event.choice], event)
        elif isinstance(event, Finished):
            finished = event
    assert finished is not None  # the events end with one Finished, or a Failed raised
    _log_done(gen, finished)
    texts = ["".join(p) for p in parts]
    await held_to_constraint(gen, texts, calls, finished)
    choices = []
    for i, text in enumerate(texts):
        choice: dict[str, Any] = {"index": i, "finish_reason": finished.reason(i)}
        logprobs: dict[str, Any] | None = None
        if gen.logprobs is not None:
            logprobs = _chat_logprobs(tokens[i]) if chat else _legacy_logprobs(tokens[i], 0)[0]
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls[i]:
                message.update(content=None, tool_calls=[calls[i][k] for k in sorted(calls[i])])
            choice.update(message=message, logprobs=logprobs)
        else:
            choice.update(text=text, logprobs=logprobs)
        choices.append(choice)
    payload = {
        **base,
        "object": kind,
        "choices": choices,
        "usage": finished.usage.as_dict(),
        "timings": timings(finished),
    }
    return web.json_response(payload, headers={"X-Request-Id": gen.id})


async def _stream(
    request: web.Request,
    gen: GenerationRequest,
    body: Any,
    base: dict[str, Any],
    events: Events,
    chat: bool,
    kind: str,
) -> web.StreamResponse:
    response = await sse_response(request, gen.id)
    obj = f"{kind}.chunk" if chat else kind
    offsets = [0] * gen.n  # the legacy shape's text_offset, per choice

    def chunk(
        index: int,
        text: str | None,
        finish: str | None = None,
        role: bool = False,
        tokens: tuple[TokenLogprob, ...] = (),
        call: ToolCallDelta | None = None,
    ) -> bytes:
        logprobs: dict[str, Any] | None = None
        if tokens:
            if chat:
                logprobs = _chat_logprobs(list(tokens))
            else:
                logprobs, offsets[index] = _legacy_logprobs(list(tokens), offsets[index])
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if call is not None:
                fragment: dict[str, Any] = {"index": call.index}
                if call.id is not None:
                    fragment.update(id=call.id, type="function")
                    fragment["function"] = {"name": call.name, "arguments": call.arguments}
                else:
                    fragment["function"] = {"arguments": call.arguments}
                delta["tool_calls"] = [fragment]
            choice: dict[str, Any] = {
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs}
            choice["finish_reason"] = finish
        return _sse({**base, "object": obj, "choices": [choice]})

    if chat:
        for i in range(gen.n):
            await response.write(chunk(i, "", role=True))
    sent: list[list[str]] = [[] for _ in range(gen.n)]
    calls: Calls = [{} for _ in range(gen.n)]
    async for event in events:
        if isinstance(event, Delta):
            sent[event.index].append(event.text)
            await response.write(chunk(event.index, event.text, tokens=event.logprobs))
            gen.marks.setdefault("first_write", time.monotonic())
        elif isinstance(event, ToolCallDelta):
            add_call(calls[event.choice], event)
            await response.write(chunk(event.choice, None, call=event))
            gen.marks.setdefault("first_write", time.monotonic())
        elif isinstance(event, Failed):
            err = event.error
            body_err = (
                err.body() if isinstance(err, EdgeError) else {"error": {"message": str(err)}}
            )
            await response.write(_sse(body_err))
        elif isinstance(event, Finished):
            _log_done(gen, event)
            try:
                await held_to_constraint(gen, ["".join(p) for p in sent], calls, event)
            except EdgeError as exc:
                await response.write(_sse(exc.body()))
                break
            for i in range(gen.n):
                await response.write(chunk(i, None, event.reason(i)))
            if body.include_usage:
                await response.write(
                    _sse(
                        {
                            **base,
                            "object": obj,
                            "choices": [],
                            "usage": event.usage.as_dict(),
                            "timings": timings(event, gen),
                        }
                    )
                )
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response
