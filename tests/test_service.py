"""The systemd side, for real as far as this machine allows: unit files checked by
systemd-analyze, the notify protocol read from a real datagram socket, socket
activation through fd 3, the watchdog, SIGHUP reload, and installing into a root."""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edgellm.config import load_settings
from edgellm.runtime.manager import Runtime
from edgellm.runtime.types import Finished, GenerationRequest
from edgellm.server.systemd import Watchdog
from edgellm.vault.open import open_vault

from conftest import MODEL, Daemon, wait_for

REPO = Path(__file__).resolve().parent.parent
EDGELLM = Path(sys.executable).parent / "edgellm"


@pytest.fixture
def units(tmp_path: Path) -> Path:
    for name in ("edgellm.service", "edgellm.socket"):
        text = (REPO / "systemd" / name).read_text().replace("@EDGELLM@", str(EDGELLM))
        (tmp_path / name).write_text(text)
    return tmp_path


def _known_notices(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def _unit_values(name: str) -> dict[str, str]:
    values = {}
    for line in (REPO / "systemd" / name).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            values[key.strip()] = value.strip()
    return values


def test_reload_needs_nothing_a_minimal_debian_lacks() -> None:
    """/bin/kill is procps', absent from a minimal Debian: the reload is the shell's
    own kill, run here as systemd runs it ($MAINPID substituted)."""
    reload = _unit_values("edgellm.service")["ExecReload"]
    assert reload.startswith("/bin/sh -c ") and "/bin/kill" not in reload
    kill = subprocess.run(["/bin/sh", "-c", "command -V kill"], capture_output=True, text=True)
    assert "builtin" in kill.stdout  # needs no package of its own
    target = subprocess.Popen(["sleep", "30"])
    try:
        script = shlex.split(reload)[2].replace("$MAINPID", str(target.pid))
        subprocess.run(["/bin/sh", "-c", script], env={"PATH": "/nonexistent"}, check=True)
        assert target.wait(10) == -signal.SIGHUP
    finally:
        target.kill()


def test_the_units_directories_match_tmpfiles() -> None:
    """systemd logs at every start when a directory it manages exists with another
    mode than its *DirectoryMode= (default 0755); tmpfiles.d makes them first."""
    unit = _unit_values("edgellm.service")
    made = {}
    for line in (REPO / "systemd" / "edgellm.tmpfiles").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "d":
            made[parts[1]] = parts[2]
    roots = {"Configuration": "/etc", "State": "/var/lib"}
    for kind, root in roots.items():
        path = f"{root}/{unit[f'{kind}Directory']}"
        assert unit.get(f"{kind}DirectoryMode", "0755") == made[path], (kind, path)


def test_no_setting_debian_12s_systemd_does_not_know() -> None:
    """MemoryPressureWatch= (systemd 254) is gone: edgellm's governor reads memory
    pressure itself, and systemd 252 warned of the unknown key at every load."""
    assert "MemoryPressureWatch" not in (REPO / "systemd" / "edgellm.service").read_text()


def test_units_pass_systemd_analyze_verify(units: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "verify", "edgellm.socket", "edgellm.service"],
        cwd=units,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert _known_notices(proc.stdout + proc.stderr) == []


def test_service_exposure_is_ok_or_better(units: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "edgellm.service"],
        cwd=units,
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for edgellm.service: ([\d.]+) (\w+)", proc.stdout)
    assert match, proc.stdout[-500:]
    assert match.group(2) in ("SAFE", "OK") and float(match.group(1)) <= 2.0


class NotifyListener:
    """What systemd would receive on NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def events(self) -> list[str]:
        return [
            line.split("=", 1)[0] + ("=1" if line.endswith("=1") else "")
            for m in list(self.messages)
            for line in m.splitlines()
        ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_notify_protocol_ready_status_watchdog_stopping(
    make_daemon: Any, tmp_path: Path, model_file: Path
) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    d = Daemon(tmp_path / "d", model_file)
    env = {**d.env, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    with open(d.log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm", "serve", "--no-pull"], env=env, stderr=log
        )
    try:
        wait_for(lambda: "READY=1" in listener.events(), timeout=30)
        wait_for(lambda: listener.events().count("WATCHDOG=1") >= 3, timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        wait_for(lambda: "STOPPING=1" in listener.events(), timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
    keys = listener.events()
    ready = keys.index("READY=1")
    assert "STATUS" in keys[ready : ready + 3]  # READY=1 comes with a STATUS= line
    assert keys.index("WATCHDOG=1") > ready and keys.index("STOPPING=1") > keys.index("WATCHDOG=1")
    status = next(m for m in listener.messages if "READY=1" in m)
    assert "STATUS=ready" in status and f"MAINPID={proc.pid}" in status


def test_socket_activation_serves_on_the_passed_socket(tmp_path: Path, model_file: Path) -> None:
    d = Daemon(tmp_path / "d", model_file)
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    fd = listener.fileno()

    def as_fd3() -> None:
        os.dup2(fd, 3)

    env = {**d.env, "LISTEN_FDS": "1", "EDGELLM_SOCKET": str(path)}
    # LISTEN_PID must be the daemon's own pid: the shell sets it, then execs in place
    with open(d.log, "ab") as log:
        proc = subprocess.Popen(
            ["sh", "-c", f'LISTEN_PID=$$ exec "{sys.executable}" -m edgellm serve --no-pull'],
            env=env,
            preexec_fn=as_fd3,
            pass_fds=(fd, 3),
            stderr=log,
        )
    listener.close()
    try:
        from edgellm.client import Client

        def up() -> bool:
            try:
                with Client(path) as c:
                    return c.health()["status"] == "ready"
            except Exception:
                return False

        wait_for(up, timeout=30)
        with Client(path) as c:
            assert (
                c.chat([{"role": "user", "content": "Hi"}], max_tokens=3, ignore_eos=True)["usage"][
                    "completion_tokens"
                ]
                == 3
            )
        assert "event=socket_activation" in d.log_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert path.exists()  # the socket file belongs to systemd, not to us
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sighup_reloads_what_can_change(tmp_path: Path, model_file: Path) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    d = Daemon(tmp_path / "d", model_file, keep_alive="5m")
    env = {**d.env, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    with open(d.log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm", "serve", "--no-pull"], env=env, stderr=log
        )
    try:
        wait_for(lambda: "READY=1" in listener.events(), timeout=30)
        text = d.config.read_text().replace('keep_alive = "5m"', 'keep_alive = "7m"')
        d.config.write_text(text + 'socket_mode = "0600"\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: listener.events().count("READY=1") >= 2, timeout=10)
        with d.client() as c:
            assert c.load(MODEL)["keep_alive_seconds"] == 420  # applied
        assert "RELOADING=1" in listener.events()
        assert "needs_restart=socket_mode" in d.log_text()
        assert any("socket_mode change(s) need a restart" in m for m in listener.messages)
        d.config.write_text("max_queue = 'lots'\n")  # a bad reload keeps the old settings
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "event=reload_failed" in d.log_text(), timeout=10)
        with d.client() as c:
            assert c.health()["status"] == "ready"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        listener.close()


def test_preloaded_models_are_loaded_and_pinned_before_ready(make_daemon: Any) -> None:
    d: Daemon = make_daemon(preload=[MODEL])
    with d.client() as c:
        loaded = c.ps()
    assert [m["name"] for m in loaded] == [MODEL] and loaded[0]["pinned"] is True


def test_a_hung_engine_stops_the_watchdog(model_file: Path, tmp_path: Path) -> None:
    settings = load_settings(
        overrides={"state_dir": tmp_path, "n_ctx": 256, "vault_key_file": tmp_path / "vault.key"},
        environ={},
    )
    store = open_vault(settings)
    store.add_file(model_file, MODEL)
    rt = Runtime(settings, store)
    try:
        engine = rt.load(MODEL).engine
        watchdog = Watchdog(rt, stall_after=0.5)
        assert watchdog.healthy()
        # A llama.cpp call that never returns cannot be produced on demand, so the next
        # decode blocks until released: the same state as a hung kernel.
        release = threading.Event()
        real_decode = engine._llm.decode

        def hung(entries: Any) -> int:
            release.wait()
            return real_decode(entries)

        engine._llm.decode = hung
        done = threading.Event()
        rt.submit(
            GenerationRequest(
                model=MODEL,
                prompt="Hello",
                max_tokens=4,
                sink=lambda ev: isinstance(ev, Finished) and done.set(),
            )
        )
        wait_for(lambda: not watchdog.healthy(), timeout=5)
        assert watchdog.stalled == [MODEL]
        release.set()
        assert done.wait(10)
        assert watchdog.healthy()
    finally:
        release.set()
        rt.close()


def test_llama_cpp_runs_with_memory_deny_write_execute(tmp_path: Path, model_file: Path) -> None:
    """MemoryDenyWriteExecute= is in the unit only because this passes: the kernel's
    MDWE (what systemd applies) on the daemon process, then a real request."""
    d = Daemon(tmp_path / "d", model_file)
    libc = ctypes.CDLL(None, use_errno=True)

    def mdwe() -> None:
        if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
            raise OSError(ctypes.get_errno(), "PR_SET_MDWE")

    with open(d.log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm", "serve", "--no-pull"],
            env=d.env,
            preexec_fn=mdwe,
            stderr=log,
        )
    try:
        wait_for(lambda: d.socket.exists(), timeout=30)
        time.sleep(0.5)
        with d.client() as c:
            r = c.chat([{"role": "user", "content": "Hi"}], max_tokens=4, ignore_eos=True)
        assert r["usage"]["completion_tokens"] == 4
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="installing creates users: needs root")
def test_install_and_uninstall_into_a_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgellm", "service", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    dry = cli("install", "--root", str(root), "--exec", str(EDGELLM), "--dry-run")
    assert dry.returncode == 0 and "would write /etc/systemd/system/edgellm.service" in dry.stdout
    assert list(root.iterdir()) == []  # a dry run changes nothing
    done = cli(
        "install", "--root", str(root), "--exec", str(EDGELLM), "--gpu", "--tcp", "0.0.0.0:8443"
    )
    assert done.returncode == 0, done.stderr
    unit = (root / "etc/systemd/system/edgellm.service").read_text()
    assert f"ExecStart={EDGELLM} serve" in unit
    assert (root / "etc/systemd/system/edgellm.service.d/gpu.conf").exists()
    tcp = (root / "etc/systemd/system/edgellm-tcp.socket").read_text()
    assert "ListenStream=0.0.0.0:8443" in tcp and "Service=edgellm.service" in tcp
    assert (
        "Sockets=edgellm.socket edgellm-tcp.socket"
        in (root / "etc/systemd/system/edgellm.service.d/tcp.conf").read_text()
    )
    assert "edgellm:" in (root / "etc/passwd").read_text()
    assert "edgellm-clients:" in (root / "etc/group").read_text()
    key = root / "etc/edgellm/vault.key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    assert (
        "LoadCredential=vault-key:/etc/edgellm/vault.key"
        in (root / "etc/systemd/system/edgellm.service.d/credential.conf").read_text()
    )
    config = root / "etc/edgellm/edgellm.toml"
    uid = int(
        next(
            line
            for line in (root / "etc/passwd").read_text().splitlines()
            if line.startswith("edgellm:")
        ).split(":")[2]
    )
    assert config.stat().st_gid == uid and config.stat().st_mode & 0o777 == 0o640
    load_settings(config, environ={})  # the default settings are valid
    blobs = root / "var/lib/edgellm/vault/objects"
    assert [b.stat().st_uid for b in blobs.iterdir()] == [uid]  # one encrypted model
    from edgellm.vault.keys import read_key_file
    from edgellm.vault.store import VaultStore

    assert [m.name for m in VaultStore(blobs.parent, read_key_file(key)).list()] == [
        "smollm2-135m-instruct"
    ]
    again = cli("install", "--root", str(root), "--exec", str(EDGELLM))
    assert "keep the existing vault key" in again.stdout and key.read_bytes()
    kept = cli("uninstall", "--root", str(root))
    assert kept.returncode == 0 and not (root / "etc/systemd/system/edgellm.service").exists()
    assert not (root / "etc/systemd/system/edgellm-tcp.socket").exists()
    assert key.exists() and blobs.exists()
    assert "edgellm:" not in (root / "etc/passwd").read_text()  # the user went with the units
    assert not {"edgellm", "edgellm-clients"} & {
        line.split(":")[0] for line in (root / "etc/group").read_text().splitlines()
    }
    purged = cli("uninstall", "--root", str(root), "--purge")
    assert purged.returncode == 0 and not key.exists() and not blobs.exists()
    shutil.rmtree(root)


def test_install_refuses_a_readable_key_and_non_root_runs(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgellm",
            "service",
            "install",
            "--root",
            str(tmp_path / "r"),
            "--exec",
            str(EDGELLM),
            "--key-file",
            str(key),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "readable by others" in r.stderr and "chmod 600" in r.stderr
