"""Ollama's API, under ``/ollama``: what the ``ollama`` clients, langchain-ollama,
Open WebUI and the rest speak. Every Ollama client takes a base URL with a path
(``Client(host="http://edgellm/ollama")``, ``OLLAMA_HOST=device:8443/ollama``), so
Ollama's paths live beside edgellm's own ``/api/*`` without either shadowing the
other (both have an ``/api/ps``, with other shapes).

A dialect only: bodies become the runtime's typed requests (the same grammars for
``format`` and ``tools`` as the OpenAI routes, the same pipeline, permissions and
audit rows), and events become Ollama's NDJSON lines. Errors are Ollama's shape,
``{"error": "…"}``, with the same status and message as elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any

from aiohttp import web

from edgellm.errors import EdgeError, InvalidRequest, ModelNotFound
from edgellm.runtime.llama import schema_grammar
from edgellm.runtime.types import (
    Constraint,
    Delta,
    Failed,
    Finished,
    GenerationRequest,
    TensorRequest,
    TextRequest,
    TokenLogprob,
    ToolCallDelta,
    ToolUse,
)
from edgellm.server.context import STATE, State, may_see, read_json, tool_format_for
from edgellm.server.ollama_schemas import (
    ChatBody,
    EmbedBody,
    EmbeddingsBody,
    GenerateBody,
    Options,
    format_schema,
)
from edgellm.server.openai_routes import add_call, held_to_constraint
from edgellm.server.pipeline import Events, serve
from edgellm.server.routes import Audit, RouteTable
from edgellm.server.schemas import ChatCompletionRequest, parse

PREFIX = "/ollama"
route = RouteTable()


def _state(request: web.Request) -> State:
    return request.app[STATE]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())


def resolve_name(request: web.Request, name: str) -> str:
    """An Ollama name (``name`` or ``name:latest``) as edgellm's; 404 naming it."""
    st = _state(request)
    for candidate in (name, name.removesuffix(":latest")):
        if may_see(request, candidate):
            try:
                st.store.get(candidate)
                return candidate
            except ModelNotFound:
                continue
    raise ModelNotFound(
        f"model {name!r} not found (edgellm's models answer to NAME and NAME:latest; "
        f"GET {PREFIX}/api/tags lists them)",
        param="model",
    )


def tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


# --- generation ---------------------------------------------------------------------------
def _constraint(schema: dict[str, Any] | None) -> Constraint | None:
    if schema is None:
        return None
    if schema == {"type": "object"}:
        return Constraint(grammar=schema_grammar.any_json_object(), json_object=True)
    return Constraint(grammar=schema_grammar.to_grammar(schema, "format"), schema=schema)


def _history(body: ChatBody) -> list[dict[str, Any]]:
    """Ollama's messages in OpenAI's shape: its tool calls get ids, and each tool
    result answers the earliest unanswered call of its ``tool_name``."""
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []  # (id, name), not yet answered
    for i, m in enumerate(body.messages):
        if m.images:
            raise InvalidRequest(
                "images: the models edgellm serves read text only", param=f"messages[{i}].images"
            )
        message: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise InvalidRequest(
                        "a tool call is {function: {name, arguments}}",
                        param=f"messages[{i}].tool_calls[{j}]",
                    )
                call_id = f"call_{i}_{j}"
                arguments = function.get("arguments") or {}
                calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": function["name"], "arguments": json.dumps(arguments)},
                    }
                )
                open_calls.append((call_id, function["name"]))
            message["tool_calls"] = calls
        if m.role == "tool":
            match = next((c for c in open_calls if m.tool_name in (None, c[1])), None)
            if match is None:
                raise InvalidRequest(
                    f"messages[{i}] is a tool result, but no earlier assistant message "
                    f"called {m.tool_name or 'a tool'} without an answer",
                    param=f"messages[{i}].tool_name",
                )
            open_calls.remove(match)
            message["tool_call_id"] = match[0]
        out.append(message)
    return out


def _chat_request(
    state: State, body: ChatBody, model: str
) -> tuple[list[dict[str, Any]], ToolUse | None, Constraint | None]:
    """The messages, tools and constraint, through the OpenAI dialect's own checks (a
    bad parameter schema or history is the same 400 there and here)."""
    openai_body: dict[str, Any] = {"model": model, "messages": _history(body)}
    if body.tools:
        openai_body["tools"] = body.tools
    if not body.messages:
        return [], None, None
    request = parse(ChatCompletionRequest, openai_body)
    messages = [m.flat() for m in request.messages]
    tools = request.tool_use()
    schema = format_schema(body.format)
    if tools is not None:
        if schema is not None:
            raise InvalidRequest("format cannot be combined with tools", param="format")
        tools = replace(tools, format=tool_format_for(state, model))
        return messages, tools, request.constraint(tools)
    return messages, None, _constraint(schema)


