"""OpenAI's Responses API, ``POST /v1/responses``, stateless: what the openai SDK's
``client.responses`` and the OpenAI Agents SDK call by default.

A dialect over the chat dialect: the request's ``input`` items, ``instructions``,
``tools``, ``tool_choice`` and ``text.format`` become a chat request, checked by the
same code (so a bad schema or history is the same 400 with its Responses name),
through the same pipeline; the events come back as Responses output items, or as
its typed stream events (``response.created``, ``response.output_text.delta``,
``response.function_call_arguments.delta``, ``response.completed``…).

Nothing is stored: ``store: true``, ``previous_response_id``, ``conversation`` and
background runs are refused by name, and every request carries its whole input.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from edgellm.errors import EdgeError, InvalidRequest
from edgellm.runtime.types import Delta, Failed, Finished, GenerationRequest, ToolCallDelta
from edgellm.server.context import STATE, State, read_json, tool_format_for
from edgellm.server.openai_routes import held_to_constraint, sse_response
from edgellm.server.pipeline import Events, serve
from edgellm.server.routes import Audit, RouteTable
from edgellm.server.schemas import ChatCompletionRequest, parse

route = RouteTable()
TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    seed: int | None = None  # edgellm's, as on the chat route: a reproducible draw
    stream: bool = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    include: list[str] | None = None
    truncation: Literal["disabled"] | None = None
    # say nothing to a device's model: accepted, as the chat routes accept them
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    stream_options: dict[str, Any] | None = None
    # refused below, by name, rather than as unknown fields
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: int | None = None
    prompt: dict[str, Any] | None = None


REFUSED = {
    "store": "edgellm keeps no responses (every request carries its whole input); "
    "send store: false or leave it out",
    "previous_response_id": "no responses are stored; send the earlier items in input",
    "conversation": "no conversations are stored; send the earlier items in input",
    "background": "background responses need stored responses, which edgellm does not keep",
    "reasoning": "no model edgellm serves writes a separate reasoning trace",
    "top_logprobs": "log-probabilities are on /v1/chat/completions (logprobs, top_logprobs)",
    "prompt": "stored prompt templates are not kept; send instructions and input",
}


def _state(request: web.Request) -> State:
    return request.app[STATE]


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (other parts are refused)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest("content is a string or a list of text parts", param=where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise InvalidRequest(
                f"{kind!r} parts are not supported: the models edgellm serves read text",
                param=f"{where}[{j}].type",
            )
        out.append(str(part.get("text", "")))
    return "".join(out)


def _messages(body: ResponsesBody) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` as chat messages (function calls and their
    outputs as an assistant's tool_calls and tool messages)."""
    out: list[dict[str, Any]] = []
    if body.instructions:
        out.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*out, {"role": "user", "content": body.input}]
    for i, item in enumerate(body.input):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("system", "developer", "user", "assistant"):
                raise InvalidRequest(f"no role {role!r}", param=f"input[{i}].role")
            content = _text(item.get("content", ""), f"input[{i}].content")
            out.append({"role": role, "content": content})
        elif kind == "function_call":
            call = {
                "id": str(item.get("call_id") or ""),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
            }
            last = out[-1] if out else None
            if last and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # calls made together: one turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            content = _text(output, f"input[{i}].output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        else:
            raise InvalidRequest(
                f"input items of type {kind!r} are not supported (message, function_call "
                "and function_call_output are)",
                param=f"input[{i}].type",
            )
    return out


def _chat_body(body: ResponsesBody, model: str) -> dict[str, Any]:
    chat: dict[str, Any] = {"model": model, "messages": _messages(body)}
    for name, value in (
        ("max_tokens", body.max_output_tokens),
        ("temperature", body.temperature),
        ("top_p", body.top_p),
        ("parallel_tool_calls", body.parallel_tool_calls),
        ("seed", body.seed),
    ):
        if value is not None:
            chat[name] = value
    if body.tools:
        tools = []
        for i, tool in enumerate(body.tools):
            if tool.get("type") != "function":
                raise InvalidRequest(
                    f"tools of type {tool.get('type')!r} are not supported (function tools are)",
                    param=f"tools[{i}].type",
                )
            function = {k: v for k, v in tool.items() if k != "type"}
            tools.append({"type": "function", "function": function})
        chat["tools"] = tools
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not choice.get("name"):
            raise InvalidRequest(
                'tool_choice is "auto", "none", "required" or {"type": "function", "name": …}',
                param="tool_choice",
            )
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif choice is not None:
        chat["tool_choice"] = choice
    fmt = (body.text or {}).get("format")
    extra = set(body.text or {}) - {"format"}
    if extra:
        raise InvalidRequest(f"text.{sorted(extra)[0]} is not supported", param="text")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise InvalidRequest("text.format is an object with a type", param="text.format")
        kind = fmt.get("type")
        if kind == "json_schema":
            chat["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    k: v for k, v in fmt.items() if k in ("name", "schema", "strict", "description")
                },
            }
        elif kind in ("text", "json_object"):
            chat["response_format"] = {"type": kind}
        else:
            raise InvalidRequest(f"no text format {kind!r}", param="text.format.type")
    return chat


