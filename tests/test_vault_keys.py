"""The vault's keys and its crash safety: passphrases, key rotation (round trip, a
crash at every step, kill -9 at random moments), and kill -9 during imports."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgellm.config import load_settings
from edgellm.errors import VaultLocked
from edgellm.vault import rotation
from edgellm.vault.keys import (
    MasterKey,
    NoKey,
    VaultKeyError,
    WrongKey,
    create_key_file,
    from_passphrase,
    new_kdf_params,
    read_key_file,
)
from edgellm.vault.open import open_vault, pending_key_file, rotate_to_new_key_file
from edgellm.vault.store import VaultStore

PAYLOADS = {f"docs/{i}.bin": os.urandom(3000 + 1000 * i) for i in range(5)}


def _filled(root: Path, key: MasterKey) -> VaultStore:
    store = VaultStore.create(root, key)
    for name, blob in PAYLOADS.items():
        store.put_data([blob], name)
    store.audit.append(action="test", decision="allow")
    return store


def _contents(store: VaultStore) -> dict[str, bytes]:
    out = {}
    for row in store.list_data():
        with store.open(row["name"], "data") as path:
            out[row["name"]] = Path(path).read_bytes()
    return out


def _opens(root: Path, key: MasterKey) -> bool:
    try:
        VaultStore(root, key)
        return True
    except WrongKey:
        return False


def test_rotation_rewraps_headers_only_and_keeps_the_audit_chain(tmp_path: Path) -> None:
    old = create_key_file(tmp_path / "old.key")
    store = _filled(tmp_path / "v", old)
    objects = sorted((tmp_path / "v" / "objects").iterdir())
    bodies = {p.name: p.read_bytes()[85:] for p in objects}
    new = MasterKey(os.urandom(32), "new")
    assert store.rotate_key(new) == len(PAYLOADS)
    assert {p.name: p.read_bytes()[85:] for p in objects} == bodies  # payloads untouched
    assert not _opens(tmp_path / "v", old)
    reopened = VaultStore(tmp_path / "v", new)
    assert _contents(reopened) == PAYLOADS and reopened.verify() == []
    reopened.audit.append(action="after rotation", decision="allow")
    assert reopened.audit.verify()["ok"] and reopened.audit.verify()["rows"] == 2
    assert not (tmp_path / "v" / rotation.JOURNAL).exists()


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs, nothing cleans up."""


@pytest.mark.parametrize(
    "step,survivor",
    [
        ("rewrapping", "old"),
        ("journal written", "old"),
        ("committed", "new"),
        ("half the headers written", "new"),
    ],
)
def test_a_crash_at_any_step_leaves_exactly_one_key(
    tmp_path: Path, step: str, survivor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = create_key_file(tmp_path / "old.key")
    store = _filled(tmp_path / "v", old)
    new = MasterKey(os.urandom(32), "new")
    if step == "rewrapping":
        monkeypatch.setattr(rotation.fmt, "rewrap", lambda *a: (_ for _ in ()).throw(Crash()))
    elif step == "journal written":
        monkeypatch.setattr(rotation.VaultMeta, "save", lambda *a: (_ for _ in ()).throw(Crash()))
    elif step == "committed":
        monkeypatch.setattr(rotation, "_apply", lambda *a: (_ for _ in ()).throw(Crash()))
    else:
        real, calls = os.pwrite, []

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            calls.append(1)
            if len(calls) > len(PAYLOADS) // 2:
                raise Crash()
            return real(fd, data, offset)

        monkeypatch.setattr(rotation.os, "pwrite", pwrite)
    with pytest.raises(Crash):
        store.rotate_key(new)
    monkeypatch.undo()
    good, bad = (old, new) if survivor == "old" else (new, old)
    assert _opens(tmp_path / "v", good) and not _opens(tmp_path / "v", bad)
    reopened = VaultStore(tmp_path / "v", good)
    assert reopened.verify() == [] and _contents(reopened) == PAYLOADS
    assert reopened.audit.verify()["ok"]
    assert not (tmp_path / "v" / rotation.JOURNAL).exists()


ROTATE = """
import os, sys
from pathlib import Path
from edgellm.vault.keys import MasterKey
from edgellm.vault.store import VaultStore
root, old, new = Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
store = VaultStore(root, MasterKey(old, "old"))
print("go", flush=True)
store.rotate_key(MasterKey(new, "new"))
print("done", flush=True)
"""


def test_kill_9_during_rotation_never_strands_the_vault(tmp_path: Path) -> None:
    old = MasterKey(os.urandom(32), "old")
    store = VaultStore.create(tmp_path / "v", old)
    for i in range(300):  # enough headers that a kill can land mid-rotation
        store.put_data([os.urandom(64)], f"n/{i}")
    expected = _contents(store)
    outcomes, key = {"old": 0, "new": 0}, old
    rng = random.Random(4)
    span = 0.0
    for trial in range(10):
        new = MasterKey(os.urandom(32), f"new {trial}")
        proc = subprocess.Popen(
            [sys.executable, "-c", ROTATE, str(tmp_path / "v"), key.key.hex(), new.key.hex()],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"go"
        if trial == 0:  # the first runs to the end: how long a rotation takes here
            t0 = time.monotonic()
            assert proc.stdout.readline().strip() == b"done"
            span = time.monotonic() - t0
        else:
            time.sleep(rng.uniform(0, 1.2 * span))  # kill points spread over the rotation
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        opens_old, opens_new = _opens(tmp_path / "v", key), _opens(tmp_path / "v", new)
        assert opens_old != opens_new, f"trial {trial}: exactly one key must open the vault"
        key = key if opens_old else new
        outcomes["old" if opens_old else "new"] += 1
        reopened = VaultStore(tmp_path / "v", key)
        assert reopened.verify() == [] and _contents(reopened) == expected
    print(f"kill -9 during rotation ({span:.2f} s each): {outcomes}")
    # (where each kill lands is up to the scheduler; the deterministic crash test
    # above covers every step for certain)


IMPORT = """
import os, sys
from pathlib import Path
from edgellm.vault.keys import MasterKey
from edgellm.vault.store import VaultStore
store = VaultStore(Path(sys.argv[1]), MasterKey(bytes.fromhex(sys.argv[2]), "k"))
print("go", flush=True)
i = 0
while True:
    blob = os.urandom(1 << 20) * (1 + i % 4)  # 1-4 MiB, several segments each
    store.put_data([blob], f"obj{i % 3}")
    i += 1
"""


def test_kill_9_during_imports_always_leaves_a_vault_that_opens(tmp_path: Path) -> None:
    key = MasterKey(os.urandom(32), "k")
    VaultStore.create(tmp_path / "v", key)
    rng = random.Random(9)
    seen = set()
    for _ in range(16):
        proc = subprocess.Popen(
            [sys.executable, "-c", IMPORT, str(tmp_path / "v"), key.key.hex()],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"go"
        time.sleep(rng.uniform(0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = VaultStore(tmp_path / "v", key)  # removes what the crash left behind
        files = {p.name for p in (tmp_path / "v" / "objects").iterdir()}
        rows = store.list_data()
        assert len(files) == len(rows) and not any(f.startswith(".tmp-") for f in files)
        assert store.verify() == []
        for row in rows:  # every visible object is whole and is what its row says
            with store.open(row["name"], "data") as path:
                assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == row["sha256"]
            seen.add(row["sha256"])
    assert len(seen) >= 3  # the trials got past several commits


def test_passphrases(tmp_path: Path) -> None:
    kdf = new_kdf_params()
    assert kdf["n"] == 1 << 17 and kdf["r"] == 8 and kdf["p"] == 1
    store = VaultStore.create(tmp_path / "v", from_passphrase("correct horse", kdf), kdf)
    store.put_data([b"hello"], "greeting")
    settings = load_settings(
        environ={}, overrides={"state_dir": tmp_path, "vault_key_file": tmp_path / "unused.key"}
    )
    (tmp_path / "vault").symlink_to(tmp_path / "v")
    with pytest.raises(NoKey, match="opened by a passphrase"):
        open_vault(settings, create=False)
    with pytest.raises(WrongKey, match="wrong vault key"):
        open_vault(settings, create=False, passphrase="wrong horse")
    locked = open_vault(settings, create=False, allow_locked=True)
    assert locked.locked
    with pytest.raises(VaultLocked, match="vault is locked"):
        _contents(locked)
    assert locked.list_data()[0]["name"] == "greeting"  # metadata stays readable
    opened = open_vault(settings, create=False, passphrase="correct horse")
    assert _contents(opened) == {"greeting": b"hello"}
    with pytest.raises(VaultKeyError, match="weaker than N=2\\^17"):
        from_passphrase("x", {**kdf, "n": 1 << 14})


def test_key_file_rotation_finishes_after_a_crash_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "vault.key"
    settings = load_settings(
        environ={}, overrides={"state_dir": tmp_path, "vault_key_file": key_file}
    )
    store = open_vault(settings)  # creates the vault and the key file
    store.put_data([b"x" * 5000], "a")
    old = key_file.read_bytes()
    real_replace = os.replace

    def crash_on_key_rename(src: object, dst: object) -> None:
        if Path(str(dst)) == key_file:
            raise Crash()
        real_replace(src, dst)

    monkeypatch.setattr("edgellm.vault.open.os.replace", crash_on_key_rename)
    with pytest.raises(Crash):
        rotate_to_new_key_file(store, key_file)
    monkeypatch.undo()
    assert key_file.read_bytes() == old and pending_key_file(key_file).exists()
    reopened = open_vault(settings, create=False)  # finishes the rename
    assert key_file.read_bytes() != old and not pending_key_file(key_file).exists()
    assert _contents(reopened) == {"a": b"x" * 5000}
    assert read_key_file(key_file).key_id.hex() == reopened.meta.key_id
    # and the ordinary path: a new key file, the old key refused
    rotate_to_new_key_file(reopened, key_file)
    assert not _opens(tmp_path / "vault", MasterKey(old, "old"))
    assert _contents(open_vault(settings, create=False)) == {"a": b"x" * 5000}
