"""The native API: health, models (list, show, import, load, unload, remove), the
requests in flight, the governor, /metrics, and OpenAI's model list."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from edgellm import __version__
from edgellm.errors import Conflict, EdgeError, InvalidRequest, NotFound
from edgellm.progress import counted
from edgellm.server.context import (
    METRICS,
    PRINCIPAL,
    STATE,
    WHO,
    State,
    body_chunks,
    may_see,
    model_view,
    read_json,
    visible_record,
    who_of,
)
from edgellm.server.routes import RouteTable
from edgellm.server.schemas import LoadRequest, parse

route = RouteTable()


def _state(request: web.Request) -> State:
    return request.app[STATE]


@route.get("/health", permission="health.read")
async def health(request: web.Request) -> web.Response:
    st = _state(request)
    models = {r.name: st.runtime.model_state(r.name) for r in visible_models(request)}
    for name in st.load_failures:
        if name in models and models[name] == "available":
            models[name] = "failed"
    if st.draining:
        status = "degraded"
    elif "loading" in models.values():
        status = "loading"
    elif "failed" in models.values():
        status = "degraded"
    else:
        status = "ready"
    return web.json_response(
        {
            "status": status,
            "version": __version__,
            "draining": st.draining,
            "uptime_seconds": round(time.monotonic() - st.started, 1),
            "models": models,
            "queue_depth": st.runtime.queue_depth(),
            "active_requests": st.runtime.active_count(),
        }
    )


@route.get("/api/ps", permission="models.list")
async def ps(request: web.Request) -> web.Response:
    names = {r.name for r in visible_models(request)}
    return web.json_response(
        {"models": [m.as_dict() for m in _state(request).runtime.loaded() if m.name in names]}
    )


def visible_models(request: web.Request) -> list[Any]:
    """The models this caller may use (all of them for operators and admins)."""
    st = _state(request)
    return [r for r in st.store.list() if may_see(request, r.name)]


@route.get("/api/models", permission="models.list")
async def list_models(request: web.Request) -> web.Response:
    st = _state(request)
    return web.json_response({"models": [model_view(st, r) for r in visible_models(request)]})


@route.get("/api/models/{name}", permission="models.list")
async def show_model(request: web.Request) -> web.Response:
    st = _state(request)
    return web.json_response(model_view(st, visible_record(request, request.match_info["name"])))


@route.post("/api/models/{name}/load", permission="models.load")
async def load_model(request: web.Request) -> web.Response:
    st = _state(request)
    st.check_accepting()
    name = request.match_info["name"]
    body = parse(LoadRequest, await read_json(request)) if request.can_read_body else LoadRequest()
    st.store.get(name)
    try:
        await asyncio.get_running_loop().run_in_executor(
            None, st.runtime.load, name, body.keep_alive
        )
    except EdgeError as exc:
        st.load_failures[name] = exc.message
        raise
    st.load_failures.pop(name, None)
    status = st.runtime.status(name)
    return web.json_response(
        {"name": name, "state": "loaded", **(status.as_dict() if status else {})}
    )


@route.post("/api/models/{name}/unload", permission="models.load")
async def unload_model(request: web.Request) -> web.Response:
    st = _state(request)
    name = request.match_info["name"]
    st.store.get(name)
    status = st.runtime.status(name)
    busy = status is not None and bool(status.slots_busy or status.queued)
    if busy and request.query.get("force") not in ("1", "true"):
        raise Conflict(f"model {name} is serving requests; cancel them first or add ?force=true")
    done = await asyncio.get_running_loop().run_in_executor(None, st.runtime.unload, name)
    return web.json_response({"name": name, "unloaded": done})


@route.put("/api/models/{name}", permission="models.manage")
async def import_model(request: web.Request) -> web.Response:
    """PUT /api/models/{name}: the GGUF file itself is the body, streamed to the store."""
    st = _state(request)
    name = request.match_info["name"]
    expected = request.headers.get("X-Content-Sha256")
    with st.jobs.run("import", name, who_of(request)) as job:
        chunks = counted(body_chunks(request), job.report, "receive", request.content_length)
        record = await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: st.store.add_stream(
                chunks,
                name,
                expected_sha256=expected,
                replace=request.query.get("replace") == "1",
                info={"source": request.headers.get("X-Model-Source", "upload")},
            ),
        )
    return web.json_response(model_view(st, record), status=201)


@route.get("/api/jobs", permission="metrics.read")
async def list_jobs(request: web.Request) -> web.Response:
    """Long work in progress (imports, pulls, data uploads, key rotations), each with
    its phase and how far it is."""
    return web.json_response({"jobs": _state(request).jobs.list()})


@route.delete("/api/models/{name}", permission="models.manage")
async def remove_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await remove(request, name)
    return web.json_response({"name": name, "removed": True})


async def remove(request: web.Request, name: str) -> None:
    """Unload (unless it is serving) and remove a model from the vault."""
    st = _state(request)
    st.store.get(name)
    if st.runtime.model_state(name) != "available":
        status = st.runtime.status(name)
        if status is not None and status.slots_busy:
            raise Conflict(f"model {name} is serving requests; cancel them first")
        await asyncio.get_running_loop().run_in_executor(None, st.runtime.unload, name)
    st.store.remove(name)


def _sees_all_requests(request: web.Request, permission: str) -> bool:
    st, who = _state(request), request.get(WHO)
    return st.access is None or who is None or st.access.allowed(who, permission)


@route.get("/api/requests", permission=None)  # each caller sees its own
async def list_requests(request: web.Request) -> web.Response:
    rows = _state(request).runtime.requests()
    if not _sees_all_requests(request, "requests.read_all"):  # a client sees its own
        uid = request[PRINCIPAL].get("uid")
        rows = [r for r in rows if r.get("uid") == uid]
    return web.json_response({"requests": rows})


@route.delete("/api/requests/{id}", permission=None)  # its own, or requests.cancel_any
async def cancel_request(request: web.Request) -> web.Response:
    request_id = request.match_info["id"]
    st = _state(request)
    owner = next((r.get("uid") for r in st.runtime.requests() if r["id"] == request_id), None)
    mine = owner is not None and owner == request[PRINCIPAL].get("uid")
    # another caller's request is answered as unknown: ids cannot be probed
    hidden = (
        owner is not None and not mine and not _sees_all_requests(request, "requests.cancel_any")
    )
    if hidden or not st.runtime.cancel(request_id):
        raise NotFound(f"no request {request_id!r} is in flight", param="id")
    return web.json_response({"id": request_id, "cancelled": True})


def _governor(request: web.Request) -> Any:
    gov = _state(request).governor
    if gov is None:
        raise NotFound("the governor is off (governor.enabled = false)")
    return gov


@route.get("/api/governor", permission="metrics.read")
async def governor_status(request: web.Request) -> web.Response:
    return web.json_response(_governor(request).snapshot())


@route.put("/api/governor", permission="governor.configure")
async def governor_configure(request: web.Request) -> web.Response:
    """``{"pin": LEVEL}``, ``{"unpin": true}``, ``{"thresholds": {SIGNAL: {…}}}``."""
    gov, body = _governor(request), await read_json(request)
    if not isinstance(body, dict) or not {"pin", "unpin", "thresholds"} & set(body):
        raise InvalidRequest(
            'send {"pin": LEVEL}, {"unpin": true} or {"thresholds": {SIGNAL: {"elevated": …}}}'
        )
    gov.configure(
        pin=body.get("pin"), unpin=bool(body.get("unpin")), thresholds=body.get("thresholds")
    )
    await asyncio.get_running_loop().run_in_executor(None, gov.poll)  # in force now
    return web.json_response(gov.snapshot())


@route.get("/metrics", permission="metrics.read")
async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


@route.get("/v1/models", permission="models.list")
async def openai_models(request: web.Request) -> web.Response:
    data = [
        {"id": r.name, "object": "model", "owned_by": "edgellm", "created": _epoch(r.added)}
        for r in visible_models(request)
    ]
    return web.json_response({"object": "list", "data": data})


def _epoch(stamp: str) -> int:
    try:
        return int(time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone)
    except ValueError:
        return 0
