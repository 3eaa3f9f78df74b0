"""The terminal UI against real daemons: Textual's Pilot drives it in-process (every
tab renders real data; actions do what they say; denials and a daemon that goes
away are shown, not raised), snapshots pin down each screen, and one test runs
``edgellm tui`` in a real terminal under tmux."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx_models
import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static, TabbedContent
from textual.worker import WorkerFailed

from edgellm.client import Client
from edgellm.tui.activity import parse_filters
from edgellm.tui.app import EdgeApp
from edgellm.tui.data import problem
from edgellm.tui.playground import Playground
from edgellm.tui.widgets import spark

from conftest import MODEL, Daemon, as_user, public_socket, unix_users, wait_for


class Recording(EdgeApp):
    """The app, keeping every notification it shows."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.notes: list[str] = []

    def notify(self, message: str, *args: Any, **kw: Any) -> None:  # type: ignore[override]
        self.notes.append(str(message))
        super().notify(message, *args, **kw)


async def until(pilot: Pilot, predicate: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await pilot.pause(0.1)
    raise AssertionError("the screen did not show it in time")


def text(app: EdgeApp, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


def rows(app: EdgeApp, selector: str) -> list[list[str]]:
    table = app.query_one(selector, DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def drive(
    app: EdgeApp, scenario: Callable[[Pilot], Any], size: tuple[int, int] = (100, 30)
) -> None:
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: app.snapshot.health or app.down)
            await scenario(pilot)

    asyncio.run(main())


def test_every_tab_shows_the_daemon_and_its_actions_work(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    app = Recording(d.socket)
    long_job: dict[str, Any] = {}

    def generate() -> None:
        with d.client() as c:
            long_job["reply"] = c.chat(
                [{"role": "user", "content": "Tell a long story."}],
                max_tokens=2000,
                ignore_eos=True,
            )

    async def scenario(pilot: Pilot) -> None:
        # dashboard: health, level, who I am
        health = await until(
            pilot, lambda: "governor" in text(app, "#health") and text(app, "#health")
        )
        assert "ready" in health and "NORMAL" in health and "(admin)" in health
        # models: the catalog, then load it with a key
        await pilot.press("2")
        table = await until(pilot, lambda: rows(app, "#models-table"))
        assert table[0][:5] == [f"{MODEL} *", "gguf", "93.8", "Q4_1", "available"]
        await pilot.press("l")
        await until(pilot, lambda: f"{MODEL} loaded" in app.notes)
        assert [m["name"] for m in Client(d.socket).ps()] == [MODEL]
        await until(pilot, lambda: rows(app, "#models-table")[0][4] == "loaded")
        await pilot.press("1")
        await until(pilot, lambda: rows(app, "#loaded") and rows(app, "#loaded")[0][0] == MODEL)
        # requests: a running generation appears; c cancels it
        worker = threading.Thread(target=generate)
        worker.start()
        await pilot.press("3")
        # (it may show as queued for a moment before a slot takes it)
        running = await until(
            pilot,
            lambda: (r := rows(app, "#requests-table")) and r[0][3] == "running" and r,
        )
        assert running[0][2] == MODEL and running[0][1] == "root"  # a name, not a uid
        await pilot.press("c")
        worker.join(30)
        assert long_job["reply"]["choices"][0]["finish_reason"] == "cancelled"
        await until(pilot, lambda: not rows(app, "#requests-table"))
        # audit: the load is there, the chain verifies
        await pilot.press("4")
        audit = await until(pilot, lambda: rows(app, "#audit-table"))
        assert any(r[3] == "models.load" and r[4] == MODEL for r in audit), audit
        seqs = [int(r[0]) for r in audit]
        assert seqs == sorted(seqs, reverse=True) and seqs[-1] > 0  # newest on top, as is
        await pilot.press("v")
        await until(pilot, lambda: "chain verified" in text(app, "#audit-verify"))
        # playground: a streamed answer with its speed and finish reason
        await pilot.press("5")
        await pilot.press(*"Say hello.", "enter")
        stats = await until(
            pilot,
            lambda: "finish:" in text(app, "#play-stats") and text(app, "#play-stats"),
            timeout=60,
        )
        assert "tok/s" in stats and ("finish: stop" in stats or "finish: length" in stats)
        assert text(app, "#play-output").startswith("> Say hello.\n")
        assert len(text(app, "#play-output")) > len("> Say hello.\n") + 2
        # access: grant through the form, revoke through the confirmation
        await pilot.press("escape", "6")
        await until(pilot, lambda: "g grants" in text(app, "#access-note"))
        await pilot.press("g")
        await pilot.pause(0.2)
        await pilot.press(*"user:nobody", "enter", "enter", "enter")  # role client, scope *
        await until(pilot, lambda: rows(app, "#grants-table"))
        assert Client(d.socket).grants() == [
            {"subject": "user:nobody", "role": "client", "scope": "*"}
        ]
        await pilot.press("r")
        await pilot.pause(0.2)
        await pilot.press("y")
        await until(pilot, lambda: not rows(app, "#grants-table"))
        assert Client(d.socket).grants() == []
        # help and quit
        await pilot.press("question_mark")
        assert type(app.screen).__name__ == "Help"
        await pilot.press("escape", "q")

    drive(app, scenario)
    assert d.alive()


def test_model_actions_ask_before_destroying(make_daemon: Any, model_file: Path) -> None:
    d: Daemon = make_daemon()
    app = Recording(d.socket)
    client = Client(d.socket)

    async def scenario(pilot: Pilot) -> None:
        await pilot.press("2")
        await until(pilot, lambda: rows(app, "#models-table"))
        await pilot.press("p")  # pin: loads it pinned
        await until(pilot, lambda: client.ps() and client.ps()[0]["pinned"])
        await until(pilot, lambda: rows(app, "#models-table")[0][5] == "yes")
        await pilot.press("p")  # unpin
        await until(pilot, lambda: not client.ps()[0]["pinned"])
        await pilot.press("u")
        await until(pilot, lambda: client.ps() == [])
        # import from a path, under a name
        await pilot.press("i")
        await pilot.pause(0.2)
        await pilot.press(*str(model_file), "enter", *"copy-b", "enter")
        await until(pilot, lambda: "copy-b imported from" in " ".join(app.notes), timeout=60)
        assert {m["name"] for m in client.models()} == {MODEL, "copy-b"}
        # filter, then remove: declined first, confirmed second
        await pilot.press("slash", *"copy", "enter")
        await until(pilot, lambda: [r[0] for r in rows(app, "#models-table")] == ["copy-b"])
        await pilot.press("d")
        await pilot.pause(0.2)
        assert type(app.screen).__name__ == "Confirm"
        await pilot.press("n")
        await pilot.pause(0.5)
        assert {m["name"] for m in client.models()} == {MODEL, "copy-b"}
        await pilot.press("d")
        await pilot.pause(0.2)
        await pilot.press("y")
        await until(pilot, lambda: {m["name"] for m in client.models()} == {MODEL})
        # verify the one left; a bad filter in the audit tab is a message, not a crash
        await pilot.press("escape", "v")
        await until(pilot, lambda: any("verified" in n for n in app.notes))
        await pilot.press("4", "slash", *"colour=blue", "enter")
        await until(pilot, lambda: any("bad filter 'colour=blue'" in n for n in app.notes))
        # the command palette reaches the tabs too
        await pilot.press("escape", "ctrl+p")
        await pilot.pause(0.3)
        await pilot.press(*"Go to Playground")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: app.query_one(TabbedContent).active == "playground")

    drive(app, scenario)


def test_the_daemon_going_away_and_coming_back(make_daemon: Any, tmp_path: Path) -> None:
    d: Daemon = make_daemon()
    app = Recording(d.socket, poll_interval=0.3)

    async def scenario(pilot: Pilot) -> None:
        await until(pilot, lambda: "ready" in text(app, "#health"))
        await pilot.press("2")
        await until(pilot, lambda: rows(app, "#models-table"))
        d.stop()
        banner = await until(pilot, lambda: app.down and text(app, "#banner"))
        assert f"no edgellm daemon is running on {d.socket}" in banner
        assert "retrying" in banner
        await pilot.press("l")  # an action while it is down: a message, not a crash
        await until(pilot, lambda: any("no edgellm daemon" in n for n in app.notes))
        d.start()
        await until(pilot, lambda: app.down is None and "ready" in text(app, "#health"), timeout=60)
        assert not app.query_one("#banner").has_class("down")

    drive(app, scenario)
    # never started at all: the same panel, from the first poll
    missing = Recording(tmp_path / "nothing.sock")

    async def absent(pilot: Pilot) -> None:
        assert "no edgellm daemon is running" in text(missing, "#banner")

    drive(missing, absent)


def test_problems_read_as_one_line() -> None:
    import errno

    from edgellm.client import _unavailable

    denied = _unavailable(
        Path("/run/edgellm/edgellm.sock"), OSError(errno.EACCES, "Permission denied")
    )
    assert problem(denied) == (
        "permission denied on /run/edgellm/edgellm.sock: your user "
        "may not use this appliance; ask its operator to grant you "
        "access"
    )
    assert parse_filters("user=alice decision=deny") == {"user": "alice", "decision": "deny"}
    assert spark([0, 50, 100], 5, 0, 100) == "  ▁▅█"


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root")
def test_a_client_sees_a_read_only_view_and_denials_say_why(
    model_file: Path, tmp_path: Path
) -> None:
    user = "edgt-viewer"
    with contextlib.ExitStack() as stack:
        stack.enter_context(unix_users(user))
        (tmp_path / "daemon").mkdir()
        d = public_socket(Daemon(tmp_path / "daemon", model_file, socket_mode="0666"), "tui")
        stack.callback(shutil.rmtree, d.socket.parent, True)
        d.start()
        stack.callback(d.stop)
        Client(d.socket).grant(f"user:{user}", "client", MODEL)

        def look() -> dict[str, Any]:
            app = Recording(d.socket)
            seen: dict[str, Any] = {}

            async def scenario(pilot: Pilot) -> None:
                seen["health"] = await until(
                    pilot, lambda: "governor" in text(app, "#health") and text(app, "#health")
                )
                await pilot.press("2")
                await until(pilot, lambda: rows(app, "#models-table"))
                await pilot.press("l")
                seen["denied"] = await until(
                    pilot,
                    lambda: [n for n in app.notes if "permission denied" in n or "loaded" in n],
                )
                await pilot.press("3")
                await pilot.pause(0.5)
                seen["requests"] = text(app, "#requests-note")
                await pilot.press("6")
                await pilot.pause(0.5)
                seen["access"] = text(app, "#access-note")

            drive(app, scenario)
            return seen

        # the other user cannot read this Python's files: what the scenario imports
        # lazily must be loaded already, so run it once as ourselves first
        assert "exception" not in look()
        Client(d.socket).unload(MODEL)  # (as an admin, that run loaded it)
        seen = as_user(user, look)
        assert "exception" not in seen, seen
        assert f"{user} (client)" in seen["health"]
        assert seen["denied"] == [
            f"permission denied: {user} lacks models.load; ask an "
            "admin to grant it (edgellm access grant …)"
        ]
        assert seen["requests"].startswith("0 in flight")  # only its own requests
        assert seen["access"].startswith("Access control is for admins")
        assert Client(d.socket).ps() == []  # nothing was loaded


# --- snapshots ---------------------------------------------------------------------------
@pytest.fixture
def quiet_daemon(make_daemon: Any, tmp_path: Path) -> Daemon:
    """A daemon whose readings come from a fixed trace, so screens are the same each run."""
    trace = tmp_path / "steady.jsonl"
    trace.write_text(
        '{"t": 0, "mem_available_pct": 60, "cpu_pct": 25, '
        '"psi_memory_some_avg10": 1.5, "temp_c": 55, "temp_high_c": 80, '
        '"temp_critical_c": 95, "rss_mb": 120}\n'
    )
    return make_daemon(governor={"trace": str(trace), "poll_interval": "100ms"})


def _settled(*keys: str) -> Callable[[Pilot], Any]:
    async def run_before(pilot: Pilot) -> None:
        app: EdgeApp = pilot.app  # type: ignore[assignment]
        await until(pilot, lambda: app.polls_shown)
        for field in app.query(Input):
            field.cursor_blink = False  # a blinking cursor is a coin toss in a picture
        await pilot.pause(0.5)  # drawn before anything covers it
        for key in keys:
            await pilot.press(key)
        # one more poll once every key has taken effect, waited for by its outcome (not
        # by time): a slow machine must not catch the tab before its data is in
        await app.workers.wait_for_complete()
        shown = app.polls_shown
        app.poll()
        await until(pilot, lambda: app.polls_shown > shown)
        await app.workers.wait_for_complete()
        await pilot.pause(0.5)
        await pilot.wait_for_scheduled_animations()

    return run_before


@pytest.mark.parametrize("tab", ["1", "2", "3", "5", "6"])
def test_snapshot_of_each_tab(snap_compare: Any, quiet_daemon: Daemon, tab: str) -> None:
    app = EdgeApp(quiet_daemon.socket, poll_interval=3600)  # one poll: a steady picture
    keys = ("2", tab) if tab == "2" else (tab,)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_settled(*keys))


def test_snapshot_of_the_audit_tab_filtered(snap_compare: Any, quiet_daemon: Daemon) -> None:
    app = EdgeApp(quiet_daemon.socket, poll_interval=3600)
    assert snap_compare(
        app, terminal_size=(80, 24), run_before=_settled("4", "slash", *"decision=deny", "enter")
    )


@pytest.mark.parametrize("keys", [(), ("question_mark",)], ids=["down", "help"])
def test_snapshot_of_the_down_panel_and_the_help(snap_compare: Any, keys: tuple[str]) -> None:
    app = EdgeApp("/tmp/edgellm-snapshot/absent.sock", poll_interval=3600)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_settled(*keys))


# --- a real terminal ---------------------------------------------------------------------
@pytest.fixture
def tmux() -> Iterator[str]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is needed for this test (apt-get install tmux)")
    session = f"edgellm-test-{os.getpid()}"
    yield session
    subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_edgellm_tui_in_a_real_terminal(make_daemon: Any, tmux: str, tmp_path: Path) -> None:
    d: Daemon = make_daemon()
    Client(d.socket).load(MODEL)
    _tiny_embedder(d, tmp_path)  # an ONNX model loaded too: every tab copes with one
    status = tmp_path / "status"
    command = f"{sys.executable} -m edgellm tui --socket {d.socket}; echo $? > {status}"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", tmux, "-x", "80", "-y", "24", command], check=True
    )

    def screen() -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", tmux], capture_output=True, text=True
        ).stdout

    def showing(*words: str) -> Callable[[], str | None]:
        def check() -> str | None:
            shown = screen()
            return shown if all(w in shown for w in words) else None

        return check

    dashboard = wait_for(showing(MODEL, "NORMAL"), timeout=30)
    assert "Dashboard" in dashboard and "busy slots 0/36" in dashboard  # 4 + the ONNX's 32
    subprocess.run(["tmux", "send-keys", "-t", tmux, "2"], check=True)
    # the table shows the loaded model once its poll is back (by outcome, not time)
    row = f"{MODEL} *  gguf    93.8     Q4_1   loaded"
    try:
        wait_for(showing(row, "l Load"), timeout=15)
    except AssertionError:
        raise AssertionError(f"the Models tab never showed {row!r}:\n{screen()}") from None
    # each tab, by a line only it shows, with the ONNX model loaded
    for key, only in zip(
        "345612",
        ["in flight", "newest first", "Enter sends", "g grants", "busy slots", "l Load"],
        strict=True,
    ):
        if key == "6":  # the Playground's prompt has the keys: Esc leaves it first
            subprocess.run(["tmux", "send-keys", "-t", tmux, "Escape"], check=True)
            time.sleep(0.5)  # alone, not read as Alt+6
        subprocess.run(["tmux", "send-keys", "-t", tmux, key], check=True)
        try:
            wait_for(showing(only), timeout=15)
        except AssertionError:
            raise AssertionError(f"tab {key} never showed {only!r}:\n{screen()}") from None
        assert "Traceback" not in screen()
    subprocess.run(["tmux", "send-keys", "-t", tmux, "q"], check=True)
    wait_for(
        lambda: (
            subprocess.run(["tmux", "has-session", "-t", tmux], capture_output=True).returncode != 0
        ),
        timeout=10,
    )
    assert status.read_text().strip() == "0"  # quit is a clean exit


