"""Plain objects the runtime takes and gives: requests in, events out. No HTTP here."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "deadline", "error"]


def new_request_id() -> str:
    """Unguessable: knowing one's own ids tells nothing about another caller's."""
    return f"req-{secrets.token_hex(12)}"


@dataclass
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0  # OpenAI's: by how often a token was generated so far
    presence_penalty: float = 0.0  # ... and whether it was at all
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias; -100 bans
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its bytes, its log-probability under the model's own
    distribution (the logits' softmax, before penalties, biases, temperature or a
    grammar), and the most likely tokens at that step with theirs."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass
class Delta:
    """A piece of generated text of choice ``index``, and, when asked for, the tokens
    it completes with their log-probabilities."""

    text: str
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class ToolCallDelta:
    """A piece of a tool call of choice ``choice``: the first of call ``index`` carries
    its ``id`` and ``name``, the rest fragments of its JSON ``arguments``."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None
    choice: int = 0


@dataclass
class Finished:
    """How a generation ended: ``finish_reason`` for the request as a whole, and, when
    it had several choices, ``reasons`` for each (``reason(i)`` reads either)."""

    finish_reason: FinishReason
    usage: Usage
    prompt_seconds: float
    decode_seconds: float
    reasons: tuple[FinishReason, ...] = ()

    def reason(self, choice: int) -> FinishReason:
        return self.reasons[choice] if self.reasons else self.finish_reason


@dataclass
class Failed:
    error: Exception


@dataclass
class Result:
    """What a tensor request gives (named output arrays, numpy) or a text request
    (named JSON values), in one piece."""

    outputs: dict[str, Any]
    usage: Usage
    seconds: float  # in the engine, batch included


# all an engine emits: deltas (text, tool calls), then one of the rest
Event = Delta | ToolCallDelta | Finished | Failed | Result
Sink = Callable[[Event], None]


def _nowhere(event: Event) -> None:
    """A request's sink until the pipeline gives it its own."""


@dataclass
class Request:
    """What every request to the runtime has: its model, where its events go, its
    limits and its progress. ``sink`` is called from the engine thread with each event,
    in order, ending with exactly one Finished, Result or Failed. It must not block."""

    model: str
    sink: Sink = _nowhere
    keep_alive: float | None = None
    timeout: float | None = None
    principal: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_request_id)

    # progress, written by the runtime and read for /api/requests
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # when it reached each step on its way to the first token (monotonic seconds):
    # "received", "parsed", "submitted", "audited", "admitted", "tokenized",
    # "first_token", "first_write"; each written once by the part that does the step
    marks: dict[str, float] = field(default_factory=dict)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    on_cancel: Callable[[], None] | None = None  # set by an engine that can stop a run
    _done: bool = False

    # which engines take it: "generation" and "text" (GGUF), or "tensor" (ONNX)
    kind = "generation"

    def cancel(self) -> None:
        self.cancel_event.set()
        if self.on_cancel is not None:
            self.on_cancel()

    @property
    def deadline(self) -> float | None:
        return None if self.timeout is None else self.started + self.timeout

    def emit(self, event: Event) -> None:
        if self._done:
            return
        if isinstance(event, Finished | Failed | Result):
            self._done = True
            self.state = "done"
        self.sink(event)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "kind": self.kind,
            "state": self.state,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "age_seconds": round(time.monotonic() - self.started, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "cancelled": self.cancel_event.is_set(),
            **{k: v for k, v in self.principal.items() if k in ("uid", "gid", "pid", "user")},
        }


@dataclass(frozen=True)
class Constraint:
    """What decoding must follow: a llama.cpp grammar (GBNF), and what the finished text
    is checked against: ``schema`` (a JSON Schema), ``json_object`` (any object), or
    neither (a plain grammar). With ``trigger``, the grammar is lazy: text is free
    until the model writes ``trigger``, and the grammar holds from there on (llama.cpp's
    lazy grammar; a tool call begun in a template's own syntax)."""

    grammar: str
    schema: dict[str, Any] | None = None
    json_object: bool = False
    trigger: str | None = None


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its arguments are a JSON object that validates
    against ``parameters`` (a JSON Schema)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers, and what it asks of them: ``choice`` is "none",
    "auto", "required", or a tool's name (that one must be called)."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = False  # several calls in one answer
    format: str = "generic"  # how the model is told of them and calls them (tool_format.py)


@dataclass
class GenerationRequest(Request):
    """One generation: either ``prompt`` (plain completion) or ``messages`` (chat)."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    constraint: Constraint | None = None
    tools: ToolUse | None = None  # its constraint (if any) is the calls' grammar
    n: int = 1  # choices, each in its own slot, sharing the prompt's KV
    logprobs: int | None = None  # None: none; k: each token's, and the k likeliest
    n_ctx: int | None = None  # a smaller context than the model's, for this request


@dataclass
class TensorRequest(Request):
    """One run of an ONNX model: named input arrays (numpy, already checked against
    the model's inputs), or ``texts`` for an embedding model, which the engine
    tokenizes. ``outputs`` names the outputs wanted (None: all)."""

    inputs: dict[str, Any] = field(default_factory=dict)
    texts: list[str] | None = None
    outputs: list[str] | None = None

    kind = "tensor"


@dataclass
class TextRequest(Request):
    """Work on a language model's text side, without generating: ``tokenize`` the
    ``text``, ``detokenize`` the ``tokens``, or render the chat ``template`` for
    ``messages``. Served between decode steps, in no slot."""

    op: Literal["tokenize", "detokenize", "template"] = "tokenize"
    text: str = ""
    add_special: bool = False  # tokenize: the BOS (or whatever the model adds)
    tokens: list[int] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)

    kind = "text"


@dataclass(frozen=True)
class ModelStatus:
    """A loaded model as the runtime sees it: the fields every engine has, one rate
    (``rate_unit`` says of what), and what only its engine has in ``details``."""

    name: str
    memory_mb: float
    size_mb: float
    slots: int  # requests (GGUF) or rows (ONNX) it runs at once
    slot_limit: int  # the governor's limit on that
    slots_busy: int
    queued: int
    n_ctx: int
    n_threads: int
    device: Literal["cpu", "gpu"]
    pinned: bool
    keep_alive_seconds: float
    expires_in_seconds: float | None  # None: pinned or busy
    idle_seconds: float
    rate: float  # over the last 5 s
    rate_unit: str  # "tokens" (GGUF) or "rows" (ONNX)
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON of /api/ps: the common fields, then the engine's own."""
        common = {k: v for k, v in vars(self).items() if k not in ("rate", "details")}
        return {**common, "rate_per_second": round(self.rate, 1), **self.details}


@dataclass(frozen=True)
class Limits:
    """What the governor asks of the runtime; the defaults limit nothing.

    Fractions scale each model's configured threads and slots (at least one each).
    ``shed`` is a reason: while set, new requests and loads are refused with 503.
    ``available_mb`` is the memory the governor reads as free (system or cgroup,
    whichever binds), which the fit check counts on instead of a larger figure."""

    thread_fraction: float = 1.0
    slot_fraction: float = 1.0
    max_tokens: int | None = None
    tokens_per_second: float | None = None
    shed: str | None = None
    retry_after: float = 10.0
    available_mb: float | None = None
