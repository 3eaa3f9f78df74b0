"""Ollama's request bodies, checked as strictly as OpenAI's: a field or option edgellm
cannot honour is a 400 naming it, never silently ignored.

Names: Ollama clients send ``name:tag``; edgellm's models have one name each, which
answers to ``name`` and ``name:latest`` (and a model imported with a colon in its
name to that exact name).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgellm.errors import InvalidRequest
from edgellm.runtime.types import Sampling
from edgellm.server.schemas import Duration

# Ollama's options that edgellm takes, and what each becomes
SAMPLING_OPTIONS = {
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
}


class Options(BaseModel):
    """``options``: sampling, ``num_predict`` (max tokens, -1 none), ``stop``, and
    ``num_ctx`` within the model's context per request. Load-time options (num_gpu,
    num_thread, use_mmap…) are the operator's, in edgellm.toml: refused by name."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    num_predict: int | None = Field(default=None, ge=-2)
    stop: list[str] | None = None
    num_ctx: int | None = Field(default=None, ge=1)

    def sampling(self) -> Sampling:
        given = {k: getattr(self, k) for k in SAMPLING_OPTIONS if getattr(self, k) is not None}
        return Sampling(**given)

    def max_tokens(self) -> int | None:
        if self.num_predict is None or self.num_predict < 0:
            return None  # -1: until the end or the context; -2: fill the context
        return self.num_predict


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None


class _Generation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options | None = None
    stream: bool = True
    keep_alive: Duration = None
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def check_common(self) -> None:
        if self.think not in (None, False):
            raise InvalidRequest(
                "think: no model edgellm serves writes a separate reasoning trace; "
                "leave out think (or send false)",
                param="think",
            )
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")

    def token_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatBody(_Generation):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateBody(_Generation):
    prompt: str | None = None
    system: str | None = None
    raw: bool | None = None
    images: list[str] | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None


class EmbedBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[str]
    truncate: bool | None = None
    options: dict[str, Any] | None = None
    keep_alive: Duration = None
    dimensions: int | None = Field(default=None, ge=1)

    @field_validator("options")
    @classmethod
    def _no_options(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v:
            raise ValueError(f"an embedding model takes no options ({', '.join(sorted(v))} given)")
        return v


class EmbeddingsBody(BaseModel):  # the older /api/embeddings
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    prompt: str
    options: dict[str, Any] | None = None
    keep_alive: Duration = None


class ModelBody(BaseModel):  # /api/show, /api/delete
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    name: str | None = None  # older clients' spelling
    verbose: bool | None = None

    def which(self) -> str:
        name = self.model or self.name
        if not name:
            raise InvalidRequest("send the model's name as model", param="model")
        return name


class PullBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    name: str | None = None
    insecure: bool | None = None
    stream: bool = True

    def which(self) -> str:
        name = self.model or self.name
        if not name:
            raise InvalidRequest("send the model's name as model", param="model")
        return name


def format_schema(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """``format``: "json" is any JSON object, a dict is a JSON Schema, "" is none."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return {"type": "object"}
    assert isinstance(fmt, dict)
    json.dumps(fmt)  # a schema that is not JSON cannot have come from a client
    return fmt
