"""The vault's store: models and data encrypted at rest; the runtime's ModelSource.

    <root>/vault.json         key check value, key id, passphrase parameters
    <root>/catalog.db         SQLite: one row per object (kind, name, file, record),
                              and the access grants
    <root>/audit.db           the audit log (audit.py)
    <root>/objects/<id>.edgv  the objects, in FORMAT.md's format

An import streams into a temporary file beside the objects, encrypting as it goes
(a model's first bytes are kept in memory to check its GGUF header), is fsynced and
renamed, and only then gets its catalog row: a crash leaves the old state or the new,
and files no row names are removed when the vault opens. Loading decrypts into an
anonymous memory file (memfd), sealed against writes, whose /proc/self/fd path
llama.cpp opens: plaintext never touches the disk.

The store can be locked: the catalog and the grants stay readable (they hold no
secret), and everything that needs the key raises VaultLocked until ``unlock``.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import hmac
import json
import logging
import os
import queue
import re
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

from edgellm.errors import (
    Conflict,
    DataNotFound,
    IntegrityError,
    InvalidRequest,
    ModelNotFound,
    VaultLocked,
)
from edgellm.progress import Report, counted, ignore
from edgellm.runtime.gguf_meta import check_gguf_tensors, read_gguf_metadata
from edgellm.runtime.source import ModelRecord, check_name
from edgellm.vault import format as fmt
from edgellm.vault import rotation
from edgellm.vault.access import AccessPolicy
from edgellm.vault.audit import AuditLog
from edgellm.vault.files import fsync_dir
from edgellm.vault.keys import MasterKey, VaultMeta

log = logging.getLogger("edgellm.vault")
HEAD_LIMIT = 64 * 1024 * 1024  # a GGUF's key/value section must fit in this much
ONNX_LIMIT = 2 * 1024**3  # protobuf's limit: bigger models keep weights outside
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
DATA_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


def check_data_name(name: str) -> str:
    if len(name) > 200 or not DATA_NAME_RE.match(name):
        raise InvalidRequest(
            f"invalid data name {name!r}: use letters, digits, '.', '_', '-', "
            "with '/' between parts (e.g. docs/manual.pdf), at most 200 "
            "characters",
            param="name",
        )
    return name


class _Hasher:
    """SHA-256 on a thread of its own, beside decryption (hashlib lets go of the GIL):
    checking a model's checksum on every load then costs little more than decrypting."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._pieces: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (piece := self._pieces.get()) is not None:
            self._digest.update(piece)

    def feed(self, piece: bytes) -> None:
        self._pieces.put(piece)

    def result(self) -> str:
        self._pieces.put(None)
        self._thread.join()
        return self._digest.hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class VaultStore:
    def __init__(self, root: Path, key: MasterKey | None = None) -> None:
        self.root = Path(root)
        rotation.recover(self.root)  # finish or drop a key rotation a crash interrupted
        self.objects = self.root / "objects"
        self.objects.mkdir(mode=0o700, exist_ok=True)
        conn = sqlite3.connect(
            self.root / "catalog.db", check_same_thread=False, isolation_level=None
        )
        self._lock = threading.Lock()  # one connection, shared by the daemon's threads
        # held while the key is read, changed or used to unwrap a data key: a rotation
        # sees every committed object, and no import commits under a stale key
        self._keylock = threading.RLock()
        self._wrap: bytes | None = None
        self._format = fmt.VERSION  # vault.json's version, read at unlock
        self._master: MasterKey | None = None
        self._key_id = b""
        self.key_source = ""
        self.db = sqlite_utils.Database(conn)
        self._records: dict[str, ModelRecord] = {}  # parsed, while the catalog is unchanged
        self._records_version: int | None = None
        self._generation = 0
        table = self.db.table("objects")
        if "objects" not in self.db.table_names():
            table.create(
                {
                    "kind": str,
                    "name": str,
                    "file": str,
                    "sha256": str,
                    "size": int,
                    "record": str,
                    "added": str,
                },
                pk=("kind", "name"),
            )
        elif table.pks == ["name"]:  # vaults from before data objects
            table.transform(pk=("kind", "name"))
        self.remove_leftovers()
        self.access = AccessPolicy(self.db, self._lock)
        self.audit = AuditLog(self.root / "audit.db", head=self.root / "audit.head")
        if key is not None:
            self.unlock(key)

    @staticmethod
    def exists(root: Path) -> bool:
        return (Path(root) / "vault.json").exists()

    @classmethod
    def create(cls, root: Path, key: MasterKey, kdf: dict[str, object] | None = None) -> VaultStore:
        root = Path(root)
        if cls.exists(root):
            raise Conflict(f"a vault already exists in {root}")
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        VaultMeta.for_key(key, kdf).save(root / "vault.json")
        store = cls(root, key)
        store.audit.start_head()
        return store

    # --- the key -----------------------------------------------------------------------
    @property
    def meta(self) -> VaultMeta:
        return VaultMeta.load(self.root / "vault.json")

    @property
    def locked(self) -> bool:
        return self._wrap is None

    def unlock(self, key: MasterKey, upgrade: bool = True) -> None:
        """Check the key against the vault (WrongKey if it is not this vault's) and
        keep what is derived from it; a vault of an older format is migrated unless
        ``upgrade`` is false (reading an auditor's copy as it is)."""
        with self._keylock:
            meta = self.meta
            meta.verify(key)
            self._wrap, self._key_id, self.key_source = (
                key.derive("object-wrap"),
                key.key_id,
                key.source,
            )
            self._master = key
            self._format = meta.version
            audit_key = meta.audit_key_for(key)
            self.audit.set_key(audit_key, head_required=meta.version >= fmt.VERSION)
            if meta.version < fmt.VERSION and upgrade:
                self._upgrade(key, meta, audit_key)

    def _upgrade(self, key: MasterKey, meta: VaultMeta, audit_key: bytes) -> None:
        """A vault from before format 2: bind every object to its identity, start the
        audit log's signed head from the log as it stands, then save vault.json as
        version 2 (the commit point: from then on both are required)."""
        bad = self.migrate()
        for label, problem in bad:
            log.error("event=vault_migration_refused object=%s problem=%r", label, problem)
        self.audit.start_head()
        VaultMeta.for_key(key, meta.kdf, audit_key=audit_key).save(self.root / "vault.json")
        self._format = fmt.VERSION
        self.audit.set_key(audit_key, head_required=True)
        log.info("event=vault_migrated version=%d objects_refused=%d", fmt.VERSION, len(bad))

    def lock(self) -> None:
        """Forget the key: nothing encrypted can be read or written until unlock."""
        with self._keylock:
            self._wrap, self._key_id, self.key_source, self._master = None, b"", "", None
            self.audit.set_key(None)

    def _keys(self) -> tuple[bytes, bytes]:
        if self._wrap is None:
            raise VaultLocked()
        return self._wrap, self._key_id

    def rotate_key(
        self, new_key: MasterKey, kdf: dict[str, object] | None = None, report: Report = ignore
    ) -> int:
        """Rewrap every object's data key under ``new_key`` (payloads untouched),
        atomically; returns the number of objects rewrapped."""
        with self._keylock:
            old_wrap, _ = self._keys()
            with self._lock:
                files = [
                    (r["file"], fmt.identity(r["kind"], r["name"], r["sha256"]))
                    for r in self.db.table("objects").rows
                ]
            assert self._master is not None  # unlocked just above
            audit_key = self.meta.audit_key_for(self._master)
            count = rotation.rotate(self.root, files, old_wrap, new_key, kdf, audit_key, report)
            self.unlock(new_key)
            return count

    def remove_leftovers(self) -> None:
        with self._lock:
            named = {row["file"] for row in self.db.table("objects").rows}
        for path in self.objects.iterdir():
            if path.name.startswith(".tmp-") or path.name not in named:
                path.unlink(missing_ok=True)

    # --- reading -----------------------------------------------------------------------
    def _row(self, name: str, kind: str = "model") -> dict[str, Any]:
        with self._lock:  # plain SQL: every request reads its model's row
            cursor = self.db.conn.execute(
                "SELECT * FROM objects WHERE kind = ? AND name = ?", [kind, name]
            )
            columns = [c[0] for c in cursor.description]
            rows = [dict(zip(columns, r, strict=True)) for r in cursor.fetchall()]
        if not rows:
            if kind == "data":
                raise DataNotFound(f"no data object named {name!r}", param="name")
            raise ModelNotFound(f"{kind} {name!r} not found", param="model")
        return rows[0]

    def get(self, name: str) -> ModelRecord:
        """A model's record; every request asks, so parsed records are kept until the
        catalog changes (a write here, or a commit by another process, which SQLite's
        data_version tells). Records are shared: callers read them, never change them."""
        with self._lock:
            version = self.db.conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._records_version:
                self._records, self._records_version = {}, version
            record, generation = self._records.get(name), self._generation
        if record is not None:
            return record
        data = json.loads(self._row(name)["record"])
        known = {f.name for f in fields(ModelRecord)}
        record = ModelRecord(**{k: v for k, v in data.items() if k in known})
        with self._lock:
            if generation == self._generation:  # no write here since the row was read
                self._records[name] = record
        return record

    def _changed(self) -> None:
        """Called with the lock held after a write to the catalog's objects."""
        self._generation += 1
        self._records = {}

    def list(self) -> list[ModelRecord]:
        with self._lock:
            names = [
                r["name"]
                for r in self.db.table("objects").rows_where("kind = 'model'", order_by="name")
            ]
        return [self.get(n) for n in names]

    def data_info(self, name: str) -> dict[str, Any]:
        return json.loads(self._row(name, "data")["record"])

    def list_data(self, prefix: str = "") -> builtins.list[dict[str, Any]]:
        with self._lock:
            rows = list(
                self.db.table("objects").rows_where(
                    "kind = 'data' and substr(name, 1, ?) = ?",
                    [len(prefix), prefix],
                    order_by="name",
                )
            )
        return [json.loads(r["record"]) for r in rows]

    @contextmanager
    def open(self, name: str, kind: str = "model") -> Iterator[str]:
        """The object's plaintext in a sealed memory file, as a path (llama.cpp opens
        it; the data API reads it). Every segment is authenticated, and the whole
        checked against the catalog's sha256, before the path is given out."""
        row = self._row(name, kind)
        fd = os.memfd_create(f"edgellm:{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            try:
                self._read_object(row, lambda piece: os.write(fd, piece))
            except fmt.IntegrityError as exc:
                where = (
                    f"segment {exc.segment}"
                    if exc.segment is not None
                    else str(exc)
                    if str(exc).startswith("its plaintext")
                    else "header"
                )
                raise IntegrityError(f"integrity check failed for {name} ({where})") from None
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)

    def _read_object(self, row: dict[str, Any], sink: Any, allow_v1: bool | None = None) -> None:
        """Decrypt one object to ``sink``, piece by piece: its header authenticated with
        the identity its catalog row gives, each segment as it comes, and the plaintext's
        sha256 against the row's at the end (fmt.IntegrityError otherwise)."""
        ident = fmt.identity(row["kind"], row["name"], row["sha256"])
        recorded = json.loads(row["record"] or "{}").get("sha256", row["sha256"])
        if allow_v1 is None:
            allow_v1 = self._format < fmt.VERSION
        hasher = _Hasher()
        try:
            with open(self.objects / row["file"], "rb") as f:
                with self._keylock:
                    header, aead = fmt.open_object(f, self._keys()[0], ident, allow_v1)
                for piece in fmt.decrypt_segments(f, header, aead):
                    hasher.feed(piece)
                    sink(piece)
        finally:
            digest = hasher.result()
        if not hmac.compare_digest(digest, row["sha256"]) or recorded != row["sha256"]:
            raise fmt.IntegrityError(
                "its plaintext does not match the catalog's sha256: "
                "the object was swapped or its catalog row changed"
            )

    def migrate(self) -> builtins.list[tuple[str, str]]:
        """Bring a version 1 vault to version 2: each object whose plaintext matches its
        catalog row gets a header bound to that row's identity (85 bytes rewritten);
        one that does not is left as it was, and a version 2 vault refuses it, so a swap
        made before the migration is caught too. Returns (name, problem) for those."""
        bad = []
        with self._lock:
            rows = list(self.db.table("objects").rows)
        wrap, key_id = self._keys()
        for row in rows:
            label = row["name"] if row["kind"] == "model" else f"data:{row['name']}"
            path = self.objects / row["file"]
            try:
                with open(path, "rb") as f:
                    raw = f.read(fmt.HEADER_LEN)
                if fmt.Header.decode(raw).version >= fmt.VERSION:
                    continue  # migrated before a crash cut the last run short
                self._read_object({**row, "sha256": row["sha256"]}, lambda _: None, True)
                ident = fmt.identity(row["kind"], row["name"], row["sha256"])
                new = fmt.rewrap(raw, wrap, wrap, key_id, b"", ident)
                with open(path, "r+b") as f:
                    f.write(new)
                    f.flush()
                    os.fsync(f.fileno())
            except (OSError, fmt.IntegrityError) as exc:
                bad.append((label, str(exc)))
        return bad

    # --- writing -----------------------------------------------------------------------
    def add_file(self, path: Path, name: str, report: Report = ignore, **kw: Any) -> ModelRecord:
        """``add_stream`` from a file, its encryption into the vault reported."""
        with open(path, "rb") as f:
            chunks = iter(lambda: f.read(1 << 20), b"")
            size = os.fstat(f.fileno()).st_size
            return self.add_stream(counted(chunks, report, "store in the vault", size), name, **kw)

    def add_stream(
        self,
        chunks: Iterable[bytes],
        name: str,
        *,
        expected_sha256: str | None = None,
        replace: bool = False,
        info: dict[str, Any] | None = None,
    ) -> ModelRecord:
        """Import a GGUF model (its header is checked) or an ONNX model or bundle (checked
        with onnx.checker) before it becomes visible. An ONNX model is held in memory
        while it is checked; GGUF files only their header."""
        check_name(name)
        head = bytearray()

        def check(sha: str, size: int) -> dict[str, Any]:
            extra = dict(info or {})
            if bytes(head[:4]) == b"GGUF":
                meta = read_gguf_metadata(bytes(head), name)
                check_gguf_tensors(head, size, name)
                described = {
                    k: meta[k]
                    for k in (
                        "architecture",
                        "context_length",
                        "n_layer",
                        "n_embd",
                        "n_head",
                        "n_head_kv",
                        "head_dim",
                        "n_vocab",
                        "has_chat_template",
                        "template_tools",
                        "tool_syntax",
                        "quantization",
                        "license",
                    )
                }
                described["format"] = "gguf"
                described["license"] = str(described["license"] or "")
            else:
                if size > ONNX_LIMIT:
                    raise InvalidRequest(
                        f"{name} is neither GGUF nor an ONNX model under "
                        f"{ONNX_LIMIT >> 30} GB (external data is not "
                        "supported)",
                        param="name",
                    )
                from edgellm.runtime.onnx.bundle import describe

                described = describe(bytes(head), name)
                extra = {**described.pop("extra"), **extra}
            for key in ("quantization", "license"):
                if extra.get(key):
                    described[key] = extra.pop(key)
            return ModelRecord(
                name=name,
                sha256=sha,
                size=size,
                added=_now(),
                source=extra.pop("source", "local file"),
                extra=extra,
                **described,
            ).as_dict()

        record = self._import(chunks, "model", name, check, head, expected_sha256, replace)
        return ModelRecord(**record)

    def put_data(
        self,
        chunks: Iterable[bytes],
        name: str,
        *,
        replace: bool = True,
        expected_sha256: str | None = None,
        source: str = "",
    ) -> dict[str, Any]:
        """Store any file under ``name``; replacing an existing one by default."""
        check_data_name(name)
        return self._import(
            chunks,
            "data",
            name,
            lambda sha, size: {
                "name": name,
                "sha256": sha,
                "size": size,
                "added": _now(),
                "source": source,
            },
            None,
            expected_sha256,
            replace,
        )

    def _import(
        self,
        chunks: Iterable[bytes],
        kind: str,
        name: str,
        describe: Any,
        head: bytearray | None,
        expected_sha256: str | None,
        replace: bool,
    ) -> dict[str, Any]:
        with self._lock:
            taken = self.db.table("objects").count_where("kind = ? and name = ?", [kind, name])
        if taken and not replace:
            raise Conflict(f"{kind} {name!r} already exists; remove it first", param="name")
        with self._keylock:
            wrap, key_id = self._keys()
        digest, size = hashlib.sha256(), 0

        def plaintext() -> Iterator[bytes]:
            nonlocal size
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                if head is not None:
                    # a GGUF's header tells all; an ONNX model is checked whole
                    limit = HEAD_LIMIT if head[:4] == b"GGUF" else ONNX_LIMIT + 1
                    if len(head) < limit:
                        head.extend(chunk[: limit - len(head)])
                yield chunk

        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=self.objects)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "r+b") as out:
                for sealed in fmt.encrypt_stream(plaintext(), wrap, key_id):
                    out.write(sealed)
                sha = digest.hexdigest()
                if expected_sha256 and sha != expected_sha256:
                    raise IntegrityError(
                        f"checksum mismatch for {name}: expected sha256 "
                        f"{expected_sha256}, got {sha}; it was not stored"
                    )
                record = describe(sha, size)
                with self._keylock:
                    # bind the header to what the catalog row will say (its kind, name
                    # and sha256), under the key of now: it may have been rotated
                    # while we encrypted
                    current_wrap, current_id = self._keys()
                    out.seek(0)
                    raw = out.read(fmt.HEADER_LEN)
                    out.seek(0)
                    out.write(
                        fmt.rewrap(
                            raw, wrap, current_wrap, current_id, b"", fmt.identity(kind, name, sha)
                        )
                    )
                    out.flush()
                    os.fsync(out.fileno())
                    file = f"{os.urandom(12).hex()}.edgv"
                    os.replace(tmp, self.objects / file)
                    fsync_dir(self.objects)
                    old = self._put(kind, name, file, sha, size, record)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if old:
            (self.objects / old).unlink(missing_ok=True)
        return record

    def _put(
        self, kind: str, name: str, file: str, sha: str, size: int, record: dict[str, Any]
    ) -> str | None:
        """Commit the row (the moment the object becomes visible); return the file of
        the object it replaced."""
        with self._lock:
            old = [
                r["file"]
                for r in self.db.table("objects").rows_where("kind = ? and name = ?", [kind, name])
            ]
            self.db.table("objects").upsert(
                {
                    "kind": kind,
                    "name": name,
                    "file": file,
                    "sha256": sha,
                    "size": size,
                    "record": json.dumps(record),
                    "added": record.get("added", ""),
                },
                pk=("kind", "name"),
            )
            self._changed()
        return old[0] if old else None

    def _delete(self, kind: str, name: str) -> None:
        row = self._row(name, kind)
        with self._keylock, self._lock:
            self.db.table("objects").delete((kind, name))
            self._changed()
        (self.objects / row["file"]).unlink(missing_ok=True)

    def remove(self, name: str) -> ModelRecord:
        record = self.get(name)
        self._delete("model", name)
        return record

    def remove_data(self, name: str) -> dict[str, Any]:
        info = self.data_info(name)
        self._delete("data", name)
        return info

    def verify(self, model: str | None = None) -> builtins.list[tuple[str, str]]:
        """Authenticate every segment of every object (or of one model); (name, problem)
        for each bad one (data objects are named ``data:NAME``)."""
        bad = []
        where, args = ("kind = 'model' and name = ?", [model]) if model else (None, [])
        with self._lock:
            rows = list(self.db.table("objects").rows_where(where, args, order_by="kind, name"))
        if model and not rows:
            raise ModelNotFound(f"model {model!r} not found")
        for row in rows:
            label = row["name"] if row["kind"] == "model" else f"data:{row['name']}"
            try:
                self._read_object(row, lambda _: None)
            except FileNotFoundError:
                bad.append((label, "its object file is missing"))
            except fmt.IntegrityError as exc:
                bad.append((label, str(exc)))
        return bad
