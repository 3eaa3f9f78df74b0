"""The plain model store: a directory of content-addressed blobs and JSON records.

    <state_dir>/models/blobs/sha256-<hex>     the model files
    <state_dir>/models/records/<name>.json    what each name points to

Imports are atomic: the bytes stream into a temporary file beside the blobs while
they are hashed, are checked (GGUF header), fsynced and renamed; only then is the
record written (itself by rename). A crash leaves the old state or the new one;
leftover temporary files are removed when the store opens. Two names may share one
blob; removing a name removes the blob when no other name uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, BinaryIO

from edgellm.errors import Conflict, IntegrityError, InvalidRequest, ModelNotFound
from edgellm.runtime.gguf_meta import read_gguf_metadata
from edgellm.runtime.source import ModelRecord

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
CHUNK = 1024 * 1024


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidRequest(
            f"invalid model name {name!r}: use 1-64 lower-case letters, digits, '.', '_' or '-'",
            param="name",
        )
    return name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryStore:
    """A ModelSource over a plain directory (no encryption: see the vault)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.records = self.root / "records"
        for d in (self.blobs, self.records):
            d.mkdir(parents=True, exist_ok=True)
        self._verified: dict[str, tuple[int, int, int]] = {}
        self.remove_leftovers()

    def remove_leftovers(self) -> None:
        for d in (self.blobs, self.records):
            for tmp in d.glob(".tmp-*"):
                tmp.unlink(missing_ok=True)

    # --- ModelSource -----------------------------------------------------------------
    def get(self, name: str) -> ModelRecord:
        path = self.records / f"{name}.json"
        if not NAME_RE.match(name) or not path.exists():
            raise ModelNotFound(f"model {name!r} not found", param="model")
        data = json.loads(path.read_text())
        known = {f.name for f in fields(ModelRecord)}
        return ModelRecord(**{k: v for k, v in data.items() if k in known})

    def list(self) -> list[ModelRecord]:
        return [self.get(p.stem) for p in sorted(self.records.glob("*.json"))]

    @contextmanager
    def open(self, name: str) -> Iterator[str]:
        record = self.get(name)
        blob = self.blob_path(record.sha256)
        if not blob.exists():
            raise IntegrityError(f"integrity check failed for {name}: its file is missing")
        st = blob.stat()
        identity = (st.st_size, st.st_mtime_ns, st.st_ino)
        # hash once per file identity and process: a model reloaded after an idle
        # unload is not re-read in full
        if self._verified.get(record.sha256) != identity:
            if st.st_size != record.size or self._hash_file(blob) != record.sha256:
                raise IntegrityError(
                    f"integrity check failed for {name}: sha256 does not match the catalog"
                )
            self._verified[record.sha256] = identity
        yield str(blob)

    # --- management ------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.blobs / f"sha256-{sha256}"

    @staticmethod
    def _hash_file(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def add_file(self, path: Path, name: str, **kw: Any) -> ModelRecord:
        with open(path, "rb") as f:
            return self.add_stream(_chunks(f), name, **kw)

    def add_stream(
        self,
        chunks: Iterable[bytes],
        name: str,
        *,
        expected_sha256: str | None = None,
        replace: bool = False,
        info: dict[str, Any] | None = None,
    ) -> ModelRecord:
        """Import a GGUF model from a stream of bytes under ``name``."""
        check_name(name)
        if not replace and (self.records / f"{name}.json").exists():
            raise Conflict(f"model {name!r} already exists; remove it first", param="name")
        h, size = hashlib.sha256(), 0
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=self.blobs)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = h.hexdigest()
            if expected_sha256 and digest != expected_sha256:
                raise IntegrityError(
                    f"checksum mismatch for {name}: expected sha256 {expected_sha256}, "
                    f"got {digest}; the file was not stored"
                )
            meta = read_gguf_metadata(tmp)
            blob = self.blob_path(digest)
            if blob.exists():
                tmp.unlink()
            else:
                os.chmod(tmp, 0o640)
                os.replace(tmp, blob)
                _fsync_dir(self.blobs)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        info = dict(info or {})
        record = ModelRecord(
            name=name,
            format="gguf",
            sha256=digest,
            size=size,
            architecture=meta["architecture"],
            quantization=info.pop("quantization", None) or meta["quantization"],
            context_length=meta["context_length"],
            n_layer=meta["n_layer"],
            n_embd=meta["n_embd"],
            n_head=meta["n_head"],
            n_head_kv=meta["n_head_kv"],
            head_dim=meta["head_dim"],
            n_vocab=meta["n_vocab"],
            has_chat_template=meta["has_chat_template"],
            license=info.pop("license", None) or str(meta["license"] or ""),
            source=info.pop("source", "local file"),
            added=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            extra=info,
        )
        self._write_record(record)
        return record

    def _write_record(self, record: ModelRecord) -> None:
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=self.records)
        with os.fdopen(fd, "w") as out:
            json.dump(record.as_dict(), out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, self.records / f"{record.name}.json")
        _fsync_dir(self.records)

    def remove(self, name: str) -> ModelRecord:
        record = self.get(name)
        (self.records / f"{name}.json").unlink()
        _fsync_dir(self.records)
        if not any(r.sha256 == record.sha256 for r in self.list()):
            self.blob_path(record.sha256).unlink(missing_ok=True)
        return record


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk
