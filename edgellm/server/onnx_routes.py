"""ONNX models over the socket: /v1/embeddings (OpenAI-compatible), a model's inputs
and outputs, inference on named tensors, and INT8 quantization into a new model."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any, Literal

import numpy as np
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgellm.errors import InvalidRequest
from edgellm.runtime.source import ModelRecord, check_name
from edgellm.runtime.types import Result, TensorRequest
from edgellm.server.context import REQUEST_ID, STATE, State, model_view, read_json, visible_record
from edgellm.server.pipeline import serve
from edgellm.server.routes import Audit, RouteTable
from edgellm.server.schemas import Duration, parse

log = logging.getLogger("edgellm.requests")
MAX_INPUTS = 2048  # texts in one embeddings request, as OpenAI allows
route = RouteTable()


class _Run(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timeout: float | None = Field(default=None, gt=0)  # seconds; capped by request_timeout
    keep_alive: Duration = None


class EmbeddingsBody(_Run):
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, v: Any) -> Any:
        if isinstance(v, list) and v and not all(isinstance(t, str) for t in v):
            raise ValueError(
                "input must be a string or a list of strings (token ids are "
                "not taken: send the text)"
            )
        return v


class InferBody(_Run):
    inputs: dict[str, Any]
    outputs: list[str] | None = None
    encoding: Literal["json", "npy"] = "json"


def _state(request: web.Request) -> State:
    return request.app[STATE]


def _onnx_record(st: State, name: str) -> ModelRecord:
    record = st.store.get(name)
    if record.format != "onnx":
        raise InvalidRequest(
            f"{name} is a {record.format.upper()} model; only ONNX models take tensors",
            param="model",
        )
    return record


async def _run(request: web.Request, tensor: TensorRequest, body: _Run) -> Result:
    """The tensor job through the pipeline: its allow row commits while the model runs
    (a model that answers in milliseconds would otherwise spend a good part of its time
    on two fsyncs), and the answer waits for it."""
    tensor.keep_alive = body.keep_alive
    tensor.timeout = body.timeout
    async with serve(request, tensor, overlap_audit=True) as events:
        return await events.result()


def embedding_record(st: State, name: str, dimensions: int | None) -> ModelRecord:
    """An embedding model's record, or a 400 naming why it cannot embed as asked."""
    record = st.store.get(name)
    if record.format != "onnx":
        raise InvalidRequest(
            f"{name} is a {record.format.upper()} model, which generates text; embeddings "
            f"come from an ONNX embedding model (default_embedding_model is "
            f"{st.settings.default_embedding_model!r})",
            param="model",
        )
    if "embedding" not in record.extra:
        raise InvalidRequest(
            f"{name} is not an embedding model (its bundle has no tokenizer "
            f"and embedding config); run it with /api/onnx/{name}/infer",
            param="model",
        )
    if dimensions is not None and dimensions != record.n_embd:
        raise InvalidRequest(
            f"{name} gives {record.n_embd} dimensions and cannot shorten "
            f"them; leave out dimensions or ask for {record.n_embd}",
            param="dimensions",
        )
    return record


