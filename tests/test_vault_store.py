"""Models encrypted at rest: the vault store, and a daemon serving from it."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from edgellm.errors import Conflict, IntegrityError, InvalidRequest, ModelNotFound, WrongKey
from edgellm.vault.keys import MasterKey, create_key_file, read_key_file
from edgellm.vault.store import VaultStore

from conftest import MODEL, Daemon

SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture
def vault(tmp_path: Path) -> VaultStore:
    return VaultStore.create(tmp_path / "vault", create_key_file(tmp_path / "vault.key"))


def _sha_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_import_list_open_and_remove(vault: VaultStore, model_file: Path) -> None:
    record = vault.add_file(model_file, "smol", expected_sha256=SHA, info={"source": "test"})
    assert record.sha256 == SHA and record.architecture == "llama" and record.source == "test"
    assert [r.name for r in vault.list()] == ["smol"]
    with vault.open("smol") as path:
        assert path.startswith("/proc/self/fd/")
        assert _sha_of(path) == SHA  # the plaintext, from memory
        with pytest.raises(OSError), open(path, "r+b") as f:  # sealed: nobody may change it
            f.write(b"x")
    with pytest.raises(Conflict, match="already exists"):
        vault.add_file(model_file, "smol")
    vault.remove("smol")
    assert vault.list() == [] and list(vault.objects.iterdir()) == []
    with pytest.raises(ModelNotFound):
        vault.get("smol")


def test_records_are_read_fresh_after_a_change_by_another_process(
    vault: VaultStore, model_file: Path, tmp_path: Path
) -> None:
    """Records are kept in memory between catalog changes; a change made through
    another connection (another process: `edgellm vault` commands) is seen at once."""
    vault.add_file(model_file, "smol", info={"source": "first"})
    assert vault.get("smol").source == "first"
    assert vault.get("smol") is vault.get("smol")  # kept, not re-read
    other = VaultStore(vault.root, read_key_file(tmp_path / "vault.key"))
    other.remove("smol")
    with pytest.raises(ModelNotFound):
        vault.get("smol")
    other.add_file(model_file, "smol", info={"source": "second"})
    assert vault.get("smol").source == "second"
    vault.remove("smol")  # and its own changes
    with pytest.raises(ModelNotFound):
        other.get("smol")


def test_bad_imports_leave_nothing(vault: VaultStore, model_file: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(InvalidRequest, match="not a valid GGUF"):
        vault.add_file(junk, "junk")
    with pytest.raises(IntegrityError, match="checksum mismatch for smol"):
        vault.add_file(model_file, "smol", expected_sha256="0" * 64)
    assert vault.list() == [] and list(vault.objects.iterdir()) == []


def test_a_crashed_import_is_cleaned_up_at_open(tmp_path: Path, vault: VaultStore) -> None:
    (vault.objects / ".tmp-crashed").write_bytes(b"partial")
    (vault.objects / "orphan.edgv").write_bytes(b"renamed, but no catalog row yet")
    key = MasterKey((tmp_path / "vault.key").read_bytes(), "test")
    reopened = VaultStore(vault.root, key)
    assert list(reopened.objects.iterdir()) == []


def test_wrong_key_is_told_apart_from_corruption(vault: VaultStore, model_file: Path) -> None:
    with pytest.raises(WrongKey, match="wrong vault key"):
        VaultStore(vault.root, MasterKey(os.urandom(32), "a guess"))
    vault.add_file(model_file, "smol")
    obj = next(vault.objects.iterdir())
    data = bytearray(obj.read_bytes())
    data[5 * (1 << 20)] ^= 0xFF
    obj.write_bytes(bytes(data))
    assert vault.verify() == [("smol", "segment 4 failed authentication (it was altered)")]
    with (
        pytest.raises(IntegrityError, match=r"integrity check failed for smol \(segment 4\)"),
        vault.open("smol"),
    ):
        pass


def _holds_plaintext(path: Path, needles: list[bytes]) -> bool:
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return any(n in data for n in needles)


def test_no_plaintext_on_disk_while_serving(make_daemon: Any, model_file: Path) -> None:
    started = time.time()
    d: Daemon = make_daemon()
    raw = model_file.read_bytes()
    # pieces of the model from its header, its middle and its end
    needles = [raw[4096 : 4096 + 256], raw[len(raw) // 2 : len(raw) // 2 + 256], raw[-512:-256]]
    with d.client() as c:
        c.load(MODEL)
        assert c.chat([{"role": "user", "content": "Hi"}], max_tokens=2)
        # everything in the state directory, and whatever anyone wrote to the temporary
        # directories since the daemon started
        written = [
            p
            for root in (Path("/tmp"), Path("/var/tmp"))
            for p in root.rglob("*")
            if p.is_file() and p.stat().st_mtime >= started
        ]
        suspects = [
            p
            for p in [*d.state_dir.rglob("*"), *written]
            if p.is_file() and _holds_plaintext(p, needles)
        ]
        assert suspects == []
        # the daemon's copy lives in a memfd
        maps = Path(f"/proc/{d.proc.pid}/maps").read_text() if d.proc else ""
        assert f"memfd:edgellm:{MODEL}" in maps


def test_vault_commands(tmp_path: Path, model_file: Path) -> None:
    import subprocess
    import sys

    env = {
        **os.environ,
        "EDGELLM_STATE_DIR": str(tmp_path / "s"),
        "EDGELLM_SOCKET": str(tmp_path / "none.sock"),
    }
    key = tmp_path / "vault.key"

    def cli(*args: str, key_file: Path = key) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgellm", *args, "--key-file", str(key_file)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    missing = cli("vault", "status")
    assert missing.returncode == 1 and "edgellm vault init" in missing.stderr
    created = cli("vault", "init")
    assert created.returncode == 0 and "created a new key in" in created.stdout
    assert key.stat().st_mode & 0o777 == 0o600
    again = cli("vault", "init")  # never twice: the second says so, and changes nothing
    assert again.returncode == 0 and "a vault already exists" in again.stdout
    assert cli("models", "add", str(model_file), "--name", "smol").returncode == 0
    status = cli("vault", "status")
    assert "unlocked" in status.stdout and "1 model(s), 0 data object(s), 94 MB" in status.stdout
    assert cli("vault", "verify").stdout.strip() == "all 1 object(s) verified"
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    wrong.chmod(0o600)
    locked = cli("vault", "status", key_file=wrong)
    assert "locked" in locked.stdout and "wrong vault key" in locked.stdout
    refused = cli("vault", "verify", key_file=wrong)
    assert refused.returncode == 1 and "wrong vault key" in refused.stderr
    obj = next((tmp_path / "s" / "vault" / "objects").iterdir())
    data = bytearray(obj.read_bytes())
    data[-100] ^= 1
    obj.write_bytes(bytes(data))
    bad = cli("vault", "verify")
    assert bad.returncode == 1
    assert bad.stdout.startswith("smol: segment 93 failed authentication")
    assert "1 object(s) failed verification" in bad.stderr and "Traceback" not in bad.stderr
