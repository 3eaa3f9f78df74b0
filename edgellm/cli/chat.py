"""``edgellm chat``: a conversation at the terminal, with slash commands to steer it.

Every line that starts with ``/`` is a command here, never a message to the model: a
mistyped command is an error, not a prompt (``//`` sends a line that starts with one
slash). A refused turn (a bad ``/set`` value the daemon rejects, say) leaves the
conversation as it was.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from edgellm.client import SAMPLING_OPTIONS, ChatStream, Client
from edgellm.errors import EdgeError


@dataclass
class Stats:
    """One answer's figures: tokens from the daemon's usage, times measured here (the
    first token's wait is what this terminal saw, socket included)."""

    prompt_tokens: int
    completion_tokens: int
    first_token_s: float | None
    total_s: float
    decode_s: float | None = None  # the daemon's own decode time, when it gave one

    @classmethod
    def of(cls, stream: ChatStream, started: float, first: float | None, ended: float) -> Stats:
        usage = stream.usage or {}
        timings = stream.timings or {}
        decode_ms = timings.get("predicted_ms")
        return cls(
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            first_token_s=None if first is None else first - started,
            total_s=ended - started,
            decode_s=None if decode_ms is None else float(decode_ms) / 1000,
        )

    def rate(self) -> float | None:
        """Tokens per second while generating: after the first token, by the daemon's
        clock when it said, else by this terminal's."""
        if self.decode_s:
            return self.completion_tokens / self.decode_s
        if self.first_token_s is None or self.completion_tokens < 2:
            return None
        span = self.total_s - self.first_token_s
        return (self.completion_tokens - 1) / span if span > 0 else None

    def lines(self) -> list[str]:
        rate = self.rate()
        first = "-" if self.first_token_s is None else f"{self.first_token_s * 1000:.0f} ms"
        return [
            f"prompt tokens:     {self.prompt_tokens}",
            f"generated tokens:  {self.completion_tokens}",
            f"first token after: {first}",
            f"generation rate:   {'-' if rate is None else f'{rate:.1f} tokens/s'}",
            f"total time:        {self.total_s:.2f} s",
        ]


def stream_answer(
    c: Client, messages: list[dict[str, Any]], model: str | None, params: dict[str, Any]
) -> tuple[str, Stats, ChatStream]:
    """Print the answer as it comes; return it with its figures. Ctrl-C stops it (the
    daemon sees the disconnect and frees the slot) and keeps what came."""
    stream = c.chat(messages, model=model, stream=True, **params)
    started, first = time.monotonic(), None
    pieces: list[str] = []
    try:
        for piece in stream:
            first = first or time.monotonic()
            pieces.append(piece)
            click.echo(piece, nl=False)
    except KeyboardInterrupt:
        stream.close()
        click.echo("\n[cancelled]", err=True)
    else:
        click.echo()
    return "".join(pieces), Stats.of(stream, started, first, time.monotonic()), stream


@dataclass
class Conversation:
    client: Client
    model: str | None
    params: dict[str, Any]
    system: str | None = None
    verbose: bool = False
    history: list[dict[str, str]] = field(default_factory=list)  # user and assistant turns
    last: Stats | None = None
    done: bool = False

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    # --- the commands ---------------------------------------------------------------
    def cmd_help(self, arg: str) -> None:
        """/help            this list (also /?)"""
        for name in COMMANDS:
            doc = (getattr(Conversation, f"cmd_{name}").__doc__ or "").splitlines()[0]
            click.echo(f"  {doc}", err=True)
        click.echo(f"  options for /set: {', '.join(SAMPLING_OPTIONS)}, verbose", err=True)
        click.echo("  //text          send a line that starts with '/'", err=True)

    def cmd_set(self, arg: str) -> None:
        """/set NAME VALUE  a sampling option (/set alone shows them; VALUE 'default' unsets)"""
        if not arg:
            shown = {k: v for k, v in self.params.items() if v is not None}
            click.echo(f"  model: {self.model or '(the daemon default)'}", err=True)
            for name, value in shown.items() or [("(options)", "the daemon's defaults")]:
                click.echo(f"  {name}: {value}", err=True)
            click.echo(f"  verbose: {'on' if self.verbose else 'off'}", err=True)
            return
        name, _, value = arg.partition(" ")
        value = value.strip()
        if name == "verbose":  # Ollama's spelling of /stats after every answer
            self.verbose = value.lower() not in ("off", "false", "0", "no")
            click.echo(f"verbose {'on' if self.verbose else 'off'}", err=True)
            return
        if name not in SAMPLING_OPTIONS:
            known = ", ".join(SAMPLING_OPTIONS)
            raise click.UsageError(f"no option {name!r} to set; the options are: {known}, verbose")
        if not value:
            raise click.UsageError(f"/set {name} needs a value (or 'default')")
        if value == "default":
            self.params.pop(name, None)
            click.echo(f"{name}: the daemon's default", err=True)
            return
        try:
            self.params[name] = SAMPLING_OPTIONS[name](value)
        except ValueError:
            kind = SAMPLING_OPTIONS[name].__name__
            raise click.UsageError(f"{name} takes a number ({kind}), not {value!r}") from None
        click.echo(f"{name} = {self.params[name]}", err=True)

    def cmd_system(self, arg: str) -> None:
        """/system TEXT     set the system prompt (alone: show it; /system - removes it)"""
        if not arg:
            click.echo(f"  system: {self.system or '(none)'}", err=True)
            return
        self.system = None if arg == "-" else arg
        click.echo(
            "system prompt removed" if self.system is None else "system prompt set", err=True
        )

    def cmd_clear(self, arg: str) -> None:
        """/clear           forget the conversation (the system prompt stays)"""
        self.history.clear()
        click.echo("conversation cleared", err=True)

    def cmd_model(self, arg: str) -> None:
        """/model NAME      talk to another model (alone: show which)"""
        if not arg:
            click.echo(f"  model: {self.model or '(the daemon default)'}", err=True)
            return
        record = self.client.model(arg)  # refused here, by name, if there is none
        if record.get("format") != "gguf":
            raise click.UsageError(
                f"{arg} is a {record.get('format')} model; chat needs a GGUF one"
            )
        self.model = arg
        click.echo(f"now talking to {arg}", err=True)

    def cmd_save(self, arg: str) -> None:
        """/save FILE       write the conversation to FILE as JSON"""
        if not arg:
            raise click.UsageError("/save needs a file name")
        path = Path(arg).expanduser()
        document = {"model": self.model, "options": self.params, "messages": self.messages()}
        path.write_text(json.dumps(document, indent=2) + "\n")
        click.echo(f"saved {len(self.history)} messages to {path}", err=True)

    def cmd_stats(self, arg: str) -> None:
        """/stats           the last answer's tokens, first-token time and rate"""
        if self.last is None:
            click.echo("no answer yet", err=True)
            return
        for line in self.last.lines():
            click.echo(f"  {line}", err=True)

    def cmd_exit(self, arg: str) -> None:
        """/exit            leave (also /bye, /quit, Ctrl-D)"""
        self.done = True

    # --- a line -----------------------------------------------------------------------
    def handle(self, line: str) -> None:
        text = line.strip()
        if not text:
            return
        if text.startswith("/") and not text.startswith("//"):
            word, _, arg = text[1:].partition(" ")
            name = ALIASES.get(word, word)
            if name not in COMMANDS:
                raise click.UsageError(f"unknown command /{word}; /help lists them")
            getattr(self, f"cmd_{name}")(arg.strip())
            return
        self.turn(line[1:] if text.startswith("//") else line)

    def turn(self, prompt: str) -> None:
        asked = [*self.messages(), {"role": "user", "content": prompt}]
        answer, stats, _ = stream_answer(self.client, asked, self.model, self.params)
        self.history += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
        self.last = stats
        if self.verbose:
            for line in stats.lines():
                click.echo(line, err=True)


COMMANDS = ("help", "set", "system", "clear", "model", "save", "stats", "exit")
ALIASES = {"?": "help", "bye": "exit", "quit": "exit"}


def run_chat(conversation: Conversation) -> None:
    click.echo(
        "edgellm chat — /help for commands; Ctrl-C stops an answer, Ctrl-D or /exit leaves.",
        err=True,
    )
    while not conversation.done:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        try:
            conversation.handle(line)
        except click.UsageError as exc:
            click.echo(f"error: {exc.message}", err=True)
        except EdgeError as exc:  # the daemon refused this turn; the conversation stays
            click.echo(f"error: {exc.message}", err=True)
