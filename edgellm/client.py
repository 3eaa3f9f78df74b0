"""The Python client of the edgellm daemon: on its Unix socket, or at a URL with a
token (``Client(url="https://device:8443", token="edg_…", ca_file=…)``, or
``EDGELLM_URL`` / ``EDGELLM_TOKEN``).

    from edgellm.client import Client
    with Client() as c:
        for piece in c.chat([{"role": "user", "content": "Hi"}], stream=True):
            print(piece, end="")

Errors come back as the same EdgeError classes the daemon raised (status, message);
a daemon that is not there raises DaemonUnavailable with what to do about it.
"""

from __future__ import annotations

import errno
import json
import os
import ssl
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

from edgellm.errors import (
    DaemonUnavailable,
    EdgeError,
    InvalidRequest,
    from_body,
    parse_retry_after,
)
from edgellm.progress import Report, counted, ignore

BASE_URL = "http://edgellm"


# where `edgellm service install` serves (the socket unit's ListenStream=)
SERVICE_SOCKET = Path("/run/edgellm/edgellm.sock")


def resolve_socket(socket: str | os.PathLike[str] | None = None) -> Path:
    """The socket given, else the settings' one; where that has no daemon but the
    system service's socket exists, the service's (so a user in its group needs no
    setting once it is installed)."""
    given = socket or os.environ.get("EDGELLM_SOCKET")
    if given:
        if "://" in str(given):  # a URL where a path belongs: say so, not "no daemon"
            raise InvalidRequest(
                "the socket (--socket or EDGELLM_SOCKET) is the path of a Unix socket, not a URL "
                f"({str(given)!r}); give a daemon on the network with --url or EDGELLM_URL"
            )
        return Path(given)
    from edgellm.config import load_settings

    own = load_settings().socket
    return SERVICE_SOCKET if not own.exists() and SERVICE_SOCKET.exists() else own


def _unavailable(sock: Path, exc: Exception, url: str | None = None) -> EdgeError:
    if url is not None:
        return DaemonUnavailable(
            f"cannot reach the edgellm daemon at {url}: {exc or type(exc).__name__} "
            "(is it listening there, with TLS if the URL is https?)"
        )
    cause: Any = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    code = getattr(cause, "errno", None)
    if code == errno.EACCES:
        return DaemonUnavailable(
            f"permission denied on {sock}: your user may not use this appliance; "
            "ask its operator to grant you access"
        )
    if not sock.exists() or code in (errno.ENOENT, errno.ECONNREFUSED):
        return DaemonUnavailable(
            f"no edgellm daemon is running on {sock}; start one with `edgellm serve` "
            "(or point --socket / EDGELLM_SOCKET at a running one)"
        )
    return DaemonUnavailable(f"cannot reach the edgellm daemon on {sock}: {exc}")


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text or response.reason_phrase}}
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    raise from_body(response.status_code, body, retry_after)


