"""The aiohttp application: error handling, peer credentials, and the native API."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from edgellm import __version__
from edgellm.errors import (
    Conflict,
    EdgeError,
    InternalError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
)
from edgellm.server import onnx_routes, openai_routes, vault_routes
from edgellm.server.context import (
    State,
    body_chunks,
    check_text,
    may_see,
    read_json,
    visible_record,
)
from edgellm.server.metrics import Metrics
from edgellm.server.peer import connection_peer
from edgellm.server.schemas import LoadRequest, parse
from edgellm.vault.access import Principal, resolve

log = logging.getLogger("edgellm.server")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: EdgeError, request_id: str | None = None) -> web.Response:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if request_id:
        headers["X-Request-Id"] = request_id
    if exc.retryable is False:  # the openai SDK retries 409 and 5xx unless told not to
        headers["x-should-retry"] = "false"
    return web.json_response(exc.body(), status=exc.status, headers=headers)


# The permission each route needs before any work is done: a permission, or one
# scoped to the resource a route parameter names. None: the handler checks per
# resource (which model, whose request) or the route is open to every peer.
ROUTE_PERMISSIONS: dict[tuple[str, str], str | None] = {
    ("POST", "/v1/chat/completions"): "models.use",
    ("POST", "/v1/completions"): "models.use",
    ("GET", "/v1/models"): "models.list",
    ("GET", "/health"): "health.read",
    ("GET", "/metrics"): "metrics.read",
    ("GET", "/api/ps"): "models.list",
    ("GET", "/api/models"): "models.list",
    ("GET", "/api/models/{name}"): "models.list",
    ("PUT", "/api/models/{name}"): "models.manage",
    ("DELETE", "/api/models/{name}"): "models.manage",
    ("POST", "/api/models/{name}/load"): "models.load",
    ("POST", "/api/models/{name}/unload"): "models.load",
    ("GET", "/api/requests"): None,
    ("DELETE", "/api/requests/{id}"): None,
    ("GET", "/api/governor"): "metrics.read",
    ("PUT", "/api/governor"): "governor.configure",
    **vault_routes.PERMISSIONS,
    **onnx_routes.PERMISSIONS,
}


# they record the model they use, and the outcome
GENERATION_ROUTES = {"/v1/chat/completions", "/v1/completions", *onnx_routes.USE_ROUTES}


async def _record_denial(request: web.Request, exc: PermissionDenied) -> None:
    try:
        await _state(request).record(
            request,
            action=exc.param or "",
            decision="deny",
            status=403,
            resource=request.match_info.get("name") or request.path,
        )
    except EdgeError:
        log.error("event=audit_failed decision=deny path=%s", request.path)


def _identify(request: web.Request) -> Principal:
    creds = connection_peer(request.transport)
    request["principal"] = creds
    principal = resolve(creds)
    request["who"] = principal
    auth = request.headers.get("Authorization", "")
    policy = _state(request).access
    if auth.startswith("Bearer ") and policy is not None:
        token = auth[7:].strip()
        if not token.isascii():  # aiohttp hands undecodable bytes on as surrogates
            raise InvalidRequest(
                "the Authorization header's bearer token is not ASCII; "
                "tokens are edg_ followed by URL-safe characters",
                param="Authorization",
            )
        # an unknown token adds nothing (the openai SDK always sends one)
        principal.token = policy.token_name(token)
    return principal


def route_permission(request: web.Request) -> str | tuple[str, str] | None:
    """The permission a matched route declares. HEAD is GET without the body, so it
    needs what GET needs; a matched route with no declaration is refused (fail closed),
    so a route added without a policy cannot be reached."""
    resource = request.match_info.route.resource
    if resource is None:
        return None  # unmatched: aiohttp answers 404 or 405
    method = "GET" if request.method == "HEAD" else request.method
    key = (method, resource.canonical)
    if key not in ROUTE_PERMISSIONS:
        log.error("event=route_without_policy method=%s route=%s", method, key[1])
        raise PermissionDenied(
            f"{method} {key[1]} has no declared access policy; refused", param="policy"
        )
    return ROUTE_PERMISSIONS[key]


@web.middleware
async def errors_and_identity(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics: Metrics = request.app["metrics"]
    route = (
        request.match_info.route.resource.canonical
        if request.match_info.route.resource
        else "unmatched"
    )
    t0 = time.monotonic()
    try:
        principal = _identify(request)
        # a path or query that is not Unicode text (percent-encoded stray bytes or lone
        # surrogates) is refused here, before it meets SQLite, a file name or a log
        check_text(dict(request.match_info), "path")
        check_text({k: v for k, v in request.query.items()}, "query")
        permission = route_permission(request)
        resource = None
        if isinstance(permission, tuple):
            permission, param = permission
            resource = request.match_info.get(param)
        st = _state(request)
        if permission is not None and st.access is not None:
            st.access.require(principal, permission, resource)
        changes = (
            request.method not in ("GET", "HEAD")
            and route not in GENERATION_ROUTES | vault_routes.RECORDED_BY_HANDLER
        )
        if route != "unmatched" and (changes or route in vault_routes.AUDITED_READS):
            # state changes are recorded before they happen: no row, no action
            await st.record(
                request,
                action=permission or f"{request.method} {route}",
                resource=request.match_info.get("name") or request.match_info.get("id") or route,
                decision="allow",
            )
        response = await handler(request)
    except PermissionDenied as exc:
        await _record_denial(request, exc)
        response = error_response(exc, request.get("request_id"))
    except EdgeError as exc:
        response = error_response(exc, request.get("request_id"))
    except web.HTTPRequestEntityTooLarge:
        limit = request.app["state"].settings.max_body_bytes
        response = error_response(PayloadTooLarge(f"request body is larger than {limit} bytes"))
    except web.HTTPException as exc:
        if exc.status == 404:
            err: EdgeError = NotFound(f"no such endpoint: {request.method} {request.path}")
        elif exc.status == 405:
            err = EdgeError(f"method {request.method} is not allowed on {request.path}")
            err.status, err.type, err.code = 405, "invalid_request_error", "method_not_allowed"
        else:
            err = EdgeError(exc.reason or str(exc))
            err.status, err.type = exc.status, "invalid_request_error"
        response = error_response(err)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("event=internal_error path=%s", request.path)
        response = error_response(
            InternalError(
                f"internal error in edgellm while serving {request.path}; see the daemon's log"
            )
        )
    metrics.requests.labels(route, str(response.status)).inc()
    log.debug(
        "event=request method=%s path=%s status=%d seconds=%.3f uid=%s",
        request.method,
        request.path,
        response.status,
        time.monotonic() - t0,
        request.get("principal", {}).get("uid"),
    )
    return response


def _state(request: web.Request) -> State:
    return request.app["state"]


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


async def ps(request: web.Request) -> web.Response:
    names = {r.name for r in visible_models(request)}
    return web.json_response(
        {"models": [m for m in _state(request).runtime.loaded() if m["name"] in names]}
    )


def model_view(st: State, record: Any) -> dict[str, Any]:
    return {
        **record.as_dict(),
        "state": st.runtime.model_state(record.name),
        "default": record.name == st.settings.default_model,
    }


def visible_models(request: web.Request) -> list[Any]:
    """The models this caller may use (all of them for operators and admins)."""
    st = _state(request)
    return [r for r in st.store.list() if may_see(request, r.name)]


async def list_models(request: web.Request) -> web.Response:
    st = _state(request)
    return web.json_response({"models": [model_view(st, r) for r in visible_models(request)]})


async def show_model(request: web.Request) -> web.Response:
    st = _state(request)
    return web.json_response(model_view(st, visible_record(request, request.match_info["name"])))


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
    loaded = next(m for m in st.runtime.loaded() if m["name"] == name)
    return web.json_response({"name": name, "state": "loaded", **loaded})


async def unload_model(request: web.Request) -> web.Response:
    st = _state(request)
    name = request.match_info["name"]
    st.store.get(name)
    busy = [
        m for m in st.runtime.loaded() if m["name"] == name and (m["slots_busy"] or m["queued"])
    ]
    if busy and request.query.get("force") not in ("1", "true"):
        raise Conflict(f"model {name} is serving requests; cancel them first or add ?force=true")
    done = await asyncio.get_running_loop().run_in_executor(None, st.runtime.unload, name)
    return web.json_response({"name": name, "unloaded": done})


async def import_model(request: web.Request) -> web.Response:
    """PUT /api/models/{name}: the GGUF file itself is the body, streamed to the store."""
    st = _state(request)
    name = request.match_info["name"]
    chunks = body_chunks(request)
    expected = request.headers.get("X-Content-Sha256")
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


async def remove_model(request: web.Request) -> web.Response:
    st = _state(request)
    name = request.match_info["name"]
    st.store.get(name)
    if st.runtime.model_state(name) != "available":
        busy = [m for m in st.runtime.loaded() if m["name"] == name and m["slots_busy"]]
        if busy:
            raise Conflict(f"model {name} is serving requests; cancel them first")
        await asyncio.get_running_loop().run_in_executor(None, st.runtime.unload, name)
    st.store.remove(name)
    return web.json_response({"name": name, "removed": True})


def _sees_all_requests(request: web.Request, permission: str) -> bool:
    st, who = _state(request), request.get("who")
    return st.access is None or who is None or st.access.allowed(who, permission)


async def list_requests(request: web.Request) -> web.Response:
    rows = _state(request).runtime.requests()
    if not _sees_all_requests(request, "requests.read_all"):  # a client sees its own
        uid = request["principal"].get("uid")
        rows = [r for r in rows if r.get("uid") == uid]
    return web.json_response({"requests": rows})


async def cancel_request(request: web.Request) -> web.Response:
    request_id = request.match_info["id"]
    st = _state(request)
    owner = next((r.get("uid") for r in st.runtime.requests() if r["id"] == request_id), None)
    mine = owner is not None and owner == request["principal"].get("uid")
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


async def governor_status(request: web.Request) -> web.Response:
    return web.json_response(_governor(request).snapshot())


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


async def metrics(request: web.Request) -> web.Response:
    body = request.app["metrics"].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


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


def build_app(state: State) -> web.Application:
    app = web.Application(
        middlewares=[errors_and_identity], client_max_size=state.settings.max_body_bytes
    )
    app["state"] = state
    app["metrics"] = Metrics(state.runtime, state.governor)
    add_routes(app.router)
    return app


def add_routes(r: web.UrlDispatcher) -> None:
    """Every route of the API (each one's permission is in ROUTE_PERMISSIONS)."""
    r.add_post("/v1/chat/completions", openai_routes.chat_completions)
    r.add_post("/v1/completions", openai_routes.completions)
    r.add_get("/v1/models", openai_models)
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    r.add_get("/api/ps", ps)
    r.add_get("/api/models", list_models)
    r.add_get("/api/models/{name}", show_model)
    r.add_put("/api/models/{name}", import_model)
    r.add_delete("/api/models/{name}", remove_model)
    r.add_post("/api/models/{name}/load", load_model)
    r.add_post("/api/models/{name}/unload", unload_model)
    r.add_get("/api/requests", list_requests)
    r.add_delete("/api/requests/{id}", cancel_request)
    r.add_get("/api/governor", governor_status)
    r.add_put("/api/governor", governor_configure)
    vault_routes.add_routes(r)
    onnx_routes.add_routes(r)
