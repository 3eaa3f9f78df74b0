"""The service under a real systemd: Debian 12 booted in systemd-nspawn (tests/booted.py).

edgellm is installed inside as the README tells a user to (a checkout in root's home,
`python3 -m venv .venv && .venv/bin/pip install '.[server,tui]'`, then
`edgellm service install`), offline: the container has no network, so the wheels come
from the host's build (``pip wheel``) and the default model from the host's cache.
The steps run in order against one booted system; each names what it proves.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from booted import Booted, cannot_boot, ensure_rootfs

from conftest import MODEL

REPO = Path(__file__).resolve().parent.parent
WHY = cannot_boot()
pytestmark = [
    pytest.mark.skipif(WHY is not None, reason=f"no booted systemd here: {WHY}"),
    pytest.mark.timeout(900),
]
EDGELLM = "/opt/edgellm/venv/bin/edgellm"  # where the installer puts it (/root is hidden)
SOCK = "/run/edgellm/edgellm.sock"
ASK = f"{EDGELLM} ask --seed 1 --temperature 0 --max-tokens 8 -m {MODEL} 'Name a colour.'"


def _source_tree(into: Path) -> None:
    """The checkout as git has it (what a user clones), without build outputs."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = REPO / name
        if src.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, into / name)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[Booted]:
    rootfs = ensure_rootfs()
    base = tmp_path_factory.mktemp("booted")
    wheels = base / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), f"{REPO}[server,tui]"]
        + ["hatchling"],  # the build backend, for the user's `pip install .`
        check=True,
        capture_output=True,
    )
    b = Booted(base, rootfs, {wheels: "/wheels"})
    _source_tree(b.upper / "root/edgellm")
    blobs = b.upper / "root/.cache/edgellm/blobs"
    blobs.mkdir(parents=True)
    shutil.copy(model_file, blobs / model_file.name)
    b.start()
    try:
        state = b.wait_booted()
        assert state == "running", f"the container booted {state}"
        offline = "PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels PIP_DISABLE_PIP_VERSION_CHECK=1"
        b.sh(
            f"cd /root/edgellm && export {offline} && python3 -m venv .venv"
            " && .venv/bin/pip install -q '.[server,tui]' && .venv/bin/edgellm service install",
            timeout=600,
        )
        b.sh("useradd -m -G edgellm-clients alice && useradd -m mallory")
        yield b
    finally:
        b.stop()


def _unit(b: Booted, prop: str, unit: str = "edgellm.service") -> str:
    return b.sh(f"systemctl show -p {prop} --value {unit}").stdout.strip()


def _served(b: Booted, user: str = "alice") -> str:
    answer = b.sh(ASK, user=user, timeout=180).stdout.strip()
    assert answer, "an empty answer"
    return answer


