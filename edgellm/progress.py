"""Progress of long work (a download, a build, an upload, a re-encryption), reported
one way and shown wherever someone is watching.

Work reports ``(phase, completed, total)``: bytes when ``total`` is a size, steps or
nothing (``total`` None) for a phase that cannot count. On a terminal that is a bar
with bytes, total and speed (rich's); elsewhere (a log, a pipe, a service's journal)
one plain line per phase and at most one every few seconds in between. The daemon
keeps the same figures per job (``server/jobs.py``), so its clients see them too.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO


class Report(Protocol):
    def __call__(self, phase: str, completed: int = 0, total: int | None = None) -> None: ...


def ignore(phase: str, completed: int = 0, total: int | None = None) -> None:
    """A report nobody watches."""


def counted(
    chunks: Iterable[bytes], report: Report, phase: str, total: int | None
) -> Iterator[bytes]:
    """``chunks`` unchanged, reporting the bytes that have gone by."""
    done = 0
    report(phase, 0, total)
    for chunk in chunks:
        done += len(chunk)
        report(phase, done, total)
        yield chunk


def size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class LineReport:
    """Progress as plain lines: each phase when it starts and ends, and in between at
    most one line every ``every`` seconds (a journal is not flooded by a large file)."""

    def __init__(
        self,
        label: str,
        emit: Callable[[str], None] | None = None,
        every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.every, self.clock = label, every, clock
        self.emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
        self.phase: str | None = None
        self.phase_started = self.last = 0.0

    def __call__(self, phase: str, completed: int = 0, total: int | None = None) -> None:
        now = self.clock()
        if phase != self.phase:
            self.phase, self.phase_started, self.last = phase, now, now
            self.emit(f"{self.label}: {phase}" + (f" ({size(total)})" if total else "") + "…")
            return
        finished = total is not None and completed >= total
        if not finished and now - self.last < self.every:
            return
        self.last = now
        self.emit(f"{self.label}: {phase} {self._figures(completed, total, now)}")

    def _figures(self, completed: int, total: int | None, now: float) -> str:
        if total is None:
            return f"{completed}"
        elapsed = max(now - self.phase_started, 1e-6)
        pct = 100 * completed / total if total else 100.0
        return f"{size(completed)} of {size(total)} ({pct:.0f}%, {size(completed / elapsed)}/s)"


@contextmanager
def shown(label: str, stream: TextIO | None = None) -> Iterator[Report]:
    """A report for the work done inside the block: a bar per phase on a terminal,
    plain lines otherwise. The bar is gone (its last state left on screen) on exit."""
    out = stream or sys.stderr
    if not out.isatty():
        yield LineReport(label, emit=lambda line: print(line, file=out, flush=True))
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        SpinnerColumn,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.text import Text

    class WhenBytes(ProgressColumn):
        """A column shown for a phase that counts bytes, blank for one that cannot."""

        def __init__(self, column: ProgressColumn) -> None:
            super().__init__()
            self.column = column

        def render(self, task: Any) -> Any:
            return self.column.render(task) if task.fields.get("bytes") else Text("")

    columns: list[Any] = [
        SpinnerColumn(finished_text="[green]✓[/]"),
        TextColumn("{task.description}"),
        BarColumn(),
        WhenBytes(DownloadColumn()),
        WhenBytes(TransferSpeedColumn()),
        WhenBytes(TimeRemainingColumn()),
    ]

    def finish(bar: Progress, task: TaskID) -> None:
        total = bar.tasks[task].total
        bar.update(task, completed=total or 1, total=total or 1)

    with Progress(*columns, console=Console(file=out), transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def report(phase: str, completed: int = 0, total: int | None = None) -> None:
            if phase not in tasks:
                for other in tasks.values():  # a new phase ends the one before
                    finish(bar, other)
                tasks[phase] = bar.add_task(f"{label}: {phase}", total=total, bytes=bool(total))
            # a phase may learn its size after it starts (pip says it once connected)
            if total:
                bar.tasks[tasks[phase]].fields["bytes"] = True
            bar.update(tasks[phase], completed=completed, total=total)

        yield report
        for task in tasks.values():
            finish(bar, task)
