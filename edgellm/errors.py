"""The error taxonomy shared by every component.

Each error knows its HTTP status and renders as OpenAI's error body, so the runtime
can raise them without knowing anything about HTTP, and the server and the client
agree on one shape: ``{"error": {"message", "type", "code", "param"}}``.
"""

from __future__ import annotations

from typing import Any

# every error class by its code: how the client turns a response back into its class
_BY_CODE: dict[str, type[EdgeError]] = {}


class EdgeError(Exception):
    """The base of every error edgellm answers with. Each subclass declares its own
    ``code`` (checked here, at import), so a code names exactly one class on both sides
    of the socket. ``retry_after`` is seconds (the response's Retry-After header)."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    retryable: bool | None = None  # False: tell SDKs not to retry (x-should-retry)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must declare its own error code")
        known = _BY_CODE.setdefault(cls.code, cls)
        if known is not cls:
            raise TypeError(f"{cls.__name__} and {known.__name__} share the code {cls.code!r}")

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }


class InvalidRequest(EdgeError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class ContextOverflow(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(EdgeError):
    """No credentials this listener accepts: a network request without a valid bearer
    token or client certificate (OpenAI's shape for a bad API key)."""

    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class TooManyRequests(EdgeError):
    """A principal over its limits, or an address after too many failed logins."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class PermissionDenied(EdgeError):
    status, type, code = 403, "permission_error", "permission_denied"


class NotFound(EdgeError):
    status, type, code = 404, "invalid_request_error", "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(EdgeError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class Conflict(EdgeError):
    status, type, code = 409, "invalid_request_error", "conflict"


class ClientGone(EdgeError):
    """The client closed the connection before its request was read: nobody is left to
    answer (nginx's 499); logged as a request, never as a traceback."""

    status, type, code = 499, "invalid_request_error", "client_closed_request"


class BodyTimeout(EdgeError):
    """The request's body did not arrive in time (a client that stalls mid-body)."""

    status, type, code = 408, "invalid_request_error", "body_timeout"


class PayloadTooLarge(EdgeError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class Unavailable(EdgeError):
    """The appliance cannot take this work now; the client may retry later."""

    status, type, code = 503, "server_error", "unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw: Any) -> None:
        super().__init__(message, retry_after=retry_after, **kw)


class QueueFull(Unavailable):
    code = "queue_full"


class InsufficientMemory(Unavailable):
    code = "insufficient_memory"


class ShuttingDown(Unavailable):
    code = "shutting_down"


class ModelLoadFailed(Unavailable):
    code = "model_load_failed"


class ModelUnusable(Conflict):
    """The model's file cannot be loaded (llama.cpp or onnxruntime said why): retrying
    will not help until it is replaced, or an operator loads it again by hand."""

    code = "model_unusable"
    retryable = False


class Shedding(Unavailable):
    """The governor refuses new work until the device recovers."""

    code = "governor_shedding"


class EngineFailed(Unavailable):
    """A model's engine died or stopped making progress; its requests were ended."""

    code = "engine_failed"


class ModelBackingOff(Unavailable):
    """A model whose engine failed repeatedly is not reloaded until its back-off ends."""

    code = "model_backing_off"


class DeadlineExceeded(Unavailable):
    """A request ran past its timeout and was stopped."""

    code = "deadline_exceeded"


class RequestCancelled(Conflict):
    """A request was cancelled (DELETE /api/requests/{id}, or by the governor)."""

    code = "request_cancelled"


class InternalError(EdgeError):
    code = "internal_error"


class IntegrityError(EdgeError):
    """A stored model does not match its recorded checksum."""

    status, type, code = 409, "invalid_request_error", "integrity_check_failed"


# --- the vault ----------------------------------------------------------------------------
class VaultKeyError(EdgeError):
    status, type, code = 400, "vault_error", "vault_key"


class WrongKey(VaultKeyError):
    code = "wrong_key"


class NoKey(VaultKeyError):
    code = "no_key"


class VaultLocked(Unavailable):
    code = "vault_locked"

    def __init__(
        self, message: str = "vault is locked: unlock it with `edgellm vault unlock`", **kw: Any
    ) -> None:
        super().__init__(message, retry_after=float(kw.pop("retry_after", 30)), **kw)


class AuditUnavailable(Unavailable):
    code = "audit_unavailable"


class DataNotFound(NotFound):
    code = "data_not_found"


# --- settings, the catalog, the service, the client ---------------------------------------
class ConfigError(InvalidRequest):
    """A bad setting; the message names the key and the source it came from."""

    code = "invalid_config"


class FetchError(EdgeError):
    status, type, code = 502, "server_error", "fetch_failed"


class ServiceError(EdgeError):
    status, type, code = 400, "service_error", "service_error"


class AlreadyRunning(Conflict):
    code = "already_running"


class DaemonUnavailable(EdgeError):
    """The client could not reach a daemon (none runs, or the socket refuses us)."""

    status, type, code = 503, "client_error", "daemon_unavailable"


def from_body(status: int | None, body: Any, retry_after: float | None = None) -> EdgeError:
    """Rebuild an error from a response body (used by the client): the class its code
    names (EdgeError for a code this version does not know), the response's status
    (None: the class's own, for an error inside a stream), and its Retry-After."""
    err = body.get("error", {}) if isinstance(body, dict) else {}
    if not isinstance(err, dict):
        err = {"message": str(err)}
    cls = _BY_CODE.get(str(err.get("code")), EdgeError)
    exc = cls.__new__(cls)
    message = str(err.get("message") or f"HTTP {status or cls.status}")
    param = err.get("param")
    EdgeError.__init__(
        exc,
        message,
        param=param if isinstance(param, str) else None,
        code=str(err["code"]) if err.get("code") is not None else None,
        retry_after=retry_after,
    )
    exc.status = status or cls.status
    return exc


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (edgellm sends seconds; an HTTP date is not)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < 86400 * 365 else None
