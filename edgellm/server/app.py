"""The aiohttp application: who is calling, the policy its route declares, errors as
OpenAI's bodies; the routes themselves live in the dialect modules."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from edgellm.errors import (
    EdgeError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    TooManyRequests,
    Unauthorized,
)
from edgellm.server import (
    native_routes,
    ollama_models,
    ollama_routes,
    onnx_routes,
    openai_routes,
    responses_routes,
    text_routes,
    vault_routes,
)
from edgellm.server.context import (
    METRICS,
    PRINCIPAL,
    RECEIVED,
    REQUEST_ID,
    STATE,
    WHO,
    State,
    check_text,
)
from edgellm.server.metrics import Metrics
from edgellm.server.network import is_network
from edgellm.server.peer import connection_peer
from edgellm.server.routes import POLICIES, Audit, Policies, Policy
from edgellm.vault.access import Principal, resolve

log = logging.getLogger("edgellm.server")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(
    exc: EdgeError, request_id: str | None = None, ollama: bool = False
) -> web.Response:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if request_id:
        headers["X-Request-Id"] = request_id
    if exc.retryable is False:  # the openai SDK retries 409 and 5xx unless told not to
        headers["x-should-retry"] = "false"
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer realm=edgellm"
    # Ollama's clients read {"error": "…"}: the same message, in their dialect's shape
    body = {"error": exc.message} if ollama else exc.body()
    return web.json_response(body, status=exc.status, headers=headers)


error_response = _error_response  # as other modules answer errors (OpenAI's shape)


async def _record_denial(request: web.Request, exc: PermissionDenied | Unauthorized) -> None:
    try:
        await _state(request).record(
            request,
            action=exc.param if isinstance(exc, PermissionDenied) else "authenticate",
            decision="deny",
            status=exc.status,
            resource=request.match_info.get("name") or request.path,
        )
    except EdgeError:
        log.error("event=audit_failed decision=deny path=%s", request.path)


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer "):
        return None
    token = auth[7:].strip()
    if not token.isascii():  # aiohttp hands undecodable bytes on as surrogates
        raise InvalidRequest(
            "the Authorization header's bearer token is not ASCII; "
            "tokens are edg_ followed by URL-safe characters",
            param="Authorization",
        )
    return token


def _identify(request: web.Request) -> Principal:
    st = _state(request)
    if is_network(request.transport):  # no kernel to ask: a token or a certificate
        peer = request.transport.get_extra_info("peername") if request.transport else None
        request[PRINCIPAL] = {"address": str(peer[0]) if isinstance(peer, tuple) else None}
        principal = st.door.principal(request.transport, _bearer(request), st.access)
        request[WHO] = principal
        return principal
    creds = connection_peer(request.transport)
    request[PRINCIPAL] = creds
    principal = resolve(creds)
    request[WHO] = principal
    token = _bearer(request)
    if token is not None and st.access is not None:
        # on the socket an unknown token adds nothing (the openai SDK always sends one)
        principal.token = st.access.token_name(token)
    return principal


def route_policy(request: web.Request) -> Policy | None:
    """The policy the matched route declares (None: unmatched, aiohttp answers 404 or
    405). A matched route with no declaration is refused (fail closed), so a route
    added without a policy cannot be reached."""
    route = request.match_info.route
    if route.resource is None:
        return None
    policy = request.app[POLICIES].get(route)
    if policy is None:
        where = f"{request.method} {route.resource.canonical}"
        log.error("event=route_without_policy route=%r", where)
        raise PermissionDenied(f"{where} has no declared access policy; refused", param="policy")
    return policy


async def _serve(
    request: web.Request, handler: Handler, principal: Principal, policy: Policy | None, route: str
) -> web.StreamResponse:
    """The route's declared policy applied, then the route."""
    st = _state(request)
    if policy is not None and policy.permission is not None and st.access is not None:
        resource = request.match_info.get(policy.scope) if policy.scope else None
        st.access.require(principal, policy.permission, resource)
    if policy is not None and policy.audit is Audit.BEFORE:
        # recorded before it happens: no row, no action
        await st.record(
            request,
            action=policy.permission or f"{request.method} {route}",
            resource=request.match_info.get("name") or request.match_info.get("id") or route,
            decision="allow",
        )
    response = await handler(request)
    if policy is not None and policy.audit is Audit.PIPELINE and REQUEST_ID not in request:
        # declared as a model's use, answered without the pipeline: no rows were
        # written for it, so the answer is withheld (a bug of ours, never a 200)
        log.error("event=route_skipped_pipeline route=%s", route)
        if response.status < 400 and not response.prepared:
            raise InternalError(f"{request.path} answered outside the request pipeline")
    if REQUEST_ID in request and not response.prepared:  # every model use names its id
        response.headers.setdefault("X-Request-Id", request[REQUEST_ID])
    return response