def _wait(b: Booted, what: str, check: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        time.sleep(0.3)
    log = b.sh("journalctl -u edgellm --no-pager -n 40", check=False).stdout
    raise AssertionError(f"{what}, after {timeout:.0f} s; the journal:\n{log}")


def test_1_the_socket_is_for_its_group_only(box: Booted) -> None:
    assert _unit(box, "ActiveState", "edgellm.socket") == "active", "the socket unit is not active"
    mode = box.sh(f"stat -c '%a %U:%G' {SOCK}").stdout.strip()
    assert mode == "660 root:edgellm-clients", f"{SOCK} is {mode}"
    refused = box.sh(f"{EDGELLM} status", user="mallory", check=False)
    assert refused.returncode != 0 and "permission denied" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert _unit(box, "ActiveState") == "inactive", "a refused connect must not start the daemon"


def test_2_the_first_connection_starts_it_and_ready_means_serving(box: Booted) -> None:
    # the operator's first act, as the README says: grant the clients' group a model
    box.sh(f"{EDGELLM} access grant group:edgellm-clients client --model {MODEL}", timeout=120)
    assert _unit(box, "ActiveState") == "active", "the first connection did not start it"
    status = json.loads(box.sh(f"{EDGELLM} status --json", user="alice").stdout)
    assert status["status"] == "ready", status
    assert "model(s) loaded" in _unit(box, "StatusText"), "no STATUS= line from the daemon"
    shown = box.sh("systemctl status --no-pager edgellm.service", check=False).stdout
    assert 'Status: "ready;' in shown, shown
    # READY=1 waits for the preloaded models: right after `systemctl restart` returns
    # (Type=notify: it returns on READY=1) the model is loaded and pinned
    box.sh(
        f"sed -i 's/^# preload = .*/preload = [\"{MODEL}\"]/' /etc/edgellm/edgellm.toml"
        " && systemctl reset-failed edgellm.service && systemctl restart edgellm.service",
        timeout=180,
    )
    loaded = json.loads(box.sh(f"{EDGELLM} ps --json").stdout)
    assert [(m["name"], m["pinned"]) for m in loaded] == [(MODEL, True)], loaded


def test_3_a_chat_through_the_socket_with_the_key_from_the_credential(box: Booted) -> None:
    _served(box)
    vault = json.loads(box.sh(f"{EDGELLM} vault status --json").stdout)
    assert vault["key_source"] == "credential", vault
    unit = box.sh("systemctl cat edgellm.service").stdout  # with its drop-ins
    assert "LoadCredentialEncrypted=vault-key:/etc/edgellm/vault-key.cred" in unit, unit
    assert "\nLoadCredential=vault-key:" not in unit, "fell back to the key file"
    for path in ("/etc/edgellm/vault-key.cred", "/etc/edgellm/vault.key"):
        read = box.sh(f"cat {path}", user="edgellm", check=False)
        assert read.returncode != 0, f"the service user can read {path}"


def test_4_restarted_after_kill_9_and_after_a_hung_engine(box: Booted) -> None:
    pid = _unit(box, "MainPID")
    restarts = int(_unit(box, "NRestarts"))
    box.sh(f"kill -9 {pid}")
    _wait(
        box,
        "Restart= did not bring the daemon back after kill -9",
        lambda: _unit(box, "MainPID") not in ("0", pid) and _unit(box, "ActiveState") == "active",
    )
    assert int(_unit(box, "NRestarts")) == restarts + 1
    _served(box)
    # a decode step that never returns: the pings stop, systemd's watchdog kills it
    box.sh(
        "mkdir -p /etc/systemd/system/edgellm.service.d && printf '[Service]\\nWatchdogSec=6\\n"
        "Environment=EDGELLM_FAILPOINTS=engine.decode=hang@2\\n' >"
        " /etc/systemd/system/edgellm.service.d/test-hang.conf && systemctl daemon-reload"
        " && systemctl reset-failed edgellm.service && systemctl restart edgellm.service",
        timeout=180,
    )
    pid, restarts = _unit(box, "MainPID"), int(_unit(box, "NRestarts"))
    hung = box.sh(ASK, user="alice", check=False, timeout=120)
    assert hung.returncode != 0, "the hung request was answered"
    _wait(
        box,
        "the watchdog did not restart the hung daemon",
        lambda: int(_unit(box, "NRestarts")) > restarts and _unit(box, "MainPID") != pid,
    )
    journal = box.sh("journalctl -u edgellm --no-pager", check=False).stdout
    assert "Watchdog timeout" in journal, journal[-3000:]
    box.sh(
        "rm /etc/systemd/system/edgellm.service.d/test-hang.conf && systemctl daemon-reload"
        " && systemctl reset-failed edgellm.service && systemctl restart edgellm.service",
        timeout=180,
    )
    _served(box)


def _expires_in(b: Booted) -> float:
    _served(b)
    models = json.loads(b.sh(f"{EDGELLM} ps --json").stdout)
    return max(m["expires_in_seconds"] or 0 for m in models)


def test_5_reload_applies_keep_alive_and_keeps_the_old_settings_on_a_bad_file(
    box: Booted,
) -> None:
    conf = "/etc/edgellm/edgellm.toml"
    box.sh(f"sed -i '/^preload = /d; s/^keep_alive = .*/keep_alive = \"3m\"/' {conf}")
    box.sh(f"{EDGELLM} models unload {MODEL}", check=False)  # was pinned by preload
    box.sh("systemctl reload edgellm.service")
    _wait(box, "no reload", lambda: _unit(box, "StatusText").startswith("reloaded"))
    assert 150 < _expires_in(box) <= 180, "keep_alive = 3m was not applied"
    pid = _unit(box, "MainPID")
    box.sh(f"echo 'keep_alive = [' >> {conf} && systemctl reload edgellm.service")
    _wait(box, "no reload failure", lambda: "reload failed" in _unit(box, "StatusText"))
    assert _unit(box, "MainPID") == pid and _unit(box, "ActiveState") == "active"
    assert 150 < _expires_in(box) <= 180, "the old settings were not kept"
    box.sh(f"sed -i '$d' {conf}")


def test_6_a_reboot_brings_back_the_socket_the_vault_and_the_model(box: Booted) -> None:
    box.reboot()
    state = box.wait_booted()
    assert state == "running", f"the reboot came up {state}"
    assert _unit(box, "ActiveState", "edgellm.socket") == "active"
    _served(box)
    models = json.loads(box.sh(f"{EDGELLM} models list --json").stdout)
    assert MODEL in json.dumps(models), models
    box.sh(f"{EDGELLM} audit verify")
    box.sh(f"{EDGELLM} vault verify", timeout=180)


def test_7_the_sandbox_as_applied_is_safe(box: Booted) -> None:
    out = box.sh("systemd-analyze security --no-pager edgellm.service", check=False).stdout
    level = out.strip().splitlines()[-1]
    score = float(level.split("level for edgellm.service:")[1].split()[0])
    assert score <= 1.0, out


def test_8_uninstall_leaves_no_unit_and_no_user_and_purge_no_state(box: Booted) -> None:
    box.sh(f"{EDGELLM} service uninstall")
    units = box.sh("systemctl list-unit-files 'edgellm*' --no-legend", check=False).stdout
    assert "edgellm" not in units, units
    assert box.sh("getent passwd edgellm", check=False).returncode == 2, "the user is left"
    assert box.sh("getent group edgellm-clients", check=False).returncode == 2
    assert box.sh("test -d /var/lib/edgellm/vault", check=False).returncode == 0, "state lost"
    box.sh(f"{EDGELLM} service uninstall --purge")
    for path in ("/var/lib/edgellm", "/etc/edgellm"):
        assert box.sh(f"test -e {path}", check=False).returncode != 0, f"{path} is left"
