"""``edgellm tui``: the operator's view of the appliance, over the socket.

One worker polls the daemon every second (the snapshot every tab shares, plus the
shown tab's own data); actions run in workers of their own, so input never waits on
the daemon. When the daemon cannot be reached, a panel says why and what to do, and
the poll keeps retrying.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane
from textual.worker import WorkerFailed

from edgellm.client import Client
from edgellm.tui.access import Access
from edgellm.tui.activity import Audit, Requests
from edgellm.tui.dashboard import Dashboard
from edgellm.tui.data import LEVEL_STYLES, Snapshot, problem, take_snapshot
from edgellm.tui.dialogs import Help
from edgellm.tui.models import Models
from edgellm.tui.playground import Playground
from edgellm.tui.widgets import Pane, Table

TABS: list[tuple[str, str, type[Pane]]] = [
    ("dashboard", "Dashboard", Dashboard),
    ("models", "Models", Models),
    ("requests", "Requests", Requests),
    ("audit", "Audit", Audit),
    ("playground", "Playground", Playground),
    ("access", "Access", Access),
]

AFTER_KEYS = """What you may do is what your role allows: a denied action shows
the daemon's reason. The view refreshes every second."""


def key_help(app: App[Any]) -> str:
    """The help page, from the key bindings themselves: a key added to a tab is in it."""

    def keys(binding: Binding) -> str:
        return "/".join(
            app.get_key_display(Binding(k.strip(), binding.action)) for k in binding.key.split(",")
        )

    def entries(bindings: Iterable[Any]) -> list[str]:
        return [
            f"{keys(b)} {b.tooltip or b.description.lower()}"
            for b in bindings
            if isinstance(b, Binding) and not b.action.startswith("show_tab")
        ]

    def rows(label: str, items: list[str], width: int = 71) -> list[str]:
        """``label`` then the items, wrapped under each other past the label."""
        indent = 13
        out = [f"{label:<{indent}}"]
        for item in items:
            if len(out[-1].rstrip()) > indent and len(out[-1]) + len(item) > width:
                out.append(" " * indent)
            out[-1] += item + "   "
        out[0] = f"[b]{label}[/b]" + out[0][len(label) :]
        return [row.rstrip() for row in out]

    titles = ", ".join(title for _, title, _ in TABS)
    lines = ["[b]edgellm tui: keys[/b]", ""]
    lines += rows(
        "Everywhere",
        [
            f"1-{len(TABS)} {titles}",
            "↑/↓ move",
            *entries(Table.BINDINGS),
            f"{app.get_key_display(Binding(app.COMMAND_PALETTE_BINDING, ''))} command palette",
            *entries(EdgeApp.BINDINGS),
        ],
    )
    for _, title, pane in TABS:
        if own := entries(pane.BINDINGS):
            lines += rows(title, own)
    return "\n".join([*lines, "", AFTER_KEYS])


