"""Opening the vault for the daemon and the offline commands."""

from __future__ import annotations

import logging
from pathlib import Path

from edgellm.config import Settings
from edgellm.vault.keys import VaultMeta, create_key_file, find_master_key
from edgellm.vault.store import VaultStore

log = logging.getLogger("edgellm.vault")


def vault_dir(settings: Settings) -> Path:
    return settings.state_dir / "vault"


def open_vault(settings: Settings, create: bool = True) -> VaultStore:
    """The vault in the state directory, unlocked with the first key source found
    (systemd credential, then the key file). On first use, with no vault and no key
    file yet, both are created and the key file's place is logged."""
    root = vault_dir(settings)
    key_file = settings.vault_key_file
    if not VaultStore.exists(root):
        if not create:
            raise FileNotFoundError(f"no vault in {root}")
        if not key_file.exists():
            key = create_key_file(key_file)
            log.info("event=vault_key_created path=%s note=\"keep it safe: without it the "
                        "models in %s cannot be read\"", key_file, root)
        else:
            key = find_master_key(key_file, None, None)
        root.parent.mkdir(parents=True, exist_ok=True)
        log.info("event=vault_created path=%s key=%s", root, key.source)
        return VaultStore.create(root, key)
    meta = VaultMeta.load(root / "vault.json")
    key = find_master_key(key_file if key_file.exists() else None, None, meta.kdf)
    return VaultStore(root, key)
