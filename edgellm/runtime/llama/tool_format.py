"""Tool calls for a model whose chat template has no tool syntax: the generic format.

SmolLM2's template, like most small models', knows nothing of tools, so edgellm
describes them in the system prompt and has the model answer with one JSON object
(as llama.cpp's "generic" handler does):

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}
    {"response": "It is sunny."}          (only when tool_choice is "auto")

A grammar compiled from the tools' parameter schemas holds the answer to that
shape: every call names a declared tool and its arguments validate against that
tool's schema, whatever the model. ``ToolCallParser`` turns the object back into
OpenAI's shape as it streams: a call's id and name as soon as the name is complete,
then its arguments as they arrive; a response's text, unescaped, as it arrives.

Earlier turns are written the same way: an assistant message's ``tool_calls`` as the
object it would have answered, a ``tool`` message as a user turn holding
``{"tool_response": {"name", "content"}}``.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from edgellm.errors import InvalidRequest
from edgellm.runtime.llama import schema_grammar
from edgellm.runtime.types import Constraint, ToolCallDelta, ToolUse

FORMATS = ("generic", "hermes")  # hermes: tool_hermes.py


def _rebased(node: Any, prefix: str) -> Any:
    """``node`` without its definitions, its local references renamed into ``prefix``."""
    if isinstance(node, dict):
        out = {k: _rebased(v, prefix) for k, v in node.items() if k not in ("$defs", "definitions")}
        ref = node.get("$ref")
        for base in ("#/$defs/", "#/definitions/"):
            if isinstance(ref, str) and ref.startswith(base):
                out["$ref"] = f"#/$defs/{prefix}{ref[len(base) :]}"
        return out
    if isinstance(node, list):
        return [_rebased(v, prefix) for v in node]
    return node


def _call_schema(tool: Any, n: int, defs: dict[str, Any]) -> dict[str, Any]:
    """A call of ``tool`` (the ``n``th); its parameters' definitions move to ``defs``,
    the answer schema's own, since a reference is read from the root of its schema."""
    prefix = f"tool{n}_"
    for key in ("$defs", "definitions"):
        for name, definition in (tool.parameters.get(key) or {}).items():
            defs[prefix + name] = _rebased(definition, prefix)
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.name},
            "arguments": _rebased(tool.parameters, prefix),
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def call_schema(use: ToolUse) -> dict[str, Any]:
    """The JSON Schema of one call, ``{"name": …, "arguments": …}``, of a tool the
    request lets the model call; the tools' definitions in its ``$defs``."""
    tools = [t for t in use.tools if use.choice in ("auto", "required", t.name)]
    defs: dict[str, Any] = {}
    each = [_call_schema(t, n, defs) for n, t in enumerate(tools)]
    one = each[0] if len(each) == 1 else {"anyOf": each}
    return {**one, "$defs": defs} if defs else one


