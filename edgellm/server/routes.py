"""Routes declare their policy where they are defined.

    route = RouteTable()

    @route.post("/v1/embeddings", permission="models.use", audit=Audit.PIPELINE)
    async def embeddings(request: web.Request) -> web.Response: ...

The middleware (server/app.py) reads the matched route's ``Policy`` before the
handler runs: the permission (scoped to a route parameter where ``scope`` names one),
then the audit row where the treatment asks for one before the handler. A matched
route without a policy is refused (fail closed); a test walks the app's routes too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Audit(Enum):
    NONE = "none"  # a read: no row
    BEFORE = "before"  # a row before the handler runs: no row, no action
    PIPELINE = "pipeline"  # a model's use: the pipeline writes the allow and outcome rows
    HANDLER = "handler"  # the handler writes its own row (unlock: no audit key before it)


@dataclass(frozen=True)
class Policy:
    """``permission`` None: open to every peer, and the handler shows each caller only
    what is its own (its requests, its grants, the objects it may read)."""

    permission: str | None
    scope: str | None = None  # the route parameter naming the resource it is scoped to
    audit: Audit = Audit.NONE


Policies = dict[AbstractRoute, Policy]
POLICIES = web.AppKey("policies", dict)  # AbstractRoute -> Policy, for the middleware


@dataclass(frozen=True)
class _Entry:
    method: str
    path: str
    handler: Handler
    policy: Policy


Declare = Callable[[Handler], Handler]


def _verb(method: str, default: Audit) -> Callable[..., Declare]:
    def declare(
        self: RouteTable,
        path: str,
        *,
        permission: str | None,
        scope: str | None = None,
        audit: Audit = default,
    ) -> Declare:
        return self.route(method, path, permission=permission, scope=scope, audit=audit)

    declare.__name__ = method.lower()
    return declare


class RouteTable:
    """A module's routes with their policies, added to an app by ``add_to``."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        permission: str | None,
        scope: str | None = None,
        audit: Audit,
    ) -> Declare:
        def declare(handler: Handler) -> Handler:
            self.entries.append(_Entry(method, path, handler, Policy(permission, scope, audit)))
            return handler

        return declare

    get = _verb("GET", Audit.NONE)
    post = _verb("POST", Audit.BEFORE)  # a change is recorded before it happens
    put = _verb("PUT", Audit.BEFORE)
    delete = _verb("DELETE", Audit.BEFORE)

    def add_to(self, router: web.UrlDispatcher, policies: Policies) -> None:
        """Add every route (a GET also answers HEAD, under the same policy)."""
        resources: dict[str, web.Resource] = {}
        for e in self.entries:
            resource = resources.get(e.path) or router.add_resource(e.path)
            resources[e.path] = resource
            policies[resource.add_route(e.method, e.handler)] = e.policy
            if e.method == "GET":
                policies[resource.add_route("HEAD", e.handler)] = e.policy
