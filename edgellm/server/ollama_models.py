"""Ollama's model routes, under ``/ollama`` beside its generation routes
(ollama_routes.py): the running check, version, tags, ps, show, pull from edgellm's
catalog into the vault, delete; copy is refused by name (a model's name is given
when it enters the vault)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from edgellm import __version__
from edgellm.catalog import Catalog, prepare, store_pulled
from edgellm.errors import EdgeError, InvalidRequest, ModelNotFound
from edgellm.runtime.source import ModelRecord
from edgellm.server.context import STATE, State, capabilities, may_see, read_json, who_of
from edgellm.server.ollama_routes import PREFIX, resolve_name, tagged
from edgellm.server.ollama_schemas import ModelBody, PullBody
from edgellm.server.routes import RouteTable
from edgellm.server.schemas import parse

API_VERSION = "0.12.0"  # the Ollama API these routes follow
route = RouteTable()


def _state(request: web.Request) -> State:
    return request.app[STATE]


def _expiry(left: float | None) -> str:
    """When a loaded model goes, as Ollama writes it (pinned or busy: no time)."""
    if left is None:
        return "0001-01-01T00:00:00Z"
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + left))
    except (OverflowError, OSError, ValueError):  # a keep_alive beyond the calendar
        return "9999-12-31T23:59:59Z"


def _details(record: ModelRecord) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": record.format,
        "family": record.architecture,
        "families": [record.architecture] if record.architecture else None,
        "parameter_size": "",
        "quantization_level": record.quantization,
    }


@route.get(PREFIX, permission="health.read")
@route.get(PREFIX + "/", permission="health.read")
async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running (edgellm)")


@route.get(PREFIX + "/api/version", permission="health.read")
async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": API_VERSION, "edgellm": __version__})


@route.get(PREFIX + "/api/tags", permission="models.list")
async def tags(request: web.Request) -> web.Response:
    st = _state(request)
    models = [
        {
            "name": tagged(r.name),
            "model": tagged(r.name),
            "modified_at": r.added,
            "size": r.size,
            "digest": r.sha256,
            "details": _details(r),
        }
        for r in st.store.list()
        if may_see(request, r.name)
    ]
    return web.json_response({"models": models})


@route.get(PREFIX + "/api/ps", permission="models.list")
async def ps(request: web.Request) -> web.Response:
    st = _state(request)
    out = []
    for status in st.runtime.loaded():
        if not may_see(request, status.name):
            continue
        record = st.store.get(status.name)
        expires = _expiry(status.expires_in_seconds)
        size = int(status.memory_mb * 2**20)
        out.append(
            {
                "name": tagged(status.name),
                "model": tagged(status.name),
                "size": size,
                "digest": record.sha256,
                "details": _details(record),
                "expires_at": expires,
                "size_vram": size if status.device == "gpu" else 0,
                "context_length": status.n_ctx,
            }
        )
    return web.json_response({"models": out})


@route.post(PREFIX + "/api/show", permission="models.list")
async def show(request: web.Request) -> web.Response:
    st = _state(request)
    body = parse(ModelBody, await read_json(request))
    record = st.store.get(resolve_name(request, body.which()))
    info: dict[str, Any] = {"general.architecture": record.architecture}
    if record.architecture:
        prefix = record.architecture
        info.update(
            {
                f"{prefix}.context_length": record.context_length,
                f"{prefix}.embedding_length": record.n_embd,
                f"{prefix}.block_count": record.n_layer,
                f"{prefix}.attention.head_count": record.n_head,
                f"{prefix}.attention.head_count_kv": record.n_head_kv,
            }
        )
    return web.json_response(
        {
            "license": record.license,
            "modelfile": "",
            "parameters": "",
            "template": "",
            "details": _details(record),
            "model_info": info,
            "capabilities": capabilities(record),
            "modified_at": record.added,
        }
    )


@route.post(PREFIX + "/api/pull", permission="models.manage")
async def pull(request: web.Request) -> web.StreamResponse:
    """From edgellm's catalog (the names `edgellm models catalog` lists), into the vault.
    Progress as Ollama streams it, twice a second, from the job's figures (pip's
    download, the checksum, the vault's encryption)."""
    st = _state(request)
    body = parse(PullBody, await read_json(request))
    name = body.which().removesuffix(":latest")
    manifest = Catalog(st.settings.catalog_dir).get(name)
    loop = asyncio.get_running_loop()
    steps: list[dict[str, Any]] = [{"status": "pulling manifest"}]

    async def work(emit: Any) -> None:
        try:
            st.store.get(name)
            await emit({"status": "success"})
            return
        except ModelNotFound:
            pass
        digest = f"sha256:{manifest.sha256}"
        with st.jobs.run("pull", name, who_of(request)) as job:

            async def watched(call: Any) -> Any:
                """``call`` in a thread; meanwhile its bytes as Ollama's progress."""
                running = loop.run_in_executor(None, call)
                while not running.done():
                    await asyncio.wait([running], timeout=0.5)
                    await emit(
                        {
                            "status": f"{job.phase} {digest[7:19]}",
                            "digest": digest,
                            "total": job.total or manifest.size,
                            "completed": job.completed,
                        }
                    )
                return running.result()

            path = await watched(lambda: prepare(manifest, st.settings.cache_dir, job.report))
            await emit({"status": "verifying sha256 digest"})
            await watched(lambda: store_pulled(st.store, manifest, path, job.report))
        await emit({"status": "writing manifest"})
        await emit({"status": "success"})

    if not body.stream:

        async def keep(step: dict[str, Any]) -> None:
            steps.append(step)

        await work(keep)
        return web.json_response(steps[-1])
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)

    async def send(step: dict[str, Any]) -> None:
        await response.write(json.dumps(step).encode() + b"\n")

    await send(steps[0])
    try:
        await work(send)
    except EdgeError as exc:
        await send({"error": exc.message})
    await response.write_eof()
    return response


@route.delete(PREFIX + "/api/delete", permission="models.manage")
async def delete(request: web.Request) -> web.Response:
    from edgellm.server.native_routes import remove

    body = parse(ModelBody, await read_json(request))
    await remove(request, resolve_name(request, body.which()))
    return web.json_response({})


@route.post(PREFIX + "/api/copy", permission="models.manage")
async def copy(request: web.Request) -> web.Response:
    raise InvalidRequest(
        "copy is not supported: a model's name is given when it enters the vault "
        "(edgellm models add FILE --name NAME)",
        param="destination",
    )
