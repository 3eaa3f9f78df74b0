"""Tool calls in a chat template's own syntax: the Hermes format (``<tool_call>``).

Qwen 2.5 and 3, Hermes 2 Pro and 3, SmolLM3 and many fine-tunes call tools as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Oslo"}}
    </tool_call>

and their chat templates render the tools themselves (a ``tools`` variable), and
earlier calls and results (``tool_calls`` on assistant messages, ``tool`` messages).
For such a model the template gets the tools and the conversation in the shape
Hugging Face templates take, and a grammar holds the answer:

- ``required`` or a named tool: from the first token, one call (several with
  ``parallel_tool_calls``) of the tools it allows;
- ``auto``: the model writes text freely; once it writes ``<tool_call>``, the grammar
  holds the rest to valid calls (llama.cpp's lazy grammar, triggered by that text);
- ``none``: the template describes the tools and nothing is read as a call.
"""

from __future__ import annotations

import re
from typing import Any

from edgellm.runtime.llama import schema_grammar, tool_format
from edgellm.runtime.types import Constraint, ToolCallDelta, ToolUse

TRIGGER = "<tool_call>"
# the call's object in the grammar is the schema's root rule, renamed; the other
# rules of the schema are named from its properties (name-, arguments-…), never these
_RULES = (
    'tool-call ::= "<tool_call>" tool-call-ws tool-call-object tool-call-ws "</tool_call>"\n'
    "tool-call-ws ::= [ \\n]{0,2}\n"
)


def constraint(use: ToolUse) -> Constraint | None:
    tool_format.check_parameters(use)
    if use.choice == "none":
        return None
    body = schema_grammar.to_grammar(tool_format.call_schema(use), "tools")
    body = re.sub(r"^root ::=", "tool-call-object ::=", body, count=1, flags=re.M)
    several = use.parallel and use.choice in ("auto", "required")
    root = "root ::= tool-call" + (" (tool-call-ws tool-call)*" if several else "") + "\n"
    return Constraint(
        grammar=root + _RULES + body, trigger=TRIGGER if use.choice == "auto" else None
    )


def prompt(
    messages: list[dict[str, Any]], use: ToolUse
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The conversation as Hugging Face chat templates take it, and their ``tools``."""
    out: list[dict[str, Any]] = []
    for m, calls, answers in tool_format.checked_history(messages, use):
        if calls:
            written = [
                {"id": id_, "type": "function", "function": {"name": name, "arguments": args}}
                for id_, name, args in calls
            ]
            out.append({"role": "assistant", "content": m["content"], "tool_calls": written})
        elif answers is not None:
            out.append(
                {
                    "role": "tool",
                    "content": m["content"],
                    "tool_call_id": m["tool_call_id"],
                    "name": answers,
                }
            )
        else:
            out.append({"role": m["role"], "content": m["content"]})
    tools = [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
            },
        }
        for t in use.tools
    ]
    return out, {"tools": tools}


# a call's object up to its arguments, after its tag; and its end
_OPEN = re.compile(
    r'\s*<tool_call>\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*'
)
_END = re.compile(r"\s*\}\s*</tool_call>")


def _held(text: str) -> int:
    """How many characters at the end of ``text`` may begin the trigger."""
    for n in range(min(len(TRIGGER) - 1, len(text)), 0, -1):
        if TRIGGER.startswith(text[-n:]):
            return n
    return 0


class HermesParser(tool_format.ToolCallParser):
    """Text, passed on as it comes (but for what may be the start of ``<tool_call>``),
    until the first call; then the calls, as the generic format's are read."""

    opener = _OPEN
    closer = _END

    def feed(self, text: str) -> list[str | ToolCallDelta]:
        self.buffer += text
        out: list[str | ToolCallDelta] = []
        if self.kind is None:
            at = self.buffer.find(TRIGGER, self.pos)
            end = len(self.buffer) - _held(self.buffer) if at < 0 else at
            if end > self.pos:
                out.append(self.buffer[self.pos : end])
                self.pos = end
            if at < 0:
                return out
            self.kind = "tool_calls"
        self._tool_calls(out)
        return out

    def flush(self) -> list[str | ToolCallDelta]:
        if self.kind is None and self.pos < len(self.buffer):
            rest, self.pos = self.buffer[self.pos :], len(self.buffer)
            return [rest]
        return []