def _check_context(request: web.Request, model: str, options: Options) -> None:
    if options.num_ctx is None:
        return
    st = _state(request)
    record = st.store.get(model)
    n_ctx = st.settings.for_model(model).context_for(record.context_length)
    if options.num_ctx > n_ctx:
        raise InvalidRequest(
            f"options.num_ctx is {options.num_ctx}, but {model}'s context per request is "
            f"{n_ctx} (n_ctx in edgellm.toml); ask for at most {n_ctx}",
            param="options.num_ctx",
        )


def _logprobs(tokens: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> list[dict[str, Any]]:
    def text(raw: bytes) -> str:
        return raw.decode("utf-8", "replace")

    return [
        {
            "token": text(t.token),
            "logprob": t.logprob,
            "top_logprobs": [{"token": text(tok), "logprob": lp} for tok, lp in t.top],
        }
        for t in tokens
    ]


def _done(gen: GenerationRequest, finished: Finished) -> dict[str, Any]:
    reason = finished.finish_reason
    return {
        "done": True,
        "done_reason": "stop" if reason == "tool_calls" else reason,
        "total_duration": int((time.monotonic() - gen.started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": finished.usage.prompt_tokens,
        "prompt_eval_duration": int(finished.prompt_seconds * 1e9),
        "eval_count": finished.usage.completion_tokens,
        "eval_duration": int(finished.decode_seconds * 1e9),
    }


def _ollama_call(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped call (openai_routes.add_call) as Ollama writes one."""
    f = call["function"]
    return {"function": {"name": f["name"], "arguments": json.loads(f["arguments"] or "{}")}}


async def _answer(
    request: web.Request, gen: GenerationRequest, stream: bool, chat: bool
) -> web.StreamResponse:
    """The job through the pipeline, as Ollama's NDJSON lines or one object."""

    async with serve(request, gen) as events:
        await events.start()
        if stream:
            return await _stream(request, gen, events, chat)
        text, calls, tokens, finished = await _gather(events)
        await held_to_constraint(gen, [text], [calls], finished)
        line = _line(gen, chat, text, [calls[k] for k in sorted(calls)], tokens)
        return web.json_response({**line, **_done(gen, finished)}, headers=_ids(gen))


def _ids(job: GenerationRequest | TextRequest) -> dict[str, str]:
    return {"X-Request-Id": job.id}


def _line(
    gen: GenerationRequest,
    chat: bool,
    text: str,
    calls: list[dict[str, Any]],
    tokens: list[TokenLogprob],
) -> dict[str, Any]:
    line: dict[str, Any] = {"model": tagged(gen.model), "created_at": _now()}
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [_ollama_call(c) for c in calls]
        line["message"] = message
    else:
        line["response"] = text
    line["done"] = False
    if gen.logprobs is not None and tokens:
        line["logprobs"] = _logprobs(tokens)
    return line


async def _gather(
    events: Events,
) -> tuple[str, dict[int, dict[str, Any]], list[TokenLogprob], Finished]:
    parts: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    tokens: list[TokenLogprob] = []
    finished: Finished | None = None
    async for event in events:
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Delta):
            parts.append(event.text)
            tokens.extend(event.logprobs)
        elif isinstance(event, ToolCallDelta):
            add_call(calls, event)
        elif isinstance(event, Finished):
            finished = event
    assert finished is not None
    return "".join(parts), calls, tokens, finished


async def _stream(
    request: web.Request, gen: GenerationRequest, events: Events, chat: bool
) -> web.StreamResponse:

    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", **_ids(gen)})
    await response.prepare(request)

    async def write(payload: dict[str, Any]) -> None:
        await response.write(json.dumps(payload).encode() + b"\n")

    sent: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    async for event in events:
        if isinstance(event, Delta) and (event.text or event.logprobs):
            sent.append(event.text)
            await write(_line(gen, chat, event.text, [], list(event.logprobs)))
        elif isinstance(event, ToolCallDelta):
            add_call(calls, event)  # a call goes out whole, once it is complete
        elif isinstance(event, Failed):
            err = event.error
            await write({"error": err.message if isinstance(err, EdgeError) else str(err)})
        elif isinstance(event, Finished):
            try:
                await held_to_constraint(gen, ["".join(sent)], [calls], event)
            except EdgeError as exc:
                await write({"error": exc.message})
                break
            if calls:
                await write(_line(gen, chat, "", [calls[k] for k in sorted(calls)], []))
            await write({**_line(gen, chat, "", [], []), **_done(gen, event)})
    await response.write_eof()
    return response


@route.post(PREFIX + "/api/chat", permission="models.use", audit=Audit.PIPELINE)
async def chat(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    body = parse(ChatBody, await read_json(request))
    body.check_common()
    model = resolve_name(request, body.model)
    options = body.options or Options()
    _check_context(request, model, options)
    loop = asyncio.get_running_loop()
    messages, tools, constraint = await loop.run_in_executor(None, _chat_request, st, body, model)
    gen = GenerationRequest(
        model=model,
        messages=messages,
        max_tokens=options.max_tokens(),
        stop=options.stop or [],
        sampling=options.sampling(),
        constraint=constraint,
        tools=tools,
        logprobs=body.token_logprobs(),
        keep_alive=body.keep_alive,
        n_ctx=options.num_ctx,
    )
    if not gen.messages:  # Ollama's way to load a model: an empty conversation
        return await _load_only(request, gen, chat=True)
    return await _answer(request, gen, body.stream, chat=True)


@route.post(PREFIX + "/api/generate", permission="models.use", audit=Audit.PIPELINE)
async def generate(request: web.Request) -> web.StreamResponse:
    body = parse(GenerateBody, await read_json(request))
    body.check_common()
    for field, why in (
        ("images", "the models edgellm serves read text only"),
        ("suffix", "fill-in-the-middle is not supported"),
        ("template", "the model's own chat template is always used (raw: true skips it)"),
        ("context", "the older context array is not kept; send the conversation to /api/chat"),
    ):
        if getattr(body, field):
            raise InvalidRequest(f"{field}: {why}", param=field)
    model = resolve_name(request, body.model)
    options = body.options or Options()
    _check_context(request, model, options)
    schema = format_schema(body.format)
    constraint = await asyncio.get_running_loop().run_in_executor(None, _constraint, schema)
    messages = None
    prompt = body.prompt or ""
    if not body.raw:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
            {"role": "user", "content": prompt}
        ]
    elif body.system:
        raise InvalidRequest("system has no place in a raw prompt", param="system")
    gen = GenerationRequest(
        model=model,
        prompt=prompt if body.raw else None,
        messages=messages,
        max_tokens=options.max_tokens(),
        stop=options.stop or [],
        sampling=options.sampling(),
        constraint=constraint,
        logprobs=body.token_logprobs(),
        keep_alive=body.keep_alive,
        n_ctx=options.num_ctx,
    )
    if not prompt:  # Ollama's way to load (or, with keep_alive 0, unload) a model
        return await _load_only(request, gen, chat=False)
    return await _answer(request, gen, body.stream, chat=False)


async def _load_only(request: web.Request, gen: GenerationRequest, chat: bool) -> web.Response:
    """An empty prompt loads the model (keep_alive as given; 0 unloads it), as Ollama
    does: a text job on the model (nothing generated), so access and the audit rows
    are a model use's."""
    st = _state(request)
    job = TextRequest(model=gen.model, op="tokenize", text="")
    job.keep_alive = gen.keep_alive
    async with serve(request, job) as events:
        await events.result()
    line: dict[str, Any] = {"model": tagged(gen.model), "created_at": _now()}
    if chat:
        line["message"] = {"role": "assistant", "content": ""}
    else:
        line["response"] = ""
    reason = "load"
    if gen.keep_alive == 0:
        await asyncio.get_running_loop().run_in_executor(None, st.runtime.unload, gen.model)
        reason = "unload"
    return web.json_response({**line, "done": True, "done_reason": reason}, headers=_ids(job))


# --- embeddings -----------------------------------------------------------------------------
async def _embed(request: web.Request, model: str, texts: list[str], keep_alive: Any) -> Any:
    from edgellm.server.onnx_routes import embedding_record

    st = _state(request)
    embedding_record(st, model, None)
    tensor = TensorRequest(model=model, texts=texts)
    tensor.keep_alive = keep_alive
    async with serve(request, tensor, overlap_audit=True) as events:
        return await events.result()


@route.post(PREFIX + "/api/embed", permission="models.use", audit=Audit.PIPELINE)
async def embed(request: web.Request) -> web.Response:
    body = parse(EmbedBody, await read_json(request))
    model = resolve_name(request, body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or any(not t for t in texts):
        raise InvalidRequest("input must hold one or more non-empty texts", param="input")
    if body.truncate is False:
        raise InvalidRequest(
            "truncate: false is not supported: texts longer than the model's window are "
            "truncated to it",
            param="truncate",
        )
    record = _state(request).store.get(model)
    if body.dimensions is not None and body.dimensions != record.n_embd:
        raise InvalidRequest(
            f"{model} gives {record.n_embd} dimensions and cannot shorten them",
            param="dimensions",
        )
    t0 = time.monotonic()
    result = await _embed(request, model, texts, body.keep_alive)
    return web.json_response(
        {
            "model": tagged(model),
            "embeddings": [v.tolist() for v in result.outputs["embeddings"]],
            "total_duration": int((time.monotonic() - t0) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": result.usage.prompt_tokens,
        }
    )


@route.post(PREFIX + "/api/embeddings", permission="models.use", audit=Audit.PIPELINE)
async def embeddings(request: web.Request) -> web.Response:
    body = parse(EmbeddingsBody, await read_json(request))
    if body.options:
        raise InvalidRequest("an embedding model takes no options", param="options")
    model = resolve_name(request, body.model)
    if not body.prompt:
        raise InvalidRequest("prompt must be a non-empty text", param="prompt")
    result = await _embed(request, model, [body.prompt], body.keep_alive)
    return web.json_response({"embedding": result.outputs["embeddings"][0].tolist()})
