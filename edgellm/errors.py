"""The error taxonomy shared by every component.

Each error knows its HTTP status and renders as OpenAI's error body, so the runtime
can raise them without knowing anything about HTTP, and the server and the client
agree on one shape: ``{"error": {"message", "type", "code", "param"}}``.
"""

from __future__ import annotations

from typing import Any


class EdgeError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    retryable: bool | None = None  # False: tell SDKs not to retry (x-should-retry)

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


class PermissionDenied(EdgeError):
    status, type, code = 403, "permission_error", "permission_denied"


class NotFound(EdgeError):
    status, type, code = 404, "invalid_request_error", "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


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


class IntegrityError(EdgeError):
    """A stored model does not match its recorded checksum."""

    status, type, code = 409, "invalid_request_error", "integrity_check_failed"


class InternalError(EdgeError):
    pass


_BY_CODE: dict[str, type[EdgeError]] = {}
for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, EdgeError):
        _BY_CODE.setdefault(_cls.code, _cls)


def from_body(status: int, body: Any) -> EdgeError:
    """Rebuild an error from a response body (used by the client)."""
    err = body.get("error", {}) if isinstance(body, dict) else {}
    if not isinstance(err, dict):
        err = {"message": str(err)}
    message = str(err.get("message") or f"HTTP {status}")
    cls = _BY_CODE.get(str(err.get("code")), EdgeError)
    exc = cls.__new__(cls)
    EdgeError.__init__(exc, message, param=err.get("param"), code=err.get("code"))
    exc.status = status
    return exc
