"""Request bodies of the OpenAI-compatible endpoints, validated with pydantic.

Unknown fields are refused with a message naming them; OpenAI's fields that change
nothing about the answer (``user``, ``metadata``…) are taken, so stock clients work.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from edgellm.config import parse_duration
from edgellm.errors import InvalidRequest
from edgellm.runtime.types import Constraint, Sampling, Tool, ToolUse

# seconds, from 300, "300", "30s", "5m", "1h" or -1 (forever); junk is a ValueError
Duration = Annotated[
    float | None, BeforeValidator(lambda v: None if v is None else parse_duration(v))
]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON, as OpenAI writes it


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(max_length=128)
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    # extra ignored: the SDKs send back an answer's message with fields of their own
    # (refusal, annotations, audio…) that say nothing to the model
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def flat(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        flat: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            flat["tool_calls"] = [
                {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            flat["tool_call_id"] = self.tool_call_id
        return flat


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # edgellm always holds the schema: strict or not


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class ChosenFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: ChosenFunction


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``json_schema`` (what the SDK's ``parse()`` sends)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # edgellm always holds the schema: strict or not


class ResponseFormat(BaseModel):
    """``text``; ``json_object`` (any object, or with ``schema`` that schema: the shape
    llama.cpp's server and instructor send); ``json_schema`` (OpenAI's)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class _Generation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0)
    seed: int | None = None
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    keep_alive: Duration = None
    timeout: float | None = Field(default=None, gt=0)  # seconds; capped by request_timeout
    user: str | None = None
    response_format: ResponseFormat | None = None
    grammar: str | None = Field(default=None, min_length=1, max_length=65536)  # GBNF
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # OpenAI fields that change nothing about the answer: taken, and listed in the README
    metadata: dict[str, str] | None = None
    store: Literal[False] | None = None  # edgellm keeps no completions to fetch later
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None  # only means something with tools
    n: int = Field(default=1, ge=1, le=64)  # up to the model's slots, checked there

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 9):
                raise ValueError(f"keys are token ids (whole numbers), not {key!r}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 8:
            raise ValueError("at most 8 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def sampling(self) -> Sampling:
        return Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )

    def constraint(self, tools: ToolUse | None = None) -> Constraint | None:
        """The grammar decoding follows, checked and compiled (a bad schema or a keyword
        edgellm cannot enforce is a 400 naming it), or None for free text. With tools,
        the tool calls' grammar."""
        from edgellm.runtime.llama import schema_grammar, tool_format

        if tools is not None:
            fmt_given = self.response_format is not None and self.response_format.type != "text"
            if self.grammar is not None or fmt_given:
                raise InvalidRequest(
                    "tools cannot be combined with grammar or a JSON response_format",
                    param="grammar" if self.grammar is not None else "response_format",
                )
            held = tool_format.constraint(tools)
            if held is not None and self.ignore_eos:
                raise InvalidRequest("ignore_eos cannot be combined with tools", param="ignore_eos")
            return held

        constrained = self.grammar is not None or (
            self.response_format is not None and self.response_format.type != "text"
        )
        if constrained and self.ignore_eos:
            raise InvalidRequest(
                "ignore_eos cannot be combined with a grammar or a JSON response_format: "
                "the answer ends where the grammar does",
                param="ignore_eos",
            )
        fmt = self.response_format
        if self.grammar is not None:
            if fmt is not None and fmt.type != "text":
                raise InvalidRequest(
                    "send either grammar or a JSON response_format, not both", param="grammar"
                )
            return Constraint(grammar=self.grammar)
        if fmt is None or fmt.type == "text":
            if fmt is not None and (fmt.json_schema is not None or fmt.schema_ is not None):
                raise InvalidRequest(
                    "response_format text takes no schema", param="response_format.type"
                )
            return None
        if fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise InvalidRequest(
                    "response_format json_schema needs its json_schema",
                    param="response_format.json_schema",
                )
            schema, path = fmt.json_schema.schema_, "response_format.json_schema.schema"
        elif fmt.schema_ is not None:
            schema, path = fmt.schema_, "response_format.schema"
        else:
            return Constraint(grammar=schema_grammar.any_json_object(), json_object=True)
        return Constraint(grammar=schema_grammar.to_grammar(schema, path), schema=schema)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ToolDef] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    def tool_use(self) -> ToolUse | None:
        """The tools offered and what is asked of them; the messages' tool calls and
        results checked against them."""
        if not self.tools:
            if self.tool_choice is not None and self.tool_choice != "none":
                raise InvalidRequest("tool_choice needs tools", param="tool_choice")
            for i, m in enumerate(self.messages):
                if m.tool_calls or m.role == "tool":
                    raise InvalidRequest(
                        f"messages[{i}] holds a tool call or result, but the request "
                        "declares no tools",
                        param=f"messages[{i}]",
                    )
            return None
        names = [t.function.name for t in self.tools]
        if len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise InvalidRequest(f"two tools are named {twice!r}", param="tools")
        named = self.tool_choice
        if isinstance(named, NamedToolChoice) and named.function.name not in names:
            raise InvalidRequest(
                f"tool_choice names {named.function.name!r}, which is not among the "
                f"tools ({', '.join(names)})",
                param="tool_choice.function.name",
            )
        choice = named.function.name if isinstance(named, NamedToolChoice) else named or "auto"
        if self.logprobs:
            raise InvalidRequest(
                "logprobs cannot be combined with tools (the tokens would be the tool "
                "call's envelope, not the answer)",
                param="logprobs",
            )
        tools = []
        for i, t in enumerate(self.tools):
            parameters = t.function.parameters or {"type": "object", "properties": {}}
            if parameters.get("type", "object") != "object":
                raise InvalidRequest(
                    "a function's parameters are a JSON Schema of type object",
                    param=f"tools[{i}].function.parameters.type",
                )
            tools.append(Tool(t.function.name, t.function.description or "", parameters))
        # several calls in one answer only when asked for: small models given the
        # choice repeat the same call until max_tokens
        use = ToolUse(tuple(tools), choice, self.parallel_tool_calls is True)
        from edgellm.runtime.llama import tool_format

        tool_format.prompt_messages([m.flat() for m in self.messages], use)  # checks
        return use

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def token_logprobs(self) -> int | None:
        """How many alternatives each token's log-probability comes with (None: none)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Generation):
    prompt: str | list[str]
    echo: Literal[False] = False
    logprobs: int | None = Field(default=None, ge=0, le=20)  # the legacy shape: a count

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported")
            return v[0]
        return v

    def limit(self) -> int | None:
        return self.max_tokens

    def token_logprobs(self) -> int | None:
        return self.logprobs


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_alive: Duration = None


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate ``data`` or raise InvalidRequest naming the bad field (every unknown
    field, when there are unknown fields: a client fixes them all in one go)."""
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:

        def where(err: Any) -> str:
            parts = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
            return ".".join(parts) or "body"

        unknown = [where(e) for e in exc.errors() if e["type"] == "extra_forbidden"]
        if unknown:
            names = ", ".join(repr(u) for u in dict.fromkeys(unknown))
            plural = "s" if len(set(unknown)) > 1 else ""
            raise InvalidRequest(f"unknown field{plural} {names}", param=unknown[0]) from None
        err = exc.errors()[0]
        loc = where(err)
        if err["type"] == "missing":
            raise InvalidRequest(f"missing required field {loc!r}", param=loc) from None
        msg = err["msg"].removeprefix("Value error, ")
        raise InvalidRequest(f"invalid value for {loc!r}: {msg}", param=loc) from None
