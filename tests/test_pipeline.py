"""The request pipeline (server/pipeline.py) in-process: a real app on a real Unix
socket, a real vault with its audit log, and the fake engine behind the runtime.

"No row, no service" is proven here, once, for every route that uses a model: each
goes through ``serve``. The extra route below is also what a new route looks like:
one decorated function, its policy declared where it is defined."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import fake_engine
import httpx
import pytest
from aiohttp import web
from fake_engine import FakeSource, fake_model

from edgellm.config import load_settings
from edgellm.errors import AuditUnavailable
from edgellm.runtime.manager import Runtime
from edgellm.runtime.types import Delta, GenerationRequest
from edgellm.server.app import build_app
from edgellm.server.context import State, read_json
from edgellm.server.pipeline import serve
from edgellm.server.routes import POLICIES, Audit, RouteTable
from edgellm.vault.open import open_vault

route = RouteTable()


@route.post("/test/echo", permission="models.use", audit=Audit.PIPELINE)
async def echo(request: web.Request) -> web.Response:
    """A dialect of one field: the prompt's words back, through the pipeline."""
    body = await read_json(request)
    job = GenerationRequest(model="fake", prompt=body["prompt"])
    async with serve(request, job, overlap_audit=body.get("overlap", False)) as events:
        await events.start()
        words = [e.text async for e in events if isinstance(e, Delta)]
    return web.json_response({"text": "".join(words), "id": job.id})


@route.post("/test/sloppy", permission="models.use", audit=Audit.PIPELINE)
async def sloppy(request: web.Request) -> web.Response:
    """Declared as a model's use, but answers without the pipeline (a bug)."""
    return web.json_response({"text": "unaudited"})


async def _undeclared(request: web.Request) -> web.Response:
    return web.json_response({"reached": True})


Call = Callable[..., Awaitable[httpx.Response]]


async def _serving(tmp_path: Path, scenario: Callable[[State, Call], Awaitable[None]]) -> None:
    settings = load_settings(
        overrides={"state_dir": tmp_path, "vault_key_file": tmp_path / "vault.key"}, environ={}
    )
    vault = open_vault(settings)
    runtime = Runtime(settings, FakeSource(fake_model("fake")))
    state = State(settings=settings, runtime=runtime, store=vault)
    app = build_app(state)
    route.add_to(app.router, app[POLICIES])
    app.router.add_get("/test/undeclared", _undeclared)  # no policy: must be refused
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "edgellm.sock")
    await web.UnixSite(runner, sock).start()
    transport = httpx.AsyncHTTPTransport(uds=sock)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:

            async def call(method: str, path: str, **kw: Any) -> httpx.Response:
                return await http.request(method, path, **kw)

            await scenario(state, call)
    finally:
        await runner.cleanup()
        await state.settle_records()
        runtime.close()


def _rows(state: State, request_id: str) -> list[dict[str, Any]]:
    return [r for r in state.vault.audit.rows() if r.get("request_id") == request_id]


def test_an_answer_comes_after_its_allow_row_and_before_nothing(tmp_path: Path) -> None:
    async def scenario(state: State, call: Call) -> None:
        for overlap in (False, True):
            r = await call("POST", "/test/echo", json={"prompt": "a b c", "overlap": overlap})
            assert r.status_code == 200 and r.json()["text"] == "a b c "
            await state.settle_records()
            rows = _rows(state, r.json()["id"])
            assert [x["decision"] for x in rows] == ["allow", "outcome"]
            assert rows[1]["status"] == 200 and rows[1]["finish_reason"] == "stop"
            assert rows[1]["completion_tokens"] == 3 and rows[0]["prompt_hmac"]

    asyncio.run(_serving(tmp_path, scenario))


@pytest.mark.parametrize("overlap", [False, True], ids=["outcome-awaited", "outcome-deferred"])
def test_no_row_no_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overlap: bool) -> None:
    async def scenario(state: State, call: Call) -> None:
        def refuse(**fields: Any) -> int:
            raise AuditUnavailable("the audit log cannot be written: disk full")

        monkeypatch.setattr(state.vault.audit, "append", refuse)
        fake_engine.hold()  # the run starts beside the row's commit: it must not finish first
        try:
            r = await call("POST", "/test/echo", json={"prompt": "secret", "overlap": overlap})
        finally:
            fake_engine.release()
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
        assert "disk full" in r.json()["error"]["message"] and "text" not in r.json()
        await _until(lambda: state.runtime.active_count() == 0)  # it ran, and was stopped
        monkeypatch.undo()
        again = await call("POST", "/test/echo", json={"prompt": "x", "overlap": overlap})
        assert again.status_code == 200  # and the daemon goes on serving

    asyncio.run(_serving(tmp_path, scenario))


async def _until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not in time")


def test_a_route_without_a_declared_policy_or_its_pipeline_is_refused(tmp_path: Path) -> None:
    async def scenario(state: State, call: Call) -> None:
        for method in ("GET", "HEAD"):
            r = await call(method, "/test/undeclared")
            assert r.status_code == 403, method
        r = await call("GET", "/test/undeclared")
        assert "has no declared access policy" in r.json()["error"]["message"]
        sloppy = await call("POST", "/test/sloppy", json={})
        assert sloppy.status_code == 500 and "unaudited" not in sloppy.text
        assert "outside the request pipeline" in sloppy.json()["error"]["message"]

    asyncio.run(_serving(tmp_path, scenario))