_RENAMED = (  # a chat field's name, as this request spells it
    ("response_format.json_schema.schema", "text.format.schema"),
    ("response_format", "text.format"),
    ("max_tokens", "max_output_tokens"),
    ("messages", "input"),
)


def _renamed(exc: InvalidRequest) -> InvalidRequest:
    for chat, here in _RENAMED:
        if exc.param and exc.param.startswith(chat):
            exc.param = here + exc.param[len(chat) :]
            exc.message = exc.message.replace(chat, here)
            break
    return exc


def _prepare(st: State, body: ResponsesBody, model: str) -> tuple[GenerationRequest, Any]:
    try:
        chat = parse(ChatCompletionRequest, _chat_body(body, model))
        tools = chat.tool_use()
        if tools is not None:
            tools = replace(tools, format=tool_format_for(st, model))
        constraint = chat.constraint(tools)
    except InvalidRequest as exc:
        raise _renamed(exc) from None
    gen = GenerationRequest(
        model=model,
        messages=[m.flat() for m in chat.messages],
        max_tokens=chat.limit(),
        sampling=chat.sampling(),
        constraint=constraint,
        tools=tools,
    )
    return gen, chat


@route.post("/v1/responses", permission="models.use", audit=Audit.PIPELINE)
async def responses(request: web.Request) -> web.StreamResponse:
    st = _state(request)
    body = parse(ResponsesBody, await read_json(request))
    for field, why in REFUSED.items():
        value = getattr(body, field)
        if value not in (None, False) and not (field == "reasoning" and not value):
            raise InvalidRequest(f"{field}: {why}", param=field)
    if body.include:
        raise InvalidRequest(f"include: {body.include[0]!r} is not available here", param="include")
    model = body.model or st.settings.default_model
    loop = asyncio.get_running_loop()
    gen, chat = await loop.run_in_executor(None, _prepare, st, body, model)
    shape = _Shape(gen, body, chat)
    async with serve(request, gen) as events:
        await events.start()
        if body.stream:
            return await _stream(request, shape, events)
        texts: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        finished: Finished | None = None
        async for event in events:
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Delta):
                texts.append(event.text)
            elif isinstance(event, ToolCallDelta):
                shape.add_call(calls, event)
            elif isinstance(event, Finished):
                finished = event
        assert finished is not None
        await held_to_constraint(gen, ["".join(texts)], [_as_chat(calls)], finished)
        items = []
        if "".join(texts) or not calls:
            items.append(shape.message("".join(texts), "completed"))
        items += [shape.function_call(c, "completed") for c in calls.values()]
        return web.json_response(shape.response(items, finished), headers={"X-Request-Id": gen.id})


