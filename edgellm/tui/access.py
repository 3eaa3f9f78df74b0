"""Access (admins): who holds which role on what; grant and revoke."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Static

from edgellm.tui.data import can
from edgellm.tui.dialogs import Confirm, Form
from edgellm.tui.widgets import Pane, Table


class Access(Pane):
    BINDINGS = [Binding("g", "grant", "Grant"), Binding("r", "revoke", "Revoke")]

    def compose(self) -> ComposeResult:
        yield Static("", id="access-note")
        yield Table(
            [("subject", "Subject"), ("role", "Role"), ("scope", "Scope")], id="grants-table"
        )

    def fetch(self, client: Any) -> Any:
        if not can(self.edge.snapshot.whoami):
            return None
        return client.grants()

    def show(self, data: Any) -> None:
        note = self.query_one("#access-note", Static)
        if data is None:
            note.update(
                "Access control is for admins: you can see only your own roles, on the dashboard."
            )
            data = []
        else:
            note.update(
                "subjects: user:NAME, group:NAME, uid:N, token:NAME; "
                "g grants, r revokes the selected grant"
            )
        self.query_one(Table).show(
            [{**g, "key": f"{g['subject']}|{g['role']}|{g['scope']}"} for g in data], key="key"
        )

    def action_grant(self) -> None:
        def submitted(values: dict[str, str] | None) -> None:
            if not values or not values["subject"] or not values["role"]:
                return
            subject, role, scope = values["subject"], values["role"], values["scope"] or "*"
            self.act(
                f"granted {role} on {scope} to {subject}", lambda c: c.grant(subject, role, scope)
            )

        self.app.push_screen(
            Form(
                "Grant a role",
                [
                    ("subject", "Subject (user:NAME, group:NAME, uid:N or token:NAME)", ""),
                    (
                        "role",
                        "Role (admin, operator, auditor, client, data-reader, data-writer)",
                        "client",
                    ),
                    ("scope", "Scope: a model or data name or prefix (* for all)", "*"),
                ],
            ),
            submitted,
        )

    def action_revoke(self) -> None:
        row = self.query_one(Table).selected_row("key")
        if row is None:
            self.notify("no grant selected", severity="warning")
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.act(
                    f"revoked {row['role']} from {row['subject']}",
                    lambda c: c.revoke(row["subject"], row["role"], row["scope"]),
                )

        self.app.push_screen(
            Confirm(f"Revoke {row['role']} on {row['scope']} from {row['subject']}?"), confirmed
        )