class EdgeApp(App[None]):
    TITLE = "edgellm"
    CSS_PATH = Path(__file__).with_name("edgellm.tcss")  # also for subclasses elsewhere
    BINDINGS = [
        *[
            Binding(str(i + 1), f"show_tab('{tab}')", title, show=False)
            for i, (tab, title, _) in enumerate(TABS)
        ],
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, socket: str | Path | None = None, poll_interval: float = 1.0) -> None:
        super().__init__()
        self.client = Client(socket, timeout=30)
        self.socket = self.client.socket
        self.poll_interval = poll_interval
        self.snapshot = Snapshot()
        self.down: str | None = None  # why the daemon cannot be used, while it cannot
        self.polls_shown = 0  # polls whose outcome is on screen (tests wait on it)

    def compose(self) -> ComposeResult:
        yield Static("", id="banner")
        with TabbedContent(initial="dashboard"):
            for tab, title, pane in TABS:
                with TabPane(title, id=tab):
                    yield pane(id=f"pane-{tab}")
        yield Footer()

    def on_mount(self) -> None:
        self.poll()
        self.set_interval(self.poll_interval, self.poll)

    # --- polling ------------------------------------------------------------------------
    @property
    def main(self) -> Screen:
        """The screen with the tabs (a dialog may be on top of it)."""
        return self.screen_stack[0]

    def active_pane(self) -> Pane:
        return self.main.query_one(f"#pane-{self.main.query_one(TabbedContent).active}", Pane)

    def poll(self) -> None:
        with contextlib.suppress(NoMatches):  # not composed yet, or closing
            self.fetch(self.active_pane())

    @work(thread=True, exclusive=True, group="poll")
    def fetch(self, pane: Pane) -> None:
        try:
            snapshot = take_snapshot(self.client)
            data = pane.fetch(self.client)
        except Exception as exc:  # any failure is a panel, never a traceback
            self.deliver(self.show_problem, problem(exc))
            return
        self.deliver(self.show_snapshot, snapshot, pane, data)

    def deliver(self, show: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """From a worker thread: run ``show`` on the UI, unless the app is closing."""

        def guarded() -> None:
            with contextlib.suppress(NoMatches):  # the widgets are being torn down
                show(*args, **kw)

        with contextlib.suppress(RuntimeError):  # the app has stopped
            self.call_from_thread(guarded)

    def show_snapshot(self, snapshot: Snapshot, pane: Pane, data: Any) -> None:
        self.snapshot, self.down = snapshot, None
        banner = self.main.query_one("#banner", Static)
        banner.remove_class("down")
        banner.display = False
        level = (snapshot.governor or {}).get("level", "unknown")
        for name in LEVEL_STYLES:
            self.main.set_class(name == level, f"level-{name}")
        self.sub_title = f"{self.socket} · {level}"
        for _, _, kind in TABS:
            self.main.query_one(kind).on_snapshot(snapshot)
        pane.show(data)
        self.polls_shown += 1

    def show_problem(self, message: str) -> None:
        banner = self.main.query_one("#banner", Static)
        banner.update(
            f"[b]The daemon cannot be used right now[/b]\n{message}\n"
            f"[dim]retrying every {self.poll_interval:g}s…[/dim]"
        )
        banner.add_class("down")
        banner.display = True  # set, not only styled: the layout is redone at once
        self.down = message  # once it shows
        self.polls_shown += 1

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        pane = self.active_pane()
        target = (
            pane.query("#play-input").first()
            if isinstance(pane, Playground)
            else pane.query(DataTable).first()
        )
        target.focus()  # the tab's keys work at once
        self.poll()

    # --- actions ------------------------------------------------------------------------
    @work(thread=True, group="act")
    def act(self, done: str, call: Callable[[Client], Any]) -> None:
        """Run ``call(client)`` off the UI thread; say ``done`` (or what it returned)
        or the daemon's reason for refusing."""
        try:
            result = call(self.client)
        except Exception as exc:  # the daemon's reason, as one line
            self.deliver(self.notify, problem(exc), title="Refused", severity="error", timeout=8)
            return
        message = result if isinstance(result, str) and result else done
        if message:
            self.deliver(self.notify, message, timeout=4)
        self.deliver(self.poll)

    def action_show_tab(self, tab: str) -> None:
        if self.screen is self.main:
            self.main.query_one(TabbedContent).active = tab

    def action_help(self) -> None:
        self.push_screen(Help(key_help(self)))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for tab, title, _ in TABS:
            yield SystemCommand(
                f"Go to {title}", f"Show the {title} tab", lambda tab=tab: self.action_show_tab(tab)
            )
        yield SystemCommand(
            "Verify the audit chain",
            "Check every row of the audit log",
            lambda: self.main.query_one(Audit).action_verify(),
        )
        yield SystemCommand("Refresh", "Poll the daemon now", self.poll)

    def on_unmount(self) -> None:
        self.client.close()

    def _fatal_error(self) -> None:
        """An error of the TUI's own ends it with one line and exit status 1 (Textual
        sets it); the traceback goes to a file for a bug report, not on the screen."""
        exc = self._exception or sys.exc_info()[1]
        if isinstance(exc, WorkerFailed):  # the error a worker of ours raised
            exc = exc.error
        where = crash_log()
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            with open(where, "a") as f:
                f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
                f.write("".join(traceback.format_exception(exc)) if exc else "no exception\n")
            saved = f"; the traceback is in {where}"
        except OSError as err:
            saved = f" (its traceback could not be saved to {where}: {err.strerror})"
        self.bell()
        self._exit_renderables.append(
            f"error: edgellm tui stopped on an internal error ({type(exc).__name__}: {exc}){saved}"
        )
        self._close_messages_no_wait()


def crash_log() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("edgellm")) / "tui-crash.log"


def run(socket: str | None = None) -> int:
    """The TUI until it quits; its exit status (1 after an internal error)."""
    app = EdgeApp(socket)
    app.run()
    return app.return_code or 0