@web.middleware
async def errors_and_identity(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics: Metrics = request.app[METRICS]
    route = (
        request.match_info.route.resource.canonical
        if request.match_info.route.resource
        else "unmatched"
    )
    t0 = request[RECEIVED] = time.monotonic()
    ollama = request.path == ollama_routes.PREFIX or request.path.startswith(
        ollama_routes.PREFIX + "/"
    )

    refused: list[EdgeError] = []

    def error_response(exc: EdgeError, request_id: str | None = None) -> web.Response:
        refused.append(exc)
        return _error_response(exc, request_id, ollama)

    try:
        principal = _identify(request)
        # a path or query that is not Unicode text (percent-encoded stray bytes or lone
        # surrogates) is refused here, before it meets SQLite, a file name or a log
        check_text(dict(request.match_info), "path")
        check_text({k: v for k, v in request.query.items()}, "query")
        policy = route_policy(request)
        st = _state(request)
        with st.limits.hold(principal):
            response = await _serve(request, handler, principal, policy, route)
    except Unauthorized as exc:
        await _record_denial(request, exc)
        response = error_response(exc)
    except TooManyRequests as exc:
        reason = "auth_failures" if exc.param == "Authorization" else exc.param or "limits"
        metrics.refused.labels(reason).inc()
        response = error_response(exc)
    except PermissionDenied as exc:
        await _record_denial(request, exc)
        response = error_response(exc, request.get(REQUEST_ID))
    except EdgeError as exc:
        response = error_response(exc, request.get(REQUEST_ID))
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[STATE].settings.max_body_bytes
        response = error_response(PayloadTooLarge(f"request body is larger than {limit} bytes"))
    except web.HTTPException as exc:
        if exc.status == 404:
            err: EdgeError = NotFound(f"no such endpoint: {request.method} {request.path}")
        elif exc.status == 405:
            err = MethodNotAllowed(f"method {request.method} is not allowed on {request.path}")
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
    if refused and 400 <= response.status < 500:
        log_refusal(request, response.status, refused[0])
    log.debug(
        "event=request method=%s path=%s status=%d seconds=%.3f uid=%s",
        request.method,
        request.path,
        response.status,
        time.monotonic() - t0,
        request.get(PRINCIPAL, {}).get("uid"),
    )
    return response


def log_refusal(request: web.Request, status: int, exc: EdgeError) -> None:
    """One line per refused request, so an operator sees what clients send that the
    daemon refuses: the route, the field and the reason (names and limits, never the
    request's content), and who sent it."""
    log.info(
        "event=refused status=%d method=%s path=%s param=%s uid=%s reason=%r",
        status,
        request.method,
        request.path[:200],
        exc.param or "-",
        request.get(PRINCIPAL, {}).get("uid"),
        exc.message[:300],
    )


def build_app(state: State) -> web.Application:
    app = web.Application(
        middlewares=[errors_and_identity], client_max_size=state.settings.max_body_bytes
    )
    app[STATE] = state
    app[METRICS] = Metrics(state.runtime, state.governor)
    app[POLICIES] = add_routes(app.router)
    return app


def add_routes(router: web.UrlDispatcher) -> Policies:
    """Every route of the API; the policy each one declares, by route."""
    policies: Policies = {}
    for table in ROUTE_TABLES:
        table.add_to(router, policies)
    return policies


ROUTE_TABLES = [
    native_routes.route,
    openai_routes.route,
    text_routes.route,
    vault_routes.route,
    onnx_routes.route,
    ollama_routes.route,
    ollama_models.route,
    responses_routes.route,
]


def _state(request: web.Request) -> State:
    return request.app[STATE]
