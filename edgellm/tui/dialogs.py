"""Modal dialogs: confirm a destructive action, fill in a small form, the key help."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static


class Confirm(ModalScreen[bool]):
    """Yes or no; Enter/y confirms, Esc/n declines."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Grid():
            yield Label(self.question, id="question")
            yield Button("Yes (y)", variant="error", id="yes")
            yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class Form(ModalScreen[dict[str, str] | None]):
    """A few labelled inputs; Enter in the last one submits, Esc cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, fields: list[tuple[str, str, str]]) -> None:
        """``fields``: (key, label, initial value)."""
        super().__init__()
        self.form_title, self.fields = title, fields

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"[b]{self.form_title}[/b]  (Enter: next/submit, Esc: cancel)")
            for key, label, value in self.fields:
                yield Label(label)
                yield Input(value=value, id=f"field-{key}")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        inputs = list(self.query(Input))
        index = inputs.index(event.input)
        if index + 1 < len(inputs):
            inputs[index + 1].focus()
            return
        self.dismiss(
            {key: self.query_one(f"#field-{key}", Input).value.strip() for key, _, _ in self.fields}
        )

    def action_cancel(self) -> None:
        self.dismiss(None)


class Help(ModalScreen[None]):
    """Every key, by screen."""

    BINDINGS = [Binding("escape,question_mark,q", "close", "Close")]

    def __init__(self, text: str | Text) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        yield Static(self.text, id="help-text")

    def action_close(self) -> None:
        self.dismiss(None)
