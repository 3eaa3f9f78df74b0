"""The vault's store: models (and later data) encrypted at rest, a ModelSource.

    <root>/vault.json         key check value, key id, passphrase parameters
    <root>/catalog.db         SQLite: one row per object (name, kind, file, record)
    <root>/objects/<id>.edgv  the objects, in FORMAT.md's format

An import streams into a temporary file beside the objects, encrypting as it goes
(the plaintext's first bytes are kept in memory to check its GGUF header), is
fsynced and renamed, and only then gets its catalog row: a crash leaves the old
state or the new, and files no row names are removed when the vault opens. Loading
decrypts into an anonymous memory file (memfd), sealed against writes, whose
/proc/self/fd path llama.cpp opens: plaintext never touches the disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import sqlite_utils

from edgellm.errors import Conflict, IntegrityError, ModelNotFound
from edgellm.runtime.gguf_meta import read_gguf_metadata
from edgellm.runtime.source import ModelRecord, check_name
from edgellm.vault import format as fmt
from edgellm.vault.files import fsync_dir
from edgellm.vault.keys import MasterKey, VaultMeta

HEAD_LIMIT = 64 * 1024 * 1024  # a GGUF's key/value section must fit in this much
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class VaultStore:
    def __init__(self, root: Path, key: MasterKey) -> None:
        self.root = Path(root)
        VaultMeta.load(self.root / "vault.json").verify(key)
        self._wrap, self._key_id = key.derive("object-wrap"), key.key_id
        self.objects = self.root / "objects"
        self.objects.mkdir(mode=0o700, exist_ok=True)
        conn = sqlite3.connect(self.root / "catalog.db", check_same_thread=False,
                               isolation_level=None)
        self._lock = threading.Lock()  # one connection, shared by the daemon's threads
        self.db = sqlite_utils.Database(conn)
        if "objects" not in self.db.table_names():
            self.db["objects"].create({"name": str, "kind": str, "file": str, "sha256": str,
                                       "size": int, "record": str, "added": str}, pk="name")
        self.remove_leftovers()
        from edgellm.vault.access import AccessPolicy
        from edgellm.vault.audit import AuditLog

        self.access = AccessPolicy(self.db, self._lock)
        self.audit = AuditLog(self.root / "audit.db", key.derive("audit-hmac"))

    @staticmethod
    def exists(root: Path) -> bool:
        return (Path(root) / "vault.json").exists()

    @classmethod
    def create(cls, root: Path, key: MasterKey, kdf: dict[str, object] | None = None
               ) -> VaultStore:
        root = Path(root)
        if cls.exists(root):
            raise Conflict(f"a vault already exists in {root}")
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        VaultMeta.for_key(key, kdf).save(root / "vault.json")
        return cls(root, key)

    def remove_leftovers(self) -> None:
        with self._lock:
            named = {row["file"] for row in self.db["objects"].rows}
        for path in self.objects.iterdir():
            if path.name.startswith(".tmp-") or path.name not in named:
                path.unlink(missing_ok=True)

    # --- ModelSource -----------------------------------------------------------------
    def _row(self, name: str, kind: str = "model") -> dict[str, Any]:
        with self._lock:
            rows = list(self.db["objects"].rows_where("name = ? and kind = ?", [name, kind]))
        if not rows:
            raise ModelNotFound(f"{kind} {name!r} not found", param="model")
        return rows[0]

    def get(self, name: str) -> ModelRecord:
        data = json.loads(self._row(name)["record"])
        known = {f.name for f in fields(ModelRecord)}
        return ModelRecord(**{k: v for k, v in data.items() if k in known})

    def list(self) -> list[ModelRecord]:
        with self._lock:
            names = [r["name"] for r in self.db["objects"].rows_where(
                "kind = 'model'", order_by="name")]
        return [self.get(n) for n in names]

    @contextmanager
    def open(self, name: str) -> Iterator[str]:
        """The model's plaintext in a sealed memory file, as a path llama.cpp can open."""
        row = self._row(name)
        fd = os.memfd_create(f"edgellm:{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            with open(self.objects / row["file"], "rb") as f:
                try:
                    for piece in fmt.decrypt_stream(f, self._wrap):
                        os.write(fd, piece)
                except fmt.IntegrityError as exc:
                    where = "header" if exc.segment is None else f"segment {exc.segment}"
                    raise IntegrityError(f"integrity check failed for {name} ({where})") \
                        from None
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)

    # --- management ------------------------------------------------------------------
    def add_file(self, path: Path, name: str, **kw: Any) -> ModelRecord:
        with open(path, "rb") as f:
            return self.add_stream(iter(lambda: f.read(1 << 20), b""), name, **kw)

    def add_stream(self, chunks: Iterable[bytes], name: str, *,
                   expected_sha256: str | None = None, replace: bool = False,
                   info: dict[str, Any] | None = None) -> ModelRecord:
        check_name(name)
        with self._lock:
            taken = self.db["objects"].count_where("name = ?", [name])
        if taken and not replace:
            raise Conflict(f"model {name!r} already exists; remove it first", param="name")
        digest, head, size = hashlib.sha256(), bytearray(), 0

        def plaintext() -> Iterator[bytes]:
            nonlocal size
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                if len(head) < HEAD_LIMIT:
                    head.extend(chunk[: HEAD_LIMIT - len(head)])
                yield chunk

        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=self.objects)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for sealed in fmt.encrypt_stream(plaintext(), self._wrap, self._key_id):
                    out.write(sealed)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            if expected_sha256 and sha != expected_sha256:
                raise IntegrityError(f"checksum mismatch for {name}: expected sha256 "
                                     f"{expected_sha256}, got {sha}; the file was not stored")
            meta = read_gguf_metadata(bytes(head), name)
            file = f"{os.urandom(12).hex()}.edgv"
            os.replace(tmp, self.objects / file)
            fsync_dir(self.objects)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        info = dict(info or {})
        record = ModelRecord(
            name=name, format="gguf", sha256=sha, size=size,
            quantization=info.pop("quantization", None) or meta["quantization"],
            license=info.pop("license", None) or str(meta["license"] or ""),
            source=info.pop("source", "local file"),
            added=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), extra=info,
            **{k: meta[k] for k in ("architecture", "context_length", "n_layer", "n_embd",
                                    "n_head", "n_head_kv", "head_dim", "n_vocab",
                                    "has_chat_template")})
        old = self._put(name, "model", file, sha, size, record.as_dict())
        if old:
            (self.objects / old).unlink(missing_ok=True)
        return record

    def _put(self, name: str, kind: str, file: str, sha: str, size: int,
             record: dict[str, Any]) -> str | None:
        """Commit the row (the moment the object becomes visible); return the file of
        the object it replaced."""
        with self._lock:
            old = [r["file"] for r in self.db["objects"].rows_where("name = ?", [name])]
            self.db["objects"].upsert({"name": name, "kind": kind, "file": file, "sha256": sha,
                                       "size": size, "record": json.dumps(record),
                                       "added": record.get("added", "")}, pk="name")
        return old[0] if old else None

    def remove(self, name: str) -> ModelRecord:
        record = self.get(name)
        row = self._row(name)
        with self._lock:
            self.db["objects"].delete(name)
        (self.objects / row["file"]).unlink(missing_ok=True)
        return record

    def verify(self) -> list[tuple[str, str]]:
        """Authenticate every segment of every object; (name, problem) for each bad one."""
        bad = []
        with self._lock:
            rows = list(self.db["objects"].rows)
        for row in rows:
            try:
                with open(self.objects / row["file"], "rb") as f:
                    for _ in fmt.decrypt_stream(f, self._wrap):
                        pass
            except FileNotFoundError:
                bad.append((row["name"], "its object file is missing"))
            except fmt.IntegrityError as exc:
                bad.append((row["name"], str(exc)))
        return bad
