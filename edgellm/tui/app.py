"""``edgellm tui``: the operator's view of the appliance, over the socket.

One worker polls the daemon every second (the snapshot every tab shares, plus the
shown tab's own data); actions run in workers of their own, so input never waits on
the daemon. When the daemon cannot be reached, a panel says why and what to do, and
the poll keeps retrying.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane

from edgellm.client import Client
from edgellm.tui.access import Access
from edgellm.tui.activity import Audit, Requests
from edgellm.tui.dashboard import Dashboard
from edgellm.tui.data import LEVEL_STYLES, Snapshot, problem, take_snapshot
from edgellm.tui.dialogs import Help
from edgellm.tui.models import Models
from edgellm.tui.playground import Playground
from edgellm.tui.widgets import Pane

TABS = [
    ("dashboard", "Dashboard", Dashboard),
    ("models", "Models", Models),
    ("requests", "Requests", Requests),
    ("audit", "Audit", Audit),
    ("playground", "Playground", Playground),
    ("access", "Access", Access),
]

KEYS = """[b]edgellm tui: keys[/b]

[b]Everywhere[/b]
  1-6          Dashboard, Models, Requests, Audit, Playground, Access
  ↑ ↓ / j k    move in a table       Enter   details
  s            sort by the next column (or click a header)
  ctrl+p       command palette       ?       this help
  Esc          back / close          q       quit

[b]Models[/b]     l load   u unload   p pin/unpin   v verify   i import   d remove   / filter
[b]Requests[/b]   c cancel the selected request
[b]Audit[/b]      / filter (user=… action=… decision=… model=…)   v verify the chain
[b]Playground[/b] Enter sends the prompt; Esc stops the reply or leaves the prompt
[b]Access[/b]     g grant a role   r revoke the selected grant (admins)

What you may do is what your role allows: a denied action shows the daemon's
reason. The view refreshes every second."""


class EdgeApp(App[None]):
    TITLE = "edgellm"
    CSS = """
    #banner { display: none; padding: 1 2; background: $error 30%; border: heavy $error; }
    /* the tabs take what the banner and footer leave: the screen itself never
       scrolls, so focusing a table cannot push the banner off the top */
    TabbedContent, TabbedContent > ContentSwitcher { height: 1fr; }
    #health { padding: 0 1; background: $boost; }
    .gauges { height: 3; }
    Table { height: 1fr; }
    #models-filter, #audit-filter { display: none; }
    #models-filter:focus, #audit-filter:focus { display: block; }
    #play-scroll { height: 1fr; border: round $primary; }
    #play-stats { color: $text-muted; }
    """ + "".join(
        f"\n.level-{name} #health {{ border-left: thick {colour}; }}"
        for name, colour in LEVEL_STYLES.items()
    ).replace("_", "")
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
        self.push_screen(Help(KEYS))

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


def run(socket: str | None = None) -> None:
    EdgeApp(socket).run()
