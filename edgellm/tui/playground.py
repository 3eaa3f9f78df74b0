"""Chat with a model: the answer streams in, then its speed and why it stopped."""

from __future__ import annotations

import time
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Input, Select, Static

from edgellm.client import SAMPLING_OPTIONS, ChatStream
from edgellm.tui.data import problem
from edgellm.tui.widgets import Pane


class Playground(Pane):
    """A conversation: every turn is sent with the ones before it (the model sees the
    history), the context's size in tokens is shown after each answer, and Ctrl+L
    starts over."""

    BINDINGS = [
        Binding("escape", "stop", "Stop / leave prompt"),
        Binding("ctrl+l", "clear", "Clear conversation"),
    ]

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.stream: ChatStream | None = None
        self.stopping = False  # Esc closed the stream: its end is a stop, not an error
        self.transcript = ""
        self.history: list[dict[str, str]] = []
        self.system: str | None = None
        self.options: dict[str, Any] = {}  # /set: sampling options for every turn
        self.context_tokens = 0
        self.models: list[str] = []

    def compose(self) -> ComposeResult:
        yield Select([], prompt="model (the daemon's default)", id="play-model")
        with VerticalScroll(id="play-scroll"):
            yield Static("", id="play-output", markup=False)
        yield Static(
            "Enter sends; Esc stops a reply, or leaves the prompt; Ctrl+L clears; /help",
            id="play-stats",
        )
        yield Input(placeholder="Ask something…", id="play-input")

    def fetch(self, client: Any) -> Any:
        return [m["name"] for m in client.models() if m.get("format") != "onnx"]

    def show(self, data: Any) -> None:
        if data == self.models:
            return
        self.models = data
        select = self.query_one(Select)
        current = select.value
        select.set_options([(name, name) for name in data])
        if current in data:
            select.value = current

    def on_input_submitted(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt or self.stream is not None:
            return
        event.input.value = ""
        if prompt.startswith("/") and not prompt.startswith("//"):
            self._stats(self.command(prompt))
            return
        prompt = prompt[1:] if prompt.startswith("//") else prompt
        select = self.query_one(Select)
        self.transcript += f"> {prompt}\n"
        self._show_transcript()
        self.generate(prompt, None if select.is_blank() else str(select.value))

    def command(self, line: str) -> str:
        """``/set NAME VALUE``, ``/system TEXT``, ``/clear``, ``/help``, as in ``edgellm
        chat``; what it did, or why not, for the status line. Never sent to the model."""
        word, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if word in ("help", "?"):
            return (
                "/set NAME VALUE (" + ", ".join(SAMPLING_OPTIONS) + "; VALUE default unsets), "
                "/system TEXT (- removes it), /clear; //text sends a line starting with /"
            )
        if word == "clear":
            self.action_clear()
            return "conversation cleared: the next message starts a new one"
        if word == "system":
            self.system = None if arg in ("", "-") else arg
            return "system prompt removed" if self.system is None else "system prompt set"
        if word == "set":
            name, _, value = arg.partition(" ")
            if name not in SAMPLING_OPTIONS:
                return f"[red]error: no option {name!r} to set: {', '.join(SAMPLING_OPTIONS)}[/]"
            if value.strip() == "default":
                self.options.pop(name, None)
                return f"{name}: the daemon's default"
            try:
                self.options[name] = SAMPLING_OPTIONS[name](value.strip())
            except ValueError:
                return f"[red]error: {name} takes a {SAMPLING_OPTIONS[name].__name__}[/]"
            return f"{name} = {self.options[name]}"
        return f"[red]error: unknown command /{word}; /help lists them[/]"

    def _show_transcript(self) -> None:
        self.query_one("#play-output", Static).update(self.transcript)
        self.query_one("#play-scroll", VerticalScroll).scroll_end(animate=False)

    def _append(self, text: str) -> None:
        self.transcript += text
        self._show_transcript()

    def _stats(self, text: str) -> None:
        self.query_one("#play-stats", Static).update(text)

    def _answered(self, prompt: str, answer: str, context_tokens: int) -> None:
        self.history += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
        self.context_tokens = context_tokens

    @work(thread=True, exclusive=True, group="playground")
    def generate(self, prompt: str, model: str | None) -> None:
        t0, first, pieces = time.monotonic(), None, []
        self.stopping = False
        self.edge.deliver(self._stats, "generating…")
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages = [*system, *self.history, {"role": "user", "content": prompt}]
        try:
            with self.edge.client.like(timeout=600) as client:
                self.stream = client.chat(messages, model=model, stream=True, **self.options)
                for text in self.stream:
                    first = first or time.monotonic()
                    pieces.append(text)
                    self.edge.deliver(self._append, text)
            stream, end = self.stream, time.monotonic()
            usage = stream.usage or {}
            tokens = usage.get("completion_tokens", len(pieces))
            context = usage.get("prompt_tokens", 0) + tokens
            rate = (tokens - 1) / (end - first) if first and tokens > 1 and end > first else 0.0
            ttft = (first - t0) * 1000 if first else 0.0
            self.edge.deliver(self._answered, prompt, "".join(pieces), context)
            self.edge.deliver(
                self._stats,
                f"{tokens} tokens, {rate:.1f} tok/s, first "
                f"token after {ttft:.0f} ms, finish: "
                f"{stream.finish_reason or 'stopped'}; context {context} tokens "
                f"({len(self.history) // 2 + 1} turns; Ctrl+L clears)",
            )
        except Exception as exc:  # shown, never raised: no traceback reaches the screen
            if self.stopping:  # Esc: what came is kept, as a turn of the conversation
                self.edge.deliver(self._answered, prompt, "".join(pieces), self.context_tokens)
                self.edge.deliver(self._stats, f"stopped after {len(pieces)} pieces")
            else:
                self.edge.deliver(self._stats, f"[red]error: {problem(exc)}[/]")
        finally:
            self.stream = None
            self.edge.deliver(self._append, "\n\n")

    def action_stop(self) -> None:
        """Esc: stop the reply if one is coming, else leave the prompt (so the tab keys
        work again)."""
        if self.stream is not None:
            self.stopping = True
            self.stream.close()  # closing the connection cancels the generation
        else:
            self.query_one("#play-scroll").focus()

    def action_clear(self) -> None:
        if self.stream is not None:
            self.notify("a reply is coming: Esc stops it first", severity="warning")
            return
        self.history, self.transcript, self.context_tokens = [], "", 0
        self._show_transcript()
        self._stats("conversation cleared: the next message starts a new one")