def test_the_help_is_built_from_the_key_bindings() -> None:
    from edgellm.tui.app import TABS, key_help

    shown = key_help(EdgeApp("/nonexistent/edgellm.sock"))
    for _, title, pane in TABS:
        assert f"[b]{title}[/b]" in shown or not pane.BINDINGS
        for binding in pane.BINDINGS:
            assert (binding.tooltip or binding.description.lower()) in shown, binding
    assert "1-6 Dashboard, Models" in shown and "? help" in shown


def _tiny_embedder(d: Daemon, tmp_path: Path) -> str:
    """An ONNX embedding model in the daemon's vault, loaded (as an embedding request
    leaves it)."""
    folder = tmp_path / "tiny-embed"
    folder.mkdir()
    for name, data in onnx_models.tiny_embed_files().items():
        (folder / name).write_bytes(data)
    with d.client() as c:
        c.import_model("tiny-embed", folder)
        assert len(c.embed(["hello there"], "tiny-embed")) == 1
    return "tiny-embed"


def test_an_onnx_model_loaded_shows_on_every_tab(make_daemon: Any, tmp_path: Path) -> None:
    d: Daemon = make_daemon()
    embedder = _tiny_embedder(d, tmp_path)
    Client(d.socket).load(MODEL)
    app = Recording(d.socket)

    async def scenario(pilot: Pilot) -> None:
        loaded = await until(pilot, lambda: len(rows(app, "#loaded")) == 2 and rows(app, "#loaded"))
        by_name = {r[0]: r for r in loaded}
        assert by_name[embedder][3].endswith("rows/s") and by_name[MODEL][3].endswith("tok/s")
        for key in "234561":
            await pilot.press("escape", key)
            polls = app.polls_shown
            await until(pilot, lambda polls=polls: app.polls_shown > polls)  # each tab's own poll
        await pilot.press("2")
        models = await until(pilot, lambda: rows(app, "#models-table"))
        assert {r[0].rstrip(" *"): r[4] for r in models} == {MODEL: "loaded", embedder: "loaded"}
        await pilot.press("5")  # the playground offers what can chat
        await until(pilot, lambda: app.query_one("#play-model").is_mounted)
        assert app.main.query_one(Playground).models == [MODEL]

    drive(app, scenario)
    assert app.return_code in (None, 0) and app.down is None


