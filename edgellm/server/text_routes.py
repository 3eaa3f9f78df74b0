"""A language model's text side, as llama.cpp's server has it: /tokenize, /detokenize
and /apply-template (the prompt the chat template makes of some messages).

Each is a use of the model (the same access check, allow and outcome rows as a
completion), served by its engine between decode steps, in no slot.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from edgellm.runtime.types import TextRequest
from edgellm.server.context import STATE, read_json
from edgellm.server.pipeline import serve
from edgellm.server.routes import Audit, RouteTable
from edgellm.server.schemas import Message, parse

route = RouteTable()
MAX_TOKENS = 1 << 20  # in one /detokenize; the body limit binds first in practice


class _OnModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None


class TokenizeBody(_OnModel):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeBody(_OnModel):
    tokens: list[int] = Field(max_length=MAX_TOKENS)


class TemplateBody(_OnModel):
    messages: list[Message] = Field(min_length=1)


Op = Literal["tokenize", "detokenize", "template"]


async def _run(request: web.Request, op: Op, body: _OnModel, **job: Any) -> dict[str, Any]:
    model = body.model or request.app[STATE].settings.default_model
    text = TextRequest(model=model, op=op, **job)
    async with serve(request, text, overlap_audit=True) as events:  # milliseconds
        result = await events.result()
    return result.outputs


@route.post("/tokenize", permission="models.use", audit=Audit.PIPELINE)
async def tokenize(request: web.Request) -> web.Response:
    body = parse(TokenizeBody, await read_json(request))
    out = await _run(request, "tokenize", body, text=body.content, add_special=body.add_special)
    if not body.with_pieces:
        return web.json_response({"tokens": out["tokens"]})
    pieces = [{"id": t, "piece": p} for t, p in zip(out["tokens"], out["pieces"], strict=True)]
    return web.json_response({"tokens": pieces})


@route.post("/detokenize", permission="models.use", audit=Audit.PIPELINE)
async def detokenize(request: web.Request) -> web.Response:
    body = parse(DetokenizeBody, await read_json(request))
    out = await _run(request, "detokenize", body, tokens=body.tokens)
    return web.json_response({"content": out["content"]})


@route.post("/apply-template", permission="models.use", audit=Audit.PIPELINE)
async def apply_template(request: web.Request) -> web.Response:
    body = parse(TemplateBody, await read_json(request))
    out = await _run(request, "template", body, messages=[m.flat() for m in body.messages])
    return web.json_response({"prompt": out["prompt"]})
