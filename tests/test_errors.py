"""One error taxonomy: every class edgellm raises lives in errors.py under a code of
its own, and a response turns back into that class, with its Retry-After."""

from __future__ import annotations

import importlib
import pkgutil

import httpx
import pytest

import edgellm
from edgellm import errors
from edgellm.client import _raise_for
from edgellm.errors import EdgeError, QueueFull, VaultLocked, from_body


def _every_error_class() -> list[type[EdgeError]]:
    for info in pkgutil.walk_packages(edgellm.__path__, "edgellm."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)  # a class defined anywhere is seen
    found, stack = [], [EdgeError]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


def test_every_error_class_lives_in_the_taxonomy_under_its_own_code() -> None:
    classes = _every_error_class()
    assert len(classes) > 30
    strays = [c.__qualname__ for c in classes if c.__module__ != "edgellm.errors"]
    assert strays == []
    codes = [c.code for c in classes if c is not EdgeError]
    assert len(codes) == len(set(codes))


def test_a_class_without_its_own_code_is_refused_at_import() -> None:
    with pytest.raises(TypeError, match="must declare its own error code"):
        type("Sloppy", (errors.NotFound,), {})
    with pytest.raises(TypeError, match="share the code 'queue_full'"):
        type("Twin", (errors.Unavailable,), {"code": "queue_full"})


@pytest.mark.parametrize(
    "cls", [c for c in _every_error_class() if c is not EdgeError], ids=lambda c: c.__name__
)
def test_every_class_comes_back_from_its_response(cls: type[EdgeError]) -> None:
    sent = cls.__new__(cls)
    EdgeError.__init__(sent, "what went wrong", param="model", retry_after=7)
    headers = {"Retry-After": "7"}
    response = httpx.Response(cls.status, json=sent.body(), headers=headers)
    with pytest.raises(cls) as got:
        _raise_for(response)
    assert type(got.value) is cls
    assert (got.value.status, got.value.code, got.value.message, got.value.param) == (
        cls.status,
        cls.code,
        "what went wrong",
        "model",
    )
    assert got.value.retry_after == 7


def test_an_error_inside_a_stream_keeps_its_class_and_status() -> None:
    got = from_body(None, VaultLocked().body())
    assert type(got) is VaultLocked and got.status == 503


def test_an_unknown_code_or_a_bare_body_is_still_an_error() -> None:
    got = from_body(418, {"error": {"message": "teapot", "code": "from_the_future"}})
    assert type(got) is EdgeError and got.status == 418 and got.message == "teapot"
    bare = from_body(502, "<html>bad gateway</html>")
    assert type(bare) is EdgeError and bare.message == "HTTP 502"
    odd = httpx.Response(503, json=QueueFull("full").body(), headers={"Retry-After": "soon"})
    with pytest.raises(QueueFull) as full:
        _raise_for(odd)
    assert full.value.retry_after is None  # an HTTP date or junk: no figure invented