@route.post("/v1/embeddings", permission="models.use", audit=Audit.PIPELINE)
async def embeddings(request: web.Request) -> web.Response:
    st = _state(request)
    body = parse(EmbeddingsBody, await read_json(request))
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or len(texts) > MAX_INPUTS:
        raise InvalidRequest(f"input must hold 1 to {MAX_INPUTS} texts", param="input")
    if any(not t for t in texts):
        raise InvalidRequest("input must not hold empty strings", param="input")
    name = body.model or st.settings.default_embedding_model
    embedding_record(st, name, body.dimensions)
    tensor = TensorRequest(model=name, texts=texts)
    result = await _run(request, tensor, body)
    vectors = result.outputs["embeddings"]
    if body.encoding_format == "base64":
        data: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        data = [v.tolist() for v in vectors]
    tokens = result.usage.prompt_tokens
    return web.json_response(
        {
            "object": "list",
            "model": name,
            "data": [
                {"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        headers={"X-Request-Id": request[REQUEST_ID]},
    )


@route.get("/api/onnx/{name}", permission="models.list")
async def signature(request: web.Request) -> web.Response:
    visible_record(request, request.match_info["name"])
    record = _onnx_record(_state(request), request.match_info["name"])
    extra = record.extra
    return web.json_response(
        {
            "name": record.name,
            "inputs": extra["inputs"],
            "outputs": extra["outputs"],
            "task": extra.get("task", "tensor"),
            "embedding": extra.get("embedding"),
            "opset": extra.get("opset"),
            "quantization": record.quantization,
        }
    )


@route.post("/api/onnx/{name}/infer", permission="models.use", scope="name", audit=Audit.PIPELINE)
async def infer(request: web.Request) -> web.Response:
    from edgellm.runtime.onnx import tensors

    st = _state(request)
    name = request.match_info["name"]
    body = parse(InferBody, await read_json(request))
    record = _onnx_record(st, name)
    signature = record.extra["inputs"]
    known = {s["name"]: s["dtype"] for s in signature}
    unknown = [n for n in body.inputs if n not in known]
    if unknown:
        raise InvalidRequest(
            f"{name} has no input {unknown[0]!r}; its inputs are {', '.join(known)}",
            param=f"inputs.{unknown[0]}",
        )
    arrays = {n: tensors.decode(n, spec, known[n]) for n, spec in body.inputs.items()}
    tensors.check(arrays, signature, name)
    outputs = [o["name"] for o in record.extra["outputs"]]
    for wanted in body.outputs or []:
        if wanted not in outputs:
            raise InvalidRequest(
                f"{name} has no output {wanted!r}; its outputs are {', '.join(outputs)}",
                param="outputs",
            )
    tensor = TensorRequest(model=name, inputs=arrays, outputs=body.outputs or None)
    result = await _run(request, tensor, body)
    as_npy = body.encoding == "npy"
    return web.json_response(
        {
            "model": name,
            "id": request[REQUEST_ID],
            "outputs": {
                k: tensors.encode(np.asarray(v), as_npy) for k, v in result.outputs.items()
            },
            "seconds": round(result.seconds, 4),
        },
        headers={"X-Request-Id": request[REQUEST_ID]},
        dumps=lambda o: json.dumps(o, separators=(",", ":")),
    )


@route.post("/api/models/{name}/quantize", permission="models.manage")
async def quantize(request: web.Request) -> web.Response:
    """POST /api/models/{name}/quantize ``{"target": NAME, "exclude": [NODE…]}``: dynamic
    INT8 of an ONNX model, stored as a new model (its plaintext only in memory)."""
    from edgellm.runtime.onnx.quantize import quantize_in_memory

    st = _state(request)
    name = request.match_info["name"]
    body = await read_json(request) if request.can_read_body else {}
    if not isinstance(body, dict) or set(body) - {"target", "exclude"}:
        raise InvalidRequest('send {"target": NAME, "exclude": [NODE, …]} (both optional)')
    record = _onnx_record(st, name)
    target = check_name(str(body.get("target") or f"{name}-int8"))
    exclude = body.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(n, str) for n in exclude):
        raise InvalidRequest("exclude must be a list of node names", param="exclude")

    def work() -> Any:
        with st.store.open(name) as path, open(path, "rb") as f:
            quantized = quantize_in_memory(f.read(), exclude)
        return st.store.add_stream(
            iter([quantized]),
            target,
            info={
                "source": f"quantized from {name} ({record.sha256[:12]}), dynamic int8",
                "quantization": "int8",
            },
        )

    new = await asyncio.get_running_loop().run_in_executor(None, work)
    return web.json_response(model_view(st, new), status=201)
