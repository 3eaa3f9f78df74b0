"""``edgellm tui``: the terminal UI (a client of the socket like any other command)."""

from __future__ import annotations

import sys

from edgellm.cli.base import chosen_socket, friendly, main, socket_option


@main.command()
@socket_option
@friendly
def tui(socket: str | None) -> None:
    """The operator's terminal UI: dashboard, models, requests, audit, playground,
    access. Keys: 1-6 switch tabs, ? lists every key, q quits."""
    from edgellm.tui.app import run

    sys.exit(run(chosen_socket(socket)))