def _as_chat(calls: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Calls as the chat dialect holds them, for its check of a finished answer."""
    return {
        k: {"function": {"name": c["name"], "arguments": c["arguments"]}} for k, c in calls.items()
    }


class _Shape:
    """The Responses API's objects for one request."""

    def __init__(self, gen: GenerationRequest, body: ResponsesBody, chat: Any) -> None:
        self.gen, self.body, self.chat = gen, body, chat
        self.id = f"resp_{gen.id}"
        self.created = int(time.time())

    def add_call(self, calls: dict[int, dict[str, Any]], part: ToolCallDelta) -> dict[str, Any]:
        if part.id is not None:
            calls[part.index] = {
                "id": f"fc_{self.gen.id}_{part.index}",
                "call_id": part.id,
                "name": part.name,
                "arguments": "",
            }
        calls[part.index]["arguments"] += part.arguments
        return calls[part.index]

    def message(self, text: str, status: str) -> dict[str, Any]:
        return {
            "type": "message",
            "id": f"msg_{self.gen.id}",
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
            if status == "completed" or text
            else [],
        }

    def function_call(self, call: dict[str, Any], status: str) -> dict[str, Any]:
        return {"type": "function_call", **call, "status": status}

    def response(self, output: list[dict[str, Any]], finished: Finished | None) -> dict[str, Any]:
        b = self.body
        status, incomplete = "in_progress", None
        usage = None
        if finished is not None:
            cut = finished.finish_reason in ("length", "deadline", "cancelled")
            status = "incomplete" if cut else "completed"
            if cut:
                reason = (
                    "max_output_tokens" if finished.finish_reason == "length" else "interrupted"
                )
                incomplete = {"reason": reason}
            u = finished.usage
            usage = {
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total_tokens,
            }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.gen.model,
            "output": output,
            "usage": usage,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "temperature": self.gen.sampling.temperature,
            "top_p": self.gen.sampling.top_p,
            "tools": b.tools or [],
            "tool_choice": b.tool_choice or "auto",
            "parallel_tool_calls": bool(b.parallel_tool_calls),
            "text": b.text or {"format": {"type": "text"}},
            "truncation": "disabled",
            "store": False,
            "metadata": b.metadata or {},
            "previous_response_id": None,
            "reasoning": None,
        }


async def _stream(request: web.Request, shape: _Shape, events: Events) -> web.StreamResponse:
    gen = shape.gen
    response = await sse_response(request, gen.id)
    sequence = 0

    async def send(kind: str, **payload: Any) -> None:
        nonlocal sequence
        data = json.dumps({"type": kind, "sequence_number": sequence, **payload})
        sequence += 1
        await response.write(f"event: {kind}\ndata: {data}\n\n".encode())

    output: list[dict[str, Any]] = []  # the items as they end
    texts: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    message_open = False
    open_call: dict[str, Any] | None = None

    async def close_message() -> None:
        nonlocal message_open
        if not message_open:
            return
        message_open = False
        text, index = "".join(texts), len(output)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        ids = {"item_id": f"msg_{gen.id}", "output_index": index, "content_index": 0}
        await send("response.output_text.done", **ids, text=text, logprobs=[])
        await send("response.content_part.done", **ids, part=part)
        item = shape.message(text, "completed")
        output.append(item)
        await send("response.output_item.done", output_index=index, item=item)

    async def close_call() -> None:
        nonlocal open_call
        if open_call is None:
            return
        call, open_call, index = open_call, None, len(output)
        await send(
            "response.function_call_arguments.done",
            item_id=call["id"],
            output_index=index,
            name=call["name"],
            arguments=call["arguments"],
        )
        item = shape.function_call(call, "completed")
        output.append(item)
        await send("response.output_item.done", output_index=index, item=item)

    await send("response.created", response=shape.response([], None))
    await send("response.in_progress", response=shape.response([], None))
    async for event in events:
        if isinstance(event, Delta) and event.text:
            if not message_open:
                message_open = True
                index = len(output)
                await send(
                    "response.output_item.added",
                    output_index=index,
                    item=shape.message("", "in_progress"),
                )
                await send(
                    "response.content_part.added",
                    item_id=f"msg_{gen.id}",
                    output_index=index,
                    content_index=0,
                    part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                )
            texts.append(event.text)
            await send(
                "response.output_text.delta",
                item_id=f"msg_{gen.id}",
                output_index=len(output),
                content_index=0,
                delta=event.text,
                logprobs=[],
            )
        elif isinstance(event, ToolCallDelta):
            if event.id is not None:
                await close_message()
                await close_call()
                open_call = shape.add_call(calls, event)
                item = shape.function_call({**open_call, "arguments": ""}, "in_progress")
                await send("response.output_item.added", output_index=len(output), item=item)
            else:
                shape.add_call(calls, event)
            if event.arguments:
                assert open_call is not None
                await send(
                    "response.function_call_arguments.delta",
                    item_id=open_call["id"],
                    output_index=len(output),
                    delta=event.arguments,
                )
        elif isinstance(event, Failed):
            err = event.error
            message = err.message if isinstance(err, EdgeError) else str(err)
            await send(
                "error", code=getattr(err, "code", "server_error"), message=message, param=None
            )
        elif isinstance(event, Finished):
            try:
                await held_to_constraint(gen, ["".join(texts)], [_as_chat(calls)], event)
            except EdgeError as exc:
                await send("error", code=exc.code, message=exc.message, param=None)
                break
            await close_message()
            await close_call()
            final = shape.response(output, event)
            kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
            await send(kind, response=final)
    await response.write_eof()
    return response
