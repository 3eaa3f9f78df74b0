"""What the appliance is doing and has done: requests in flight, and the audit log."""

from __future__ import annotations

import json
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Input, Static

from edgellm.errors import InvalidRequest
from edgellm.tui.dialogs import Help
from edgellm.tui.widgets import Pane, Table

AUDIT_FILTERS = ("user", "action", "decision", "model")


class Requests(Pane):
    BINDINGS = [Binding("c", "cancel", "Cancel request"), Binding("enter", "details", "Details")]

    def compose(self) -> ComposeResult:
        yield Static("", id="requests-note")
        yield Table(
            [
                ("id", "Id"),
                ("user", "User"),
                ("model", "Model"),
                ("state", "State"),
                ("tokens", "Tokens"),
                ("age", "Age s"),
            ],
            id="requests-table",
        )

    def on_snapshot(self, snapshot: Any) -> None:
        rows = snapshot.requests
        note = self.query_one("#requests-note", Static)
        if rows is None:
            note.update(
                "You may see only your own requests' results, not the daemon's list "
                "(it needs an operator or admin role)."
            )
            rows = []
        else:
            note.update(f"{len(rows)} in flight   (c: cancel the selected one)")
        self.query_one(Table).show(
            [
                {
                    "id": r["id"],
                    "user": r.get("user") or r.get("uid", "-"),
                    "model": r["model"],
                    "state": r["state"],
                    "tokens": r["completion_tokens"],
                    "age": round(r["age_seconds"], 1),
                }
                for r in rows
            ],
            key="id",
        )

    def action_cancel(self) -> None:
        request_id = self.query_one(Table).selected_key()
        if request_id is None:
            self.notify("no request selected", severity="warning")
            return
        self.act(f"{request_id} cancelled", lambda c: c.cancel(request_id))

    def action_details(self) -> None:
        row = self.query_one(Table).selected_row("id")
        if row:
            self.app.push_screen(Help(Text(json.dumps(row, indent=2))))

    def on_data_table_row_selected(self, event: Any) -> None:
        self.action_details()


def parse_filters(text: str) -> dict[str, str]:
    """``user=alice action=model.load`` → filters for /api/audit."""
    out = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if not sep or key not in AUDIT_FILTERS or not value:
            raise InvalidRequest(
                f"bad filter {word!r}: use KEY=VALUE with KEY one of {', '.join(AUDIT_FILTERS)}"
            )
        out[key] = value
    return out


class Audit(Pane):
    BINDINGS = [
        Binding("v", "verify", "Verify chain"),
        Binding("slash", "filter", "Filter", tooltip="filter (user=… action=… decision=… model=…)"),
        Binding("enter", "details", "Details"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def compose(self) -> ComposeResult:
        yield Input(
            placeholder="filter: user=NAME action=ACTION decision=allow|deny "
            "model=NAME (Enter: apply)",
            id="audit-filter",
        )
        yield Static("newest first; v verifies the hash chain", id="audit-verify")
        yield Table(
            [
                ("seq", "Seq"),
                ("time", "Time"),
                ("user", "User"),
                ("action", "Action"),
                ("resource", "Resource"),
                ("decision", "Decision"),
                ("status", "Status"),
            ],
            id="audit-table",
        )

    filters: dict[str, str] = {}  # applied on Enter; read by the poll worker

    def fetch(self, client: Any) -> Any:
        return client.audit(limit=200, order="newest", **self.filters)

    def on_mount(self) -> None:
        table = self.query_one(Table)
        table.sort_by, table.descending = "seq", True  # newest on top

    def show(self, data: Any) -> None:
        rows = [{**r, "user": r.get("user") or r.get("uid"), "seq": int(r["seq"])} for r in data]
        self.query_one(Table).show(rows, key="seq")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        try:
            self.filters = parse_filters(event.value)
        except InvalidRequest as exc:
            self.notify(exc.message, severity="error")
            return
        self.edge.poll()
        self.query_one(Table).focus()

    def action_verify(self) -> None:
        def verify(c: Any) -> str:
            result = c.audit_verify()
            text = (
                f"chain verified: {result.get('rows', '?')} rows intact"
                if result["ok"]
                else f"CHAIN BROKEN: {result.get('problem') or result}"
            )
            self.edge.deliver(lambda: self.query_one("#audit-verify", Static).update(text))
            if not result["ok"]:
                raise ValueError(text)
            return text

        self.act("", verify)

    def action_filter(self) -> None:
        self.query_one("#audit-filter", Input).focus()

    def action_clear_filter(self) -> None:
        self.query_one("#audit-filter", Input).value = ""
        self.filters = {}
        self.edge.poll()
        self.query_one(Table).focus()

    def action_details(self) -> None:
        row = self.query_one(Table).selected_row("seq")
        if row:
            self.app.push_screen(Help(Text(json.dumps(row, indent=2))))

    def on_data_table_row_selected(self, event: Any) -> None:
        self.action_details()
