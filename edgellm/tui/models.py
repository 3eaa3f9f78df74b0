"""The catalog: every model in the vault, sortable and filterable, with the actions an
operator takes on them. Destructive ones ask first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Input

from edgellm.tui.dialogs import Confirm, Form, Help
from edgellm.tui.widgets import Pane, Table

UNPINNED_KEEP_ALIVE = "5m"


class Models(Pane):
    BINDINGS = [
        Binding("l", "load", "Load"),
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

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter by name (Enter: apply, Esc: clear)", id="models-filter")
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
        return client.models()

    def show(self, data: Any) -> None:
        self.catalog = data
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

    # --- actions ------------------------------------------------------------------------
    def _selected(self) -> str | None:
        name = self.query_one(Table).selected_key()
        if name is None:
            self.notify("no model selected", severity="warning")
        return name

    def action_load(self) -> None:
        if name := self._selected():
            self.act(f"{name} loaded", lambda c: c.load(name))

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
