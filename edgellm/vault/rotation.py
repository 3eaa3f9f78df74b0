"""Key rotation: every object's data key rewrapped under a new master key, atomically.

Each object's header holds its wrapped data key, so a rotation rewrites one header
per object, and a crash must never leave some objects under one key and the vault's
check value under the other. A redo journal makes it atomic:

1. compute every new header and write them all to ``rotate.journal`` (temporary
   file, fsync, rename): nothing the vault reads has changed yet;
2. save ``vault.json`` with the new key's check value (rename): the commit point;
3. write the new headers into the objects in place, fsync, delete the journal.

``recover`` runs whenever the vault opens, before any key is asked for: a journal
whose key id matches ``vault.json`` is replayed (step 3 again; the headers are
written whole, so replay is idempotent), any other journal is a rotation that never
committed and is deleted. So after a crash the vault opens with exactly one key: the
old one before the commit point, the new one after it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from edgellm.progress import Report, ignore
from edgellm.vault import format as fmt
from edgellm.vault.files import fsync_dir
from edgellm.vault.keys import MasterKey, VaultMeta

JOURNAL = "rotate.journal"


def rotate(
    root: Path,
    files: list[tuple[str, bytes]],
    old_wrap: bytes,
    new_key: MasterKey,
    kdf: dict[str, object] | None,
    audit_key: bytes,
    report: Report = ignore,
) -> int:
    """``files``: each object's file and identity (fmt.identity), which its new header
    stays bound to."""
    new_wrap = new_key.derive("object-wrap")
    headers = {}
    for done, (file, ident) in enumerate(files):
        report("rewrap data keys", done, len(files))
        with open(root / "objects" / file, "rb") as f:
            raw = f.read(fmt.HEADER_LEN)
        headers[file] = fmt.rewrap(raw, old_wrap, new_wrap, new_key.key_id, ident).hex()
    meta = VaultMeta.for_key(new_key, kdf, audit_key=audit_key)
    _write_journal(root, {"key_id": meta.key_id, "headers": headers})
    meta.save(root / "vault.json")  # the commit point
    report("rewrap data keys", len(files), len(files))
    _apply(root, headers)
    return len(headers)


def recover(root: Path) -> None:
    for tmp in root.glob(".tmp-*"):  # a journal or vault.json that was never renamed
        tmp.unlink()
    journal = root / JOURNAL
    if not journal.exists():
        return
    entry = json.loads(journal.read_text())  # whole or absent: it was renamed into place
    if entry["key_id"] == VaultMeta.load(root / "vault.json").key_id:
        _apply(root, entry["headers"])
    else:
        journal.unlink()
        fsync_dir(root)


def _write_journal(root: Path, entry: dict[str, object]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-journal-", dir=root)
    with os.fdopen(fd, "w") as f:
        json.dump(entry, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / JOURNAL)
    fsync_dir(root)


def _apply(root: Path, headers: dict[str, str]) -> None:
    for file, header in headers.items():
        try:
            fd = os.open(root / "objects" / file, os.O_WRONLY)
        except FileNotFoundError:  # removed since; nothing to rewrap
            continue
        try:
            os.pwrite(fd, bytes.fromhex(header), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    (root / JOURNAL).unlink(missing_ok=True)
    fsync_dir(root)