def answer_schema(use: ToolUse) -> dict[str, Any]:
    """The JSON Schema of the answer the model must give."""
    items = call_schema(use)
    defs = items.pop("$defs", None)
    calls: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not use.parallel or use.choice not in ("auto", "required"):  # a named tool: once
        calls["maxItems"] = 1
    envelope = {
        "type": "object",
        "properties": {"tool_calls": calls},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    if use.choice != "auto":
        return {**envelope, "$defs": defs} if defs else envelope
    response = {
        "type": "object",
        "properties": {"response": {"type": "string"}},
        "required": ["response"],
        "additionalProperties": False,
    }
    return {"anyOf": [envelope, response], **({"$defs": defs} if defs else {})}


def check_parameters(use: ToolUse) -> None:
    """Each tool's parameters, checked: a keyword edgellm cannot hold is a 400 naming
    the tool's field (``tools[1].function.parameters.properties.x.not``)."""
    for i, tool in enumerate(use.tools):
        schema_grammar.check(tool.parameters, f"tools[{i}].function.parameters")


def grammar(use: ToolUse) -> str | None:
    """The grammar the answer follows (None for ``tool_choice: "none"``)."""
    check_parameters(use)
    if use.choice == "none":
        return None
    return schema_grammar.to_grammar(answer_schema(use), "tools")


def _described(tool: Any) -> str:
    """A tool as the prompt lists it: its name, description and parameters, without
    the schema's titles (pydantic writes one on every field; they only cost tokens)."""

    def bare(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: bare(v) for k, v in node.items() if k != "title"}
        return [bare(v) for v in node] if isinstance(node, list) else node

    entry: dict[str, Any] = {"name": tool.name}
    if tool.description:
        entry["description"] = tool.description
    entry["parameters"] = bare(tool.parameters)
    return json.dumps(entry, separators=(",", ":"))


def _instructions(use: ToolUse) -> str:
    listed = "\n".join(_described(t) for t in use.tools)
    head = f"Tools (name, description, JSON Schema of the arguments):\n{listed}\n"
    call = '{"tool_calls": [{"name": "<tool>", "arguments": {...}}]}'
    if use.choice == "none":
        return head + "Do not call a tool now: answer in plain text."
    if use.choice == "auto":
        return (
            head + f"Answer with one JSON object: {call} to call a tool when you need what "
            'it returns, or {"response": "<your answer>"} to answer. Once a tool_response '
            "gives what was asked, answer with it."
        )
    which = "a tool" if use.choice == "required" else f"the tool {use.choice}"
    return head + f"Call {which} now, answering with one JSON object: {call}"


def checked_history(
    messages: list[dict[str, Any]], use: ToolUse
) -> list[tuple[dict[str, Any], list[tuple[str, str, Any]], str | None]]:
    """Each message with its tool calls read — (id, name, arguments) — and, for a
    ``tool`` message, the name of the tool it answers; InvalidRequest naming the
    field where a call names an undeclared tool, its arguments are not JSON, or a
    result answers no earlier call. Every format writes the history from this."""
    names = {t.name for t in use.tools}
    called: dict[str, str] = {}  # tool_call_id -> the tool's name
    out: list[tuple[dict[str, Any], list[tuple[str, str, Any]], str | None]] = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") or []
        if calls and m["role"] != "assistant":
            raise InvalidRequest(
                "only assistant messages carry tool_calls", param=f"messages[{i}].tool_calls"
            )
        read = []
        for j, call in enumerate(calls):
            name = call["name"]
            if name not in names:
                raise InvalidRequest(
                    f"messages[{i}] calls {name!r}, which is not among the request's tools",
                    param=f"messages[{i}].tool_calls[{j}].function.name",
                )
            try:
                arguments = json.loads(call["arguments"] or "{}")
            except ValueError:
                raise InvalidRequest(
                    f"messages[{i}].tool_calls[{j}].function.arguments is not JSON",
                    param=f"messages[{i}].tool_calls[{j}].function.arguments",
                ) from None
            called[call["id"]] = name
            read.append((call["id"], name, arguments))
        answers = None
        if m["role"] == "tool":
            answers = called.get(m.get("tool_call_id") or "")
            if answers is None:
                raise InvalidRequest(
                    f"messages[{i}] answers tool call {m.get('tool_call_id')!r}, which no "
                    "earlier assistant message made",
                    param=f"messages[{i}].tool_call_id",
                )
        out.append((m, read, answers))
    return out


def prompt_messages(messages: list[dict[str, Any]], use: ToolUse) -> list[dict[str, Any]]:
    """The conversation as the model's template sees it: the tools described in the
    system message, earlier calls and their results written in the format."""
    out: list[dict[str, Any]] = []
    for m, calls, answers in checked_history(messages, use):
        if calls:
            written = [{"name": name, "arguments": arguments} for _, name, arguments in calls]
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": written})})
        elif answers is not None:
            response = {"tool_response": {"name": answers, "content": m["content"]}}
            out.append({"role": "user", "content": json.dumps(response)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    instructions = _instructions(use)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{instructions}"}
    else:
        out.insert(0, {"role": "system", "content": instructions})
    return out


def call_problem(use: ToolUse, name: str, arguments: str) -> str | None:
    """Why a finished call breaks its tools (None: it names an offered tool and its
    arguments validate against that tool's parameters)."""
    tool = next((t for t in use.tools if t.name == name), None)
    if tool is None or use.choice not in ("auto", "required", name):
        return f"it calls {name!r}, which was not offered"
    try:
        value = json.loads(arguments)
    except ValueError as exc:
        return f"its arguments are not JSON ({exc})"
    return schema_grammar.schema_problem(tool.parameters, value, "arguments")


# the object's first key, up to its value (a response's up to inside its string)
_START = re.compile(r'\{\s*"(?:(tool_calls)"\s*:\s*|(response)"\s*:\s*")')
_CLOSE = re.compile(r"\s*\}")
_CALL = re.compile(r'\s*[\[,]\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


class ToolCallParser:
    """The answer object, fed as it is decoded, out as text and ``ToolCallDelta``s.

    The grammar fixes its shape (name before arguments, at most one space between
    tokens), so a cursor and two patterns follow it: ``opener`` up to a call's
    arguments, ``closer`` after them (a format's own syntax swaps them)."""

    opener = _CALL
    closer = _CLOSE

    def __init__(self) -> None:
        self.buffer = ""
        self.pos = 0
        self.kind: str | None = None  # "tool_calls" or "response", once known
        self.calls = 0
        self._depth = 0  # inside a call's arguments: nesting, and string state
        self._in_string = self._escaped = False
        self._in_arguments = self._await_close = False
        self._response_done = False

    def feed(self, text: str) -> list[str | ToolCallDelta]:
        self.buffer += text
        out: list[str | ToolCallDelta] = []
        if self.kind is None:
            start = _START.match(self.buffer)
            if start is None:
                return out
            self.kind, self.pos = start[1] or start[2], start.end()
        if self.kind == "response":
            self._response(out)
        else:
            self._tool_calls(out)
        return out

    def flush(self) -> list[str | ToolCallDelta]:
        """What is held at the end of the answer (nothing: the grammar ended it)."""
        return []

    def _response(self, out: list[str | ToolCallDelta]) -> None:
        """The response string's text, unescaped, as far as complete escapes go."""
        if self._response_done:
            return
        end = self.pos
        chunk = []
        while end < len(self.buffer):
            char = self.buffer[end]
            if char == '"':
                self._response_done = True
                break
            if char == "\\":
                length = 6 if self.buffer[end + 1 : end + 2] == "u" else 2
                if end + length > len(self.buffer):
                    break  # the escape is not complete yet
                chunk.append(json.loads(f'"{self.buffer[end : end + length]}"'))
                end += length
                continue
            chunk.append(char)
            end += 1
        self.pos = end
        if chunk:
            out.append("".join(chunk))

    def _tool_calls(self, out: list[str | ToolCallDelta]) -> None:
        while True:
            if self._await_close:  # the call's own object closes after its arguments
                close = self.closer.match(self.buffer, self.pos)
                if close is None:
                    return
                self.pos, self._await_close = close.end(), False
            if not self._in_arguments:
                call = self.opener.match(self.buffer, self.pos)
                if call is None:
                    return
                self.pos = call.end()
                out.append(ToolCallDelta(self.calls, id=new_call_id(), name=json.loads(call[1])))
                self._in_arguments, self._depth = True, 0
            while self._depth == 0 and self.buffer[self.pos : self.pos + 1] == " ":
                self.pos += 1  # the space before the object is not the arguments'
            start, end = self.pos, self._scan_arguments()
            if end > start:
                out.append(ToolCallDelta(self.calls, arguments=self.buffer[start:end]))
            self.pos = end
            if self._in_arguments:
                return
            self.calls += 1
            self._await_close = True

    def _scan_arguments(self) -> int:
        """Walk the arguments' JSON from ``pos``; where it stopped (its end, once the
        outermost object closes: then no longer in the arguments)."""
        i = self.pos
        while i < len(self.buffer):
            char = self.buffer[i]
            i += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._in_arguments = False
                    return i
        return i


# --- the formats, by name --------------------------------------------------------------
def template_syntax(template: str) -> str:
    """The tool syntax a chat template speaks ("hermes"), or "" for none edgellm
    knows: a template that renders ``tools`` and writes calls in ``<tool_call>``."""
    return "hermes" if "tools" in template and "<tool_call>" in template else ""


def format_for(setting: str | None, syntax: str, has_template: bool) -> str | None:
    """The format a model's tool calls take: the per-model ``tool_format`` setting
    unless it is "auto"; else its template's own syntax, else the generic format
    (None: a model without a chat template takes no tools)."""
    if not has_template:
        return None
    if setting and setting != "auto":
        return setting
    return syntax or "generic"


def constraint(use: ToolUse) -> Constraint | None:
    """The grammar the answer follows in the request's format, checked and compiled
    (None for ``tool_choice: "none"``, where nothing is called)."""
    if use.format == "hermes":
        from edgellm.runtime.llama import tool_hermes

        return tool_hermes.constraint(use)
    compiled = grammar(use)
    return None if compiled is None else Constraint(grammar=compiled)


def prompt(
    messages: list[dict[str, Any]], use: ToolUse
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages the chat template renders, and the variables it gets beside them."""
    if use.format == "hermes":
        from edgellm.runtime.llama import tool_hermes

        return tool_hermes.prompt(messages, use)
    return prompt_messages(messages, use), {}


def parser(use: ToolUse) -> ToolCallParser | None:
    """What reads the answer back into text and calls (None: nothing is called)."""
    if use.choice == "none":
        return None
    if use.format == "hermes":
        from edgellm.runtime.llama import tool_hermes

        return tool_hermes.HermesParser()
    return ToolCallParser()