def test_an_internal_error_ends_with_status_1_and_one_line(
    make_daemon: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capfd: Any
) -> None:
    from edgellm.tui.dashboard import Dashboard

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def broken(self: Any, snapshot: Any) -> None:
        raise KeyError("tokens_per_second")

    monkeypatch.setattr(Dashboard, "on_snapshot", broken)
    d: Daemon = make_daemon()
    app = EdgeApp(d.socket)

    async def main() -> None:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(3)

    with pytest.raises(WorkerFailed):  # run_test hands the error to the test framework
        asyncio.run(main())
    assert app.return_code == 1
    said = capfd.readouterr().err  # what the terminal gets once the screen is gone
    assert "error: edgellm tui stopped on an internal error (KeyError: 'tokens_per_second')" in (
        " ".join(said.split())
    )
    assert "Traceback" not in said
    crash = tmp_path / "cache" / "edgellm" / "tui-crash.log"
    assert crash.exists() and "Traceback" in crash.read_text()


def test_the_cli_exits_with_the_tuis_status(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from edgellm.cli import main

    monkeypatch.setattr("edgellm.tui.app.run", lambda socket: 1)
    assert CliRunner().invoke(main, ["tui"]).exit_code == 1


def test_the_playground_is_a_conversation_and_esc_stops_cleanly(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    app = Recording(d.socket)
    play: dict[str, Any] = {}

    async def turn(pilot: Pilot, words: str) -> str:
        before = app.main.query_one(Playground).history[:]
        await pilot.press(*words, "enter")
        return str(
            await until(
                pilot,
                lambda: (
                    app.main.query_one(Playground).history != before
                    and "context" in text(app, "#play-stats")
                    and text(app, "#play-stats")
                ),
                timeout=90,
            )
        )

    async def scenario(pilot: Pilot) -> None:
        await pilot.press("5")
        pane = app.main.query_one(Playground)
        for command in ("/set temperature 0", "/set max_tokens 24", "/set colour blue"):
            await pilot.press(*command, "enter")
        assert "no option 'colour' to set" in text(app, "#play-stats")  # not sent
        assert pane.options == {"temperature": 0.0, "max_tokens": 24} and not pane.history
        first = await turn(pilot, "My name is Ada.")
        second = await turn(pilot, "What is my name?")
        play["contexts"] = [int(s.split("context ")[1].split()[0]) for s in (first, second)]
        assert [m["role"] for m in pane.history] == ["user", "assistant"] * 2
        # Esc mid-answer: a stop, kept as a turn, never an error
        await pilot.press(*"/set max_tokens 600", "enter")
        shown = len(pane.transcript)
        await pilot.press(*"Tell me a very long story about a dragon.", "enter")
        await until(
            pilot, lambda: pane.stream is not None and len(pane.transcript) > shown + 120, 60
        )
        await pilot.press("escape")
        stats = await until(
            pilot, lambda: "stopped" in text(app, "#play-stats") and text(app, "#play-stats")
        )
        assert "error" not in stats
        assert len(pane.history) == 6
        await pilot.press("ctrl+l")
        await until(pilot, lambda: pane.history == [] and "cleared" in text(app, "#play-stats"))
        assert text(app, "#play-output") == ""

    drive(app, scenario)
    first, second = play["contexts"]
    assert second > first  # the second turn carried the first


def test_a_pull_from_the_models_tab_shows_its_progress(make_daemon: Any) -> None:
    d: Daemon = make_daemon(names=("spare",), default_model="spare")
    app = Recording(d.socket)
    seen: list[str] = []

    async def scenario(pilot: Pilot) -> None:
        await pilot.press("2")
        waiting = await until(
            pilot, lambda: MODEL in text(app, "#models-catalog") and text(app, "#models-catalog")
        )
        assert "not pulled yet" in waiting and "f pulls one" in waiting
        await pilot.press("f")
        await pilot.pause(0.3)
        await pilot.press("ctrl+u", *MODEL, "enter")

        def progressing() -> bool:
            shown = text(app, "#models-jobs")
            if "MB of" in shown:
                seen.append(shown)
            return any(f"{MODEL} pulled" in n for n in app.notes)

        await until(pilot, progressing, timeout=120)
        await until(pilot, lambda: MODEL in [r[0] for r in rows(app, "#models-table")])
        assert MODEL not in text(app, "#models-catalog")

    drive(app, scenario)
    assert seen and any("upload" in s or "receive" in s for s in seen), seen
    assert any("%" in s and "MB/s" in s for s in seen), seen
