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
from edgellm.runtime.types import ToolCallDelta, ToolUse

FORMAT = "generic"


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


def answer_schema(use: ToolUse) -> dict[str, Any]:
    """The JSON Schema of the answer the model must give."""
    tools = [t for t in use.tools if use.choice in ("auto", "required", t.name)]
    defs: dict[str, Any] = {}
    each = [_call_schema(t, n, defs) for n, t in enumerate(tools)]
    items = each[0] if len(each) == 1 else {"anyOf": each}
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


def grammar(use: ToolUse) -> str | None:
    """The grammar the answer follows (None for ``tool_choice: "none"``): each tool's
    parameters are checked first, so a keyword edgellm cannot hold is a 400 naming
    the tool's field (``tools[1].function.parameters.properties.x.not``)."""
    for i, tool in enumerate(use.tools):
        schema_grammar.check(tool.parameters, f"tools[{i}].function.parameters")
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


def prompt_messages(messages: list[dict[str, Any]], use: ToolUse) -> list[dict[str, Any]]:
    """The conversation as the model's template sees it: the tools described in the
    system message, earlier calls and their results written in the format."""
    names = {t.name for t in use.tools}
    called: dict[str, str] = {}  # tool_call_id -> the tool's name
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") or []
        if calls and m["role"] != "assistant":
            raise InvalidRequest(
                "only assistant messages carry tool_calls", param=f"messages[{i}].tool_calls"
            )
        if calls:
            written = []
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
                written.append({"name": name, "arguments": arguments})
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": written})})
        elif m["role"] == "tool":
            name = called.get(m.get("tool_call_id") or "")
            if name is None:
                raise InvalidRequest(
                    f"messages[{i}] answers tool call {m.get('tool_call_id')!r}, which no "
                    "earlier assistant message made",
                    param=f"messages[{i}].tool_call_id",
                )
            response = {"tool_response": {"name": name, "content": m["content"]}}
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
    tokens), so a cursor and two patterns follow it."""

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
                close = _CLOSE.match(self.buffer, self.pos)
                if close is None:
                    return
                self.pos, self._await_close = close.end(), False
            if not self._in_arguments:
                call = _CALL.match(self.buffer, self.pos)
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