def _sse_payloads(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return
        yield json.loads(data)


def _gen_body(
    kind: str, content: Any, model: str | None, stream: bool, params: dict[str, Any]
) -> dict[str, Any]:
    body: dict[str, Any] = {"messages" if kind == "chat" else "prompt": content, "stream": stream}
    if model:
        body["model"] = model
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update({k: v for k, v in params.items() if v is not None})
    return body


class Client:
    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        timeout: float | None = 600.0,
        *,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
    ) -> None:
        """The socket, unless a URL is given (or, with no socket given, EDGELLM_URL);
        ``token`` (or EDGELLM_TOKEN) is sent as the bearer token; ``ca_file`` verifies
        a TLS daemon whose certificate no system CA signed; ``cert_file`` and
        ``key_file`` are a client certificate for a daemon that asks for one (mutual
        TLS). Each has its EDGELLM_* variable."""
        url = url or (None if socket else os.environ.get("EDGELLM_URL")) or None
        token = token or os.environ.get("EDGELLM_TOKEN") or None
        ca_file = ca_file or os.environ.get("EDGELLM_CA_FILE") or None
        cert_file = cert_file or os.environ.get("EDGELLM_CERT_FILE") or None
        key_file = key_file or os.environ.get("EDGELLM_CERT_KEY_FILE") or None
        self._made: dict[str, Any] = {
            "socket": socket,
            "url": url,
            "token": token,
            "ca_file": ca_file,
            "cert_file": cert_file,
            "key_file": key_file,
        }
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeouts = httpx.Timeout(timeout, connect=5.0)
        self.url = url.rstrip("/") if url else None
        if self.url is not None:
            self.socket = Path(self.url)  # named in errors, as the socket would be
            verify: Any = str(ca_file) if ca_file else True
            if cert_file:
                verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
                verify.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
            self._http = httpx.Client(
                base_url=self.url, headers=headers, timeout=timeouts, verify=verify
            )
            return
        self.socket = resolve_socket(socket)
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url=BASE_URL,
            headers=headers,
            timeout=timeouts,
        )

    def like(self, timeout: float | None) -> Client:
        """Another client to the same daemon, as this one reaches it, with ``timeout``."""
        return Client(timeout=timeout, **self._made)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kw)
        except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            raise _unavailable(self.socket, exc, self.url) from None
        _raise_for(response)
        return response

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self.request(method, path, **kw).json()

    # --- the native API ------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def ps(self) -> list[dict[str, Any]]:
        return self._json("GET", "/api/ps")["models"]

    def models(self) -> list[dict[str, Any]]:
        return self._json("GET", "/api/models")["models"]

    def model(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/api/models/{name}")

    def load(self, name: str, keep_alive: float | str | None = None) -> dict[str, Any]:
        body = {} if keep_alive is None else {"keep_alive": keep_alive}
        return self._json("POST", f"/api/models/{name}/load", json=body)

    def unload(self, name: str, force: bool = False) -> dict[str, Any]:
        return self._json(
            "POST", f"/api/models/{name}/unload", params={"force": "true"} if force else None
        )

    def import_model(
        self,
        name: str,
        path: str | os.PathLike[str],
        sha256: str | None = None,
        source: str | None = None,
        report: Report = ignore,
    ) -> dict[str, Any]:
        """Send a model to the vault: a GGUF file, an .onnx file, an ONNX bundle, or a
        directory holding model.onnx (and tokenizer.json, edgellm.json), bundled here.
        ``report`` hears the bytes sent (the daemon lists the import under /api/jobs)."""
        headers = {"Content-Type": "application/octet-stream"}
        if sha256:
            headers["X-Content-Sha256"] = sha256
        if source:
            headers["X-Model-Source"] = source
        if Path(path).is_dir():
            from edgellm.runtime.onnx import bundle

            packed = memoryview(bundle.pack(bundle.from_directory(Path(path))))
            # in pieces: handed one large bytes, httpcore copies the rest after each send
            pieces = (bytes(packed[i : i + (1 << 20)]) for i in range(0, len(packed), 1 << 20))
            headers["Content-Length"] = str(len(packed))
            return self._json(
                "PUT",
                f"/api/models/{name}",
                content=counted(pieces, report, "upload", len(packed)),
                headers=headers,
            )
        return self._upload(f"/api/models/{name}", path, report, headers=headers)

    def _upload(
        self, url: str, path: str | os.PathLike[str], report: Report, **kw: Any
    ) -> dict[str, Any]:
        """A file as a request body, in pieces, with its length (so the daemon knows how
        far along it is)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            kw["headers"] = {**kw.get("headers", {}), "Content-Length": str(size)}
            return self._json(
                "PUT", url, content=counted(_file_chunks(f), report, "upload", size), **kw
            )

    def quantize(
        self, name: str, target: str | None = None, exclude: list[str] | None = None
    ) -> dict[str, Any]:
        """Dynamic INT8 of an ONNX model, stored as ``target`` (default NAME-int8)."""
        body = {k: v for k, v in (("target", target), ("exclude", exclude)) if v}
        return self._json("POST", f"/api/models/{name}/quantize", json=body)

    def embed(self, texts: str | list[str], model: str | None = None) -> list[list[float]]:
        """One embedding per text, from an ONNX embedding model."""
        return [
            d["embedding"]
            for d in self._json("POST", "/v1/embeddings", json=_embed_body(texts, model))["data"]
        ]

    def onnx_model(self, name: str) -> dict[str, Any]:
        """An ONNX model's inputs and outputs (names, dtypes, shapes)."""
        return self._json("GET", f"/api/onnx/{name}")

    def infer(
        self, name: str, inputs: dict[str, Any], outputs: list[str] | None = None
    ) -> dict[str, Any]:
        """Run an ONNX model on named arrays (numpy); its outputs as numpy arrays."""
        from edgellm.runtime.onnx import tensors

        body: dict[str, Any] = {
            "inputs": {k: tensors.encode(_array(v), True) for k, v in inputs.items()},
            "encoding": "npy",
        }
        if outputs:
            body["outputs"] = outputs
        got = self._json("POST", f"/api/onnx/{name}/infer", json=body)["outputs"]
        return {k: tensors.decode(k, v, "") for k, v in got.items()}

    def remove_model(self, name: str) -> dict[str, Any]:
        return self._json("DELETE", f"/api/models/{name}")

    def requests(self) -> list[dict[str, Any]]:
        return self._json("GET", "/api/requests")["requests"]

    def cancel(self, request_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/api/requests/{request_id}")

    def metrics(self) -> str:
        return self.request("GET", "/metrics").text

    def whoami(self) -> dict[str, Any]:
        return self._json("GET", "/api/access/whoami")

    def governor(self) -> dict[str, Any]:
        return self._json("GET", "/api/governor")

    def configure_governor(self, **change: Any) -> dict[str, Any]:
        """``pin="throttled"``, ``unpin=True`` or ``thresholds={SIGNAL: {…}}``."""
        return self._json("PUT", "/api/governor", json=change)

    def grants(self) -> list[dict[str, str]]:
        return self._json("GET", "/api/access/grants")["grants"]

    def grant(self, subject: str, role: str, scope: str = "*") -> dict[str, str]:
        """``scope``: for client grants a model, for data grants a name or prefix."""
        return self._json(
            "POST", "/api/access/grants", json={"subject": subject, "role": role, "scope": scope}
        )

    def revoke(self, subject: str, role: str, scope: str = "*") -> dict[str, Any]:
        return self._json(
            "DELETE", "/api/access/grants", json={"subject": subject, "role": role, "scope": scope}
        )

    def audit(self, **filters: Any) -> list[dict[str, Any]]:
        """Audit rows; filters: since, until, user, action, decision, model, limit, order."""
        params = {k: str(v) for k, v in filters.items() if v is not None}
        return self._json("GET", "/api/audit", params=params)["rows"]

    def audit_verify(self) -> dict[str, Any]:
        return self._json("GET", "/api/audit/verify")

    def audit_prune(
        self, older_than_days: int | None = None, keep_rows: int | None = None
    ) -> dict[str, Any]:
        body = {
            k: v
            for k, v in (("older_than_days", older_than_days), ("keep_rows", keep_rows))
            if v is not None
        }
        return self._json("POST", "/api/audit/prune", json=body)

    def create_token(
        self, name: str, expires_in: float | str | None = None, token: str | None = None
    ) -> dict[str, str]:
        body: dict[str, Any] = {"name": name}
        if expires_in is not None:
            body["expires_in"] = expires_in
        if token is not None:
            body["token"] = token
        return self._json("POST", "/api/access/tokens", json=body)

    def tokens(self) -> list[dict[str, Any]]:
        return self._json("GET", "/api/access/tokens")["tokens"]

    def revoke_token(self, name: str) -> dict[str, Any]:
        return self._json("DELETE", f"/api/access/tokens/{name}")

    # --- the vault -------------------------------------------------------------------
    def vault_status(self) -> dict[str, Any]:
        return self._json("GET", "/api/vault")

    def vault_unlock(
        self, *, key: bytes | None = None, passphrase: str | None = None
    ) -> dict[str, Any]:
        """With neither, the daemon tries its own key file or credential again."""
        body: dict[str, Any] = {}
        if key is not None:
            body["key"] = key.hex()
        if passphrase is not None:
            body["passphrase"] = passphrase
        return self._json("POST", "/api/vault/unlock", json=body)

    def vault_lock(self) -> dict[str, Any]:
        return self._json("POST", "/api/vault/lock")

    def vault_rotate(self, *, passphrase: str | None = None) -> dict[str, Any]:
        """A new random key in the daemon's key file, or the given passphrase."""
        body = {} if passphrase is None else {"passphrase": passphrase}
        return self._json("POST", "/api/vault/rotate", json=body)

    def vault_verify(self, model: str | None = None) -> dict[str, Any]:
        """Authenticate the vault's objects (or one model's): ``{"ok", "bad": […]}``."""
        return self._json("GET", "/api/vault/verify", params={"model": model} if model else None)

    # --- data objects ------------------------------------------------------------------
    def data(self, prefix: str = "") -> list[dict[str, Any]]:
        return self._json("GET", "/api/data", params={"prefix": prefix})["data"]

    def data_put(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        replace: bool = True,
        report: Report = ignore,
    ) -> dict[str, Any]:
        return self._upload(
            f"/api/data/{name}",
            path,
            report,
            params={"replace": "1" if replace else "0"},
            headers={
                "Content-Type": "application/octet-stream",
                "X-Data-Source": f"file:{Path(path).name}",
            },
        )

    def jobs(self) -> list[dict[str, Any]]:
        """Long work the daemon is doing (imports, pulls, uploads, key rotations)."""
        return self._json("GET", "/api/jobs")["jobs"]

    def data_get(self, name: str) -> Iterator[bytes]:
        """The object's bytes, in pieces (the daemon authenticated all of them first)."""
        try:
            with self._http.stream("GET", f"/api/data/{name}") as response:
                if not response.is_success:
                    response.read()
                    _raise_for(response)
                yield from response.iter_bytes(1 << 20)
        except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            raise _unavailable(self.socket, exc, self.url) from None

    def data_remove(self, name: str) -> dict[str, Any]:
        return self._json("DELETE", f"/api/data/{name}")

    # --- generation ------------------------------------------------------------------
    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str | None = None,
        stream: bool = False,
        **params: Any,
    ) -> Any:
        """The OpenAI response as a dict, or with ``stream=True`` a ChatStream of text."""
        body = _gen_body("chat", messages, model, stream, params)
        return (
            self._stream("/v1/chat/completions", body)
            if stream
            else self._json("POST", "/v1/chat/completions", json=body)
        )

    def complete(
        self, prompt: str, *, model: str | None = None, stream: bool = False, **params: Any
    ) -> Any:
        body = _gen_body("completion", prompt, model, stream, params)
        return (
            self._stream("/v1/completions", body)
            if stream
            else self._json("POST", "/v1/completions", json=body)
        )

    def _stream(self, path: str, body: dict[str, Any]) -> ChatStream:
        return ChatStream(self, path, body)


class ChatStream:
    """Iterates over generated text; afterwards holds the finish reason, usage and id.
    Closing it early closes the connection, which makes the daemon cancel the generation."""

    def __init__(self, client: Client, path: str, body: dict[str, Any]) -> None:
        self._client, self._path, self._body = client, path, body
        self._response: httpx.Response | None = None
        self.id: str | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.timings: dict[str, float] | None = None  # the daemon's, as llama-server's

    def _take(self, payload: dict[str, Any]) -> str | None:
        if "error" in payload:
            raise from_body(None, payload)  # its class says its status
        self.id = payload.get("id", self.id)
        if payload.get("usage"):
            self.usage = payload["usage"]
        if payload.get("timings"):
            self.timings = payload["timings"]
        for choice in payload.get("choices", []):
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            text = (
                choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
            )
            if text:
                return text
        return None

    def __iter__(self) -> Iterator[str]:
        c = self._client
        try:
            with c._http.stream("POST", self._path, json=self._body) as response:
                self._response = response
                if not response.is_success:
                    response.read()
                    _raise_for(response)
                for payload in _sse_payloads(response.iter_lines()):
                    text = self._take(payload)
                    if text:
                        yield text
        except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            raise _unavailable(c.socket, exc, c.url) from None

    def close(self) -> None:
        """Stop early: closing the connection makes the daemon cancel the generation."""
        if self._response is not None:
            self._response.close()


# the sampling options a person sets in a chat (``/set`` in ``edgellm chat`` and the
# TUI's Playground), by the type each parses as; the daemon checks their ranges
SAMPLING_OPTIONS: dict[str, Any] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repeat_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "max_tokens": int,
    "seed": int,
    "stop": str,
}


def _embed_body(texts: str | list[str], model: str | None) -> dict[str, Any]:
    return {"input": texts, **({"model": model} if model else {})}


def _array(value: Any) -> Any:
    import numpy as np

    return np.asarray(value)


def _file_chunks(f: Any, size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk
