"""Opening the vault for the daemon and the offline commands, and the key file's
part in a key rotation."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edgellm.config import Settings
from edgellm.progress import Report, ignore
from edgellm.vault.files import fsync_dir
from edgellm.vault.keys import (
    MasterKey,
    NoKey,
    VaultKeyError,
    VaultMeta,
    create_key_file,
    find_master_key,
    read_key_file,
)
from edgellm.vault.store import VaultStore

log = logging.getLogger("edgellm.vault")


def vault_dir(settings: Settings) -> Path:
    return settings.state_dir / "vault"


def pending_key_file(key_file: Path) -> Path:
    """Where a rotation writes the new key before its commit point."""
    return key_file.with_name(key_file.name + ".new")


def open_vault(
    settings: Settings,
    create: bool = True,
    passphrase: str | None = None,
    allow_locked: bool = False,
    upgrade: bool = True,
) -> VaultStore:
    """The vault in the state directory, unlocked with the first key source found
    (systemd credential, key file, passphrase). On first use, with no vault and no key
    file yet, both are created and the key file's place is logged. With no key at
    all, ``allow_locked`` gives a locked vault (the daemon's case) instead of NoKey."""
    root = vault_dir(settings)
    key_file = settings.vault_key_file
    if not VaultStore.exists(root):
        if not create:
            raise VaultKeyError(f"no vault in {root}: create one with `edgellm vault init`")
        if not key_file.exists():
            key = create_key_file(key_file)
            log.info(
                'event=vault_key_created path=%s note="keep it safe: without it the '
                'models in %s cannot be read"',
                key_file,
                root,
            )
        else:
            key = find_master_key(key_file, None, None)
        root.parent.mkdir(parents=True, exist_ok=True)
        log.info("event=vault_created path=%s key=%s", root, key.source)
        return VaultStore.create(root, key)
    store = VaultStore(root)  # recovers an interrupted rotation before any key is read
    try:
        key = key_from_settings(settings, store.meta, passphrase)
    except NoKey:
        if not allow_locked:
            raise
        log.warning(
            'event=vault_locked path=%s note="no key found; requests that need '
            'the vault get 503 until `edgellm vault unlock`"',
            root,
        )
        return store
    store.unlock(key, upgrade=upgrade)
    return store


def key_from_settings(
    settings: Settings, meta: VaultMeta, passphrase: str | None = None
) -> MasterKey:
    """The key from the configured sources; a passphrase vault ignores key files."""
    key_file = settings.vault_key_file
    if meta.kdf is None:
        _finish_key_file_rotation(key_file, meta)
    use_file = key_file if meta.kdf is None and key_file.exists() else None
    return find_master_key(use_file, passphrase, meta.kdf)


def _finish_key_file_rotation(key_file: Path, meta: VaultMeta) -> None:
    """A crash between a rotation's commit and its key file's rename leaves the new
    key in ``<key file>.new``: move it into place. A ``.new`` the vault does not
    accept belongs to a rotation that never committed: delete it."""
    pending = pending_key_file(key_file)
    if not pending.exists():
        return
    try:
        new = read_key_file(pending)
    except VaultKeyError:
        return  # not ours to judge (wrong mode, not a key): leave it for the operator
    if new.check_value.hex() == meta.check:
        os.replace(pending, key_file)
        log.info("event=key_rotation_finished key_file=%s", key_file)
    else:
        pending.unlink()
    fsync_dir(key_file.parent)


def rotate_to_new_key_file(store: VaultStore, key_file: Path, report: Report = ignore) -> int:
    """Rotate to a new random key that replaces ``key_file``: the new key is durable
    in ``<key file>.new`` before the vault commits to it, and renamed over the old
    file after (a crash in between is finished by the next open)."""
    pending = pending_key_file(key_file)
    pending.unlink(missing_ok=True)
    new = create_key_file(pending)
    try:
        count = store.rotate_key(MasterKey(new.key, f"key file {key_file}"), report=report)
    except BaseException:
        if store.meta.key_id != new.key_id.hex():
            pending.unlink(missing_ok=True)
        raise
    os.replace(pending, key_file)
    fsync_dir(key_file.parent)
    return count
