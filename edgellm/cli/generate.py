"""Serving and asking: serve, ask, chat, ps, status."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgellm.cli.base import (
    client,
    emit,
    friendly,
    json_option,
    load_settings,
    main,
    socket_option,
    table,
)


# --- serve -------------------------------------------------------------------------------
@main.command()
@socket_option
@click.option(
    "--state-dir",
    envvar="EDGELLM_STATE_DIR",
    type=click.Path(),
    help="Models and state [env EDGELLM_STATE_DIR].",
)
@click.option(
    "--config",
    "config_file",
    envvar="EDGELLM_CONFIG",
    type=click.Path(),
    help="edgellm.toml to read [env EDGELLM_CONFIG].",
)
@click.option("--model", "-m", "default_model", help="The default model (pulled if missing).")
@click.option(
    "--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)
)
@click.option("--no-pull", is_flag=True, help="Do not fetch the default model if missing.")
@click.option(
    "--listen",
    multiple=True,
    help="Also listen on tcp://HOST:PORT (repeatable; callers need a bearer token, "
    "and a non-loopback address needs TLS) [setting listen].",
)
@click.option(
    "--governor-trace",
    type=click.Path(exists=True, dir_okay=False),
    envvar="EDGELLM_GOVERNOR_TRACE",
    help="Replay sensor readings from this JSON-lines trace (a rehearsal) "
    "[env EDGELLM_GOVERNOR_TRACE].",
)
@friendly
def serve(
    socket: str | None,
    state_dir: str | None,
    config_file: str | None,
    default_model: str | None,
    log_level: str | None,
    no_pull: bool,
    listen: tuple[str, ...],
    governor_trace: str | None,
) -> None:
    """Run the daemon in the foreground (Ctrl-C stops it cleanly)."""
    from edgellm.runtime import failpoints
    from edgellm.server.daemon import serve as run

    failpoints.configure(os.environ.get("EDGELLM_FAILPOINTS"))  # a rehearsal of faults
    if governor_trace:
        from edgellm.governor.trace import load_trace

        load_trace(Path(governor_trace))  # a bad trace stops here, by line number
        os.environ["EDGELLM_GOVERNOR_TRACE"] = str(Path(governor_trace).resolve())

    flags = {
        "socket": socket,
        "state_dir": state_dir,
        "default_model": default_model,
        "log_level": log_level.upper() if log_level else None,
        "listen": list(listen) or None,
    }
    config = Path(config_file) if config_file else None
    settings = load_settings(config, flags)
    sys.exit(run(settings, pull_default=not no_pull, reload=lambda: load_settings(config, flags)))


# --- generation ----------------------------------------------------------------------------
def _gen_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            socket_option,
            click.option("--model", "-m", help="Model to use (default: the daemon's default)."),
            click.option("--system", "-s", help="A system prompt."),
            click.option("--max-tokens", type=click.IntRange(min=1)),
            click.option("--temperature", type=click.FloatRange(0, 2)),
            click.option("--seed", type=int),
        ]
    ):
        fn = option(fn)
    return fn


@main.command()
@click.argument("prompt")
@_gen_options
@click.option(
    "--verbose", "-v", is_flag=True, help="After the answer: tokens, first-token time, rate."
)
@json_option
@friendly
def ask(
    prompt: str,
    socket: str | None,
    model: str | None,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    seed: int | None,
    verbose: bool,
    as_json: bool,
) -> None:
    """Ask one question; the answer streams as it is generated."""
    from edgellm.cli.chat import stream_answer

    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    with client(socket) as c:
        if as_json:
            click.echo(json.dumps(c.chat(messages, model=model, **params), indent=2))
            return
        _, stats, stream = stream_answer(c, messages, model, params)
        if stream.finish_reason not in ("stop", None):
            click.echo(f"[finished: {stream.finish_reason}]", err=True)
        if verbose:
            for line in stats.lines():
                click.echo(line, err=True)


@main.command()
@_gen_options
@click.option("--verbose", "-v", is_flag=True, help="Figures after every answer (/set verbose).")
@friendly
def chat(
    socket: str | None,
    model: str | None,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    seed: int | None,
    verbose: bool,
) -> None:
    """Chat interactively (/help lists the commands); Ctrl-C stops an answer, Ctrl-D or
    /exit leaves."""
    from edgellm.cli.chat import Conversation, run_chat

    params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    with client(socket) as c:
        c.health()  # fail early, with the clear message, if no daemon is there
        options = {k: v for k, v in params.items() if v is not None}
        run_chat(Conversation(c, model, options, system=system, verbose=verbose))


# --- state -----------------------------------------------------------------------------------
@main.command()
@socket_option
@json_option
@friendly
def ps(socket: str | None, as_json: bool) -> None:
    """Loaded models: memory, slots, idle timers."""
    with client(socket) as c:
        models = c.ps()

    def human(rows: list[dict[str, Any]]) -> None:
        if not rows:
            click.echo("no models loaded")
            return
        table(
            [
                [
                    m["name"],
                    f"{m['memory_mb']:.0f} MB",
                    f"{m['slots_busy']}/{m['slots']}",
                    m["queued"],
                    m["device"],
                    "pinned"
                    if m["pinned"]
                    else (
                        f"{m['expires_in_seconds']:.0f}s"
                        if m["expires_in_seconds"] is not None
                        else "busy"
                    ),
                ]
                for m in rows
            ],
            ["NAME", "MEMORY", "SLOTS", "QUEUED", "DEVICE", "UNLOAD IN"],
        )

    emit(models, as_json, human)


@main.command()
@socket_option
@json_option
@friendly
def status(socket: str | None, as_json: bool) -> None:
    """Is the daemon up, and how is it doing?"""
    with client(socket) as c:
        health, loaded = c.health(), c.ps()
    data = {**health, "loaded": loaded, "socket": str(c.socket)}

    def human(d: dict[str, Any]) -> None:
        click.echo(
            f"edgellm {d['version']}: {d['status']} on {d['socket']} "
            f"(up {d['uptime_seconds']:.0f}s)"
        )
        click.echo(f"requests: {d['active_requests']} active, {d['queue_depth']} queued")
        for name, state in d["models"].items():
            click.echo(f"  {name}: {state}")

    emit(data, as_json, human)


@main.command("socket")
@socket_option
@friendly
def socket_path(socket: str | None) -> None:
    """Print the socket path the other commands use (for curl --unix-socket, or a
    client of your own): --socket, else EDGELLM_SOCKET, else the configured one."""
    from edgellm.client import resolve_socket

    click.echo(resolve_socket(socket))


# --- models ------------------------------------------------------------------------------------
