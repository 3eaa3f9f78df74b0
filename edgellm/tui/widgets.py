"""Small widgets the screens share: a keyboard-friendly table, a labelled sparkline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from rich.text import Text
from textual.binding import Binding
from textual.containers import Vertical
from textual.coordinate import Coordinate
from textual.widgets import DataTable, Static

if TYPE_CHECKING:
    from edgellm.tui.app import EdgeApp


class Table(DataTable):
    """A DataTable that keeps its cursor on the same row across refreshes, with vi
    keys, and sorts by a column when its header is clicked or ``s`` is pressed."""

    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
        Binding("s", "next_sort", "Sort"),
    ]

    def __init__(self, columns: list[tuple[str, str]], **kw: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self.spec = columns
        self.sort_by = columns[0][0]
        self.descending = False
        self.rows_data: list[dict[str, Any]] = []

    def on_mount(self) -> None:
        for key, label in self.spec:
            self.add_column(label, key=key)

    def show(self, rows: list[dict[str, Any]], key: str) -> None:
        """Replace the rows (each a dict by column key, plus ``key``)."""
        self.rows_data = rows
        selected = self.selected_key()
        self.clear()
        ordered = sorted(
            rows, key=lambda r: _sortable(r.get(self.sort_by)), reverse=self.descending
        )
        for row in ordered:
            self.add_row(*[_cell(row.get(k)) for k, _ in self.spec], key=str(row[key]))
        if selected is not None:
            for index, row in enumerate(ordered):
                if str(row[key]) == selected:
                    self.move_cursor(row=index)
                    break

    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(Coordinate(self.cursor_row, 0)).row_key.value
        except Exception:
            return None

    def selected_row(self, key: str) -> dict[str, Any] | None:
        chosen = self.selected_key()
        return next((r for r in self.rows_data if str(r[key]) == chosen), None)

    def action_next_sort(self) -> None:
        keys = [k for k, _ in self.spec]
        self.sort_by = keys[(keys.index(self.sort_by) + 1) % len(keys)]
        self.notify(f"sorted by {dict(self.spec)[self.sort_by]}", timeout=2)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        self.sort_by = str(event.column_key.value)


def _sortable(value: Any) -> tuple[int, Any]:
    if isinstance(value, int | float):
        return (0, value)
    if isinstance(value, Text):
        return (1, value.plain)
    return (1, "" if value is None else str(value))


def _cell(value: Any) -> Any:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return value


BLOCKS = " ▁▂▃▄▅▆▇█"


def spark(values: list[float], width: int, low: float, high: float) -> str:
    """The last ``width`` values as block characters on a fixed scale, so 3% looks
    small (a sparkline scaled to its own min and max would draw it full height)."""
    span = (high - low) or 1.0
    cells = [BLOCKS[1 + max(0, min(7, round((v - low) / span * 7)))] for v in values[-width:]]
    return "".join(cells).rjust(width, " ")


class Gauge(Static):
    """A reading's name and last value over its recent history."""

    def __init__(self, title: str, unit: str, high: float = 100.0, **kw: Any) -> None:
        super().__init__(f"{title}: -", **kw)
        self.label, self.unit, self.high = title, unit, high
        self.values: list[float] = []

    def show(self, values: list[float]) -> None:
        self.values = values
        width = max(10, self.size.width - 2)
        if not values:
            self.update(f"{self.label}: [dim]unavailable[/dim]")
            return
        line = spark(values, width, 0.0, max(self.high, max(values)))
        self.update(f"{self.label}: [b]{values[-1]:.1f}{self.unit}[/b]\n[green]{line}[/]")


class Pane(Vertical):
    """One tab. ``fetch`` runs in a worker thread with the app's Client when the tab
    is shown; ``show`` puts its result on screen; ``on_snapshot`` gets every poll."""

    def fetch(self, client: Any) -> Any:
        return None

    def show(self, data: Any) -> None:
        pass

    def on_snapshot(self, snapshot: Any) -> None:
        pass

    @property
    def edge(self) -> EdgeApp:
        """The app, as the edgellm app it is (its client, snapshot and workers)."""
        return cast("EdgeApp", self.app)

    def act(self, done: str, call: Any) -> None:
        """Run ``call(client)`` off the UI thread; say ``done`` or the daemon's error."""
        self.edge.act(done, call)
