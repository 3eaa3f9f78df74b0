"""The catalog: every model in the vault, and the catalog's models not pulled yet,
sortable and filterable, with the actions an operator takes on them. Destructive ones
ask first. Long work shows its progress above the table: this terminal's own pull
(fetch, check, build, upload) and every import or pull the daemon is doing for anyone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Input, Static

from edgellm.progress import size
from edgellm.tui.data import optional
from edgellm.tui.dialogs import Confirm, Form, Help
from edgellm.tui.widgets import Pane, Table

UNPINNED_KEEP_ALIVE = "5m"


class Models(Pane):
    BINDINGS = [
        Binding("l", "load", "Load"),
        Binding("f", "pull", "Pull", tooltip="pull (fetch) a catalog model into the vault"),
        Binding("u", "unload", "Unload"),
        Binding("p", "pin", "Pin/unpin"),
        Binding("v", "verify", "Verify"),
        Binding("i", "import_model", "Import"),
        Binding("d,delete", "remove", "Remove"),
        Binding("slash", "filter", "Filter"),
        Binding("enter", "details", "Details"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.catalog: list[dict[str, Any]] = []
        self.not_pulled: list[dict[str, Any]] = []
        self.jobs: list[dict[str, Any]] = []  # the daemon's
        self.pulling: dict[str, dict[str, Any]] = {}  # this terminal's, by model

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter by name (Enter: apply, Esc: clear)", id="models-filter")
        yield Static("", id="models-jobs")
        yield Static("", id="models-catalog")
        yield Table(
            [
                ("name", "Name"),
                ("format", "Format"),
                ("size_mb", "Size MB"),
                ("quantization", "Quant"),
                ("state", "State"),
                ("pinned", "Pinned"),
                ("encrypted", "Encrypted"),
            ],
            id="models-table",
        )

    def fetch(self, client: Any) -> Any:
        from edgellm.catalog import Catalog

        models = client.models()
        stored = {m["name"] for m in models}
        catalog = [vars(m) for m in Catalog().list() if m.name not in stored]
        return models, catalog, optional(client.jobs) or []

    def show(self, data: Any) -> None:
        self.catalog, self.not_pulled, self.jobs = data
        self.redraw()

    def on_snapshot(self, snapshot: Any) -> None:
        self.redraw()

    def redraw(self) -> None:
        loaded = {m["name"]: m for m in self.edge.snapshot.loaded}
        text = self.query_one("#models-filter", Input).value.strip().lower()
        self.query_one(Table).show(
            [
                {
                    "name": m["name"] + (" *" if m.get("default") else ""),
                    "key": m["name"],
                    "format": m["format"],
                    "size_mb": round(m["size"] / 2**20, 1),
                    "quantization": m.get("quantization") or "-",
                    "state": m.get("state"),
                    "pinned": bool(loaded.get(m["name"], {}).get("pinned")),
                    "encrypted": True,
                }  # the vault holds every model encrypted at rest
                for m in self.catalog
                if text in m["name"].lower()
            ],
            key="key",
        )
        waiting = [m["name"] for m in self.not_pulled if m["name"] not in self.pulling]
        catalog = self.query_one("#models-catalog", Static)
        catalog.update(
            f"in the catalog, not pulled yet: {', '.join(waiting)}   (f pulls one)"
            if waiting
            else ""
        )
        catalog.display = bool(waiting)
        lines = [progress_line("pull", name, job) for name, job in self.pulling.items()] + [
            progress_line(j["kind"], j["name"], j) for j in self.jobs
        ]
        panel = self.query_one("#models-jobs", Static)
        panel.update("\n".join(lines))
        panel.display = bool(lines)  # no empty line when nothing is going on

    # --- actions ------------------------------------------------------------------------
    def _selected(self) -> str | None:
        name = self.query_one(Table).selected_key()
        if name is None:
            self.notify("no model selected", severity="warning")
        return name

    def action_load(self) -> None:
        if name := self._selected():
            self.act(f"{name} loaded", lambda c: c.load(name))

    def action_pull(self) -> None:
        waiting = [m["name"] for m in self.not_pulled if m["name"] not in self.pulling]
        if not waiting:
            self.notify("every catalog model is in the vault already", severity="warning")
            return

        def submitted(values: dict[str, str] | None) -> None:
            name = (values or {}).get("name", "").strip()
            if not name:
                return
            if name not in waiting:
                self.notify(f"{name} is not a catalog model waiting to be pulled", severity="error")
                return
            self.pulling[name] = {"phase": "starting", "completed": 0, "total": None}
            self.redraw()
            self.act("", lambda c: self._pull(c, name))

        self.app.push_screen(
            Form(
                "Pull a catalog model",
                [("name", f"Which (not pulled yet: {', '.join(waiting)})", waiting[0])],
            ),
            submitted,
        )

    def _pull(self, client: Any, name: str) -> str:
        """In a worker: fetch and check (and build) here, then send it to the vault,
        the progress of each phase shown above the table as it goes."""
        from edgellm.catalog import Catalog, prepare, send_pulled
        from edgellm.config import load_settings

        job = self.pulling[name]

        def report(phase: str, completed: int = 0, total: int | None = None) -> None:
            job.update(phase=phase, completed=completed, total=total)
            self.edge.deliver(self.redraw)

        try:
            manifest = Catalog().get(name)
            path = prepare(manifest, load_settings().cache_dir, report)
            with client.like(timeout=600) as sender:
                send_pulled(sender, manifest, path, report)
        finally:
            self.pulling.pop(name, None)
            self.edge.deliver(self.redraw)
        return f"{name} pulled (sha256 {manifest.sha256[:12]}… verified) into the vault"

    def action_unload(self) -> None:
        if name := self._selected():
            self.act(f"{name} unloaded", lambda c: c.unload(name))

    def action_pin(self) -> None:
        if not (name := self._selected()):
            return
        row = self.query_one(Table).selected_row("key") or {}
        if row.get("pinned"):
            self.act(
                f"{name} unpinned (keep-alive {UNPINNED_KEEP_ALIVE})",
                lambda c: c.load(name, keep_alive=UNPINNED_KEEP_ALIVE),
            )
        else:
            self.act(f"{name} loaded and pinned", lambda c: c.load(name, keep_alive=-1))

    def action_verify(self) -> None:
        if not (name := self._selected()):
            return

        def verify(c: Any) -> str:
            bad = {b["name"]: b["problem"] for b in c.vault_verify()["bad"]}
            if name in bad:
                raise ValueError(f"{name} failed verification: {bad[name]}")
            return f"{name} verified: its bytes match its checksum and authenticate"

        self.act("", verify)

    def action_import_model(self) -> None:
        def submitted(values: dict[str, str] | None) -> None:
            if not values or not values["path"]:
                return
            path = Path(values["path"]).expanduser()
            name = values["name"] or path.stem.lower()
            self.act(f"{name} imported from {path}", lambda c: c.import_model(name, path))

        self.app.push_screen(
            Form(
                "Import a model",
                [
                    (
                        "path",
                        "Path to a .gguf or .onnx file, or an ONNX model directory (read by "
                        "this terminal, sent over the socket)",
                        "",
                    ),
                    ("name", "Name in the catalog (empty: from the file name)", ""),
                ],
            ),
            submitted,
        )

    def action_remove(self) -> None:
        if not (name := self._selected()):
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.act(f"{name} removed", lambda c: c.remove_model(name))

        self.app.push_screen(
            Confirm(f"Remove {name} from the vault? Its encrypted bytes are deleted."), confirmed
        )

    def action_filter(self) -> None:
        self.query_one("#models-filter", Input).focus()

    def action_clear_filter(self) -> None:
        self.query_one("#models-filter", Input).value = ""
        self.redraw()
        self.query_one(Table).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.redraw()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(Table).focus()

    def action_details(self) -> None:
        if name := self._selected():
            self.act(
                "",
                lambda c: self.edge.deliver(
                    self.app.push_screen,
                    Help(Text(f"{name}\n\n" + json.dumps(c.model(name), indent=2))),
                ),
            )

    def on_data_table_row_selected(self, event: Any) -> None:
        self.action_details()


def progress_line(kind: str, name: str, job: dict[str, Any], width: int = 24) -> str:
    """One piece of long work as a line: what, which phase, a bar and the figures."""
    total, done = job.get("total"), job.get("completed") or 0
    if not total:
        return f"[b]{kind}[/b] {name}: {job['phase']}…"
    filled = round(width * min(done / total, 1.0))
    bar = "█" * filled + "░" * (width - filled)
    rate = job.get("per_second")
    speed = f", {size(rate)}/s" if rate else ""
    return (
        f"[b]{kind}[/b] {name}: {job['phase']} [green]{bar}[/] "
        f"{size(done)} of {size(total)} ({100 * done / total:.0f}%{speed})"
    )
