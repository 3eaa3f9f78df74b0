"""Chat with a model: the answer streams in, then its speed and why it stopped."""

from __future__ import annotations

import time
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Input, Select, Static

from edgellm.client import ChatStream
from edgellm.tui.data import problem
from edgellm.tui.widgets import Pane


class Playground(Pane):
    BINDINGS = [Binding("escape", "stop", "Stop / leave prompt")]

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.stream: ChatStream | None = None
        self.transcript = ""
        self.models: list[str] = []

    def compose(self) -> ComposeResult:
        yield Select([], prompt="model (the daemon's default)", id="play-model")
        with VerticalScroll(id="play-scroll"):
            yield Static("", id="play-output", markup=False)
        yield Static("Enter sends; Esc stops a reply, or leaves the prompt", id="play-stats")
        yield Input(placeholder="Ask something…", id="play-input")

    def fetch(self, client: Any) -> Any:
        return [m["name"] for m in client.models()]

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
        if not prompt:
            return
        event.input.value = ""
        select = self.query_one(Select)
        self.transcript += f"> {prompt}\n"
        self._show_transcript()
        self.generate(prompt, None if select.is_blank() else str(select.value))

    def _show_transcript(self) -> None:
        self.query_one("#play-output", Static).update(self.transcript)
        self.query_one("#play-scroll", VerticalScroll).scroll_end(animate=False)

    def _append(self, text: str) -> None:
        self.transcript += text
        self._show_transcript()

    def _stats(self, text: str) -> None:
        self.query_one("#play-stats", Static).update(text)

    @work(thread=True, exclusive=True, group="playground")
    def generate(self, prompt: str, model: str | None) -> None:
        t0, first, pieces = time.monotonic(), None, 0
        self.edge.deliver(self._stats, "generating…")
        try:
            with self.edge.client.like(timeout=600) as client:
                self.stream = client.chat(
                    [{"role": "user", "content": prompt}], model=model, stream=True
                )
                for text in self.stream:
                    first = first or time.monotonic()
                    pieces += 1
                    self.edge.deliver(self._append, text)
            stream, end = self.stream, time.monotonic()
            tokens = (stream.usage or {}).get("completion_tokens", pieces)
            rate = (tokens - 1) / (end - first) if first and tokens > 1 and end > first else 0.0
            ttft = (first - t0) * 1000 if first else 0.0
            self.edge.deliver(
                self._stats,
                f"{tokens} tokens, {rate:.1f} tok/s, first "
                f"token after {ttft:.0f} ms, finish: "
                f"{stream.finish_reason or 'stopped'}",
            )
        except Exception as exc:  # shown, never raised: no traceback reaches the screen
            self.edge.deliver(self._stats, f"[red]error: {problem(exc)}[/]")
        finally:
            self.stream = None
            self.edge.deliver(self._append, "\n\n")

    def action_stop(self) -> None:
        """Esc: stop the reply if one is coming, else leave the prompt (so the tab keys
        work again)."""
        if self.stream is not None:
            self.stream.close()  # closing the connection cancels the generation
        else:
            self.query_one("#play-scroll").focus()
