"""The vault's object format: AES-256-GCM over fixed-size segments (FORMAT.md).

Each object has its own random 256-bit data key (DEK), wrapped under the vault's
wrapping key in the header. Segment i is sealed with the nonce
``prefix(7) || i as u32 big-endian || last(1)``, so a reordered, dropped, truncated,
appended or foreign segment fails authentication. Encryption and decryption stream:
memory use is one segment, whatever the object's size.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"EDGVLT"
VERSION = 2  # 2: the DEK's seal also authenticates the object's identity (FORMAT.md)
VERSIONS = (1, 2)
ALG_AES256GCM = 1
TAG = 16
PREFIX = 7
KEY_ID = 8
WRAPPED = 12 + 32 + TAG  # nonce, DEK, tag
_FIXED = struct.Struct(">6sBBBB7s8s")  # magic, version, alg, segment shift, flags, prefix, key id
HEADER_LEN = _FIXED.size + WRAPPED  # 25 + 60 = 85 bytes
DEFAULT_SHIFT = 20  # 1 MiB segments
MAX_SEGMENTS = 1 << 32


class IntegrityError(Exception):
    """The object is not what was written: ``segment`` says where (None: the header)."""

    def __init__(self, message: str, segment: int | None = None) -> None:
        super().__init__(message)
        self.segment = segment


def identity(kind: str, name: str, sha256: str) -> bytes:
    """What an object is, as the catalog says: bound into its header's seal, so an
    object moved, swapped or repointed to another row fails authentication."""
    return b"\x00".join([b"edgellm-object", kind.encode(), name.encode(), sha256.encode()])


@dataclass(frozen=True)
class Header:
    segment_shift: int
    prefix: bytes
    key_id: bytes
    wrapped_dek: bytes
    version: int = VERSION

    @property
    def segment_size(self) -> int:
        return 1 << self.segment_shift

    def fixed(self) -> bytes:
        return _FIXED.pack(
            MAGIC, self.version, ALG_AES256GCM, self.segment_shift, 0, self.prefix, self.key_id
        )

    def aad(self, ident: bytes) -> bytes:
        return self.fixed() if self.version == 1 else self.fixed() + ident

    def encode(self) -> bytes:
        return self.fixed() + self.wrapped_dek

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        if len(raw) < HEADER_LEN:
            raise IntegrityError("truncated header")
        magic, version, alg, shift, flags, prefix, key_id = _FIXED.unpack(raw[: _FIXED.size])
        if magic != MAGIC:
            raise IntegrityError("not a vault object (bad magic)")
        if version not in VERSIONS or alg != ALG_AES256GCM or flags != 0 or not 10 <= shift <= 30:
            raise IntegrityError(
                f"unsupported object (version {version}, algorithm {alg}, "
                f"segment shift {shift}, flags {flags})"
            )
        return cls(shift, prefix, key_id, raw[_FIXED.size : HEADER_LEN], version)


def wrap_dek(wrapping_key: bytes, aad: bytes, dek: bytes) -> bytes:
    """Seal the DEK under the wrapping key; the header's fixed part (and, from version
    2, the object's identity) is the AAD, so neither can change without the key."""
    nonce = os.urandom(12)
    return nonce + AESGCM(wrapping_key).encrypt(nonce, dek, aad)


def unwrap_dek(wrapping_key: bytes, header: Header, ident: bytes = b"") -> bytes:
    nonce, sealed = header.wrapped_dek[:12], header.wrapped_dek[12:]
    try:
        return AESGCM(wrapping_key).decrypt(nonce, sealed, header.aad(ident))
    except InvalidTag:
        raise IntegrityError(
            "header authentication failed (wrong key, the header was "
            "changed, or the object is not the one its catalog row names)"
        ) from None


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= MAX_SEGMENTS:
        raise ValueError("object too large for one vault object")
    return prefix + struct.pack(">I", index) + (b"\x01" if last else b"\x00")


def new_header(
    wrapping_key: bytes, key_id: bytes, segment_shift: int = DEFAULT_SHIFT, ident: bytes = b""
) -> tuple[Header, bytes]:
    """A fresh header and its (plaintext) DEK."""
    dek = os.urandom(32)
    draft = Header(segment_shift, os.urandom(PREFIX), key_id, b"")
    return Header(
        segment_shift, draft.prefix, key_id, wrap_dek(wrapping_key, draft.aad(ident), dek)
    ), dek


def rewrap(
    raw_header: bytes,
    old_key: bytes,
    new_key: bytes,
    new_key_id: bytes,
    ident: bytes = b"",
    new_ident: bytes | None = None,
) -> bytes:
    """The same object's header with its DEK wrapped under another key, or bound to
    another identity (payload untouched: it rewrites 85 bytes per object); binding
    (``new_ident``) makes a version 1 header version 2."""
    old = Header.decode(raw_header)
    dek = unwrap_dek(old_key, old, ident)
    # a version 1 header stays one unless it is being bound (a migration): a rotation
    # must not bless an object that failed its migration
    version = old.version if new_ident is None else VERSION
    draft = Header(old.segment_shift, old.prefix, new_key_id, b"", version)
    bound = ident if new_ident is None else new_ident
    return Header(
        old.segment_shift, old.prefix, new_key_id, wrap_dek(new_key, draft.aad(bound), dek), version
    ).encode()


def encrypt_stream(
    chunks: Iterable[bytes], wrapping_key: bytes, key_id: bytes, segment_shift: int = DEFAULT_SHIFT
) -> Iterator[bytes]:
    """Yield the header, then each sealed segment, for plaintext arriving in chunks
    of any size."""
    header, dek = new_header(wrapping_key, key_id, segment_shift)
    aead, size = AESGCM(dek), header.segment_size
    yield header.encode()
    buf, index = bytearray(), 0
    for chunk in chunks:
        buf += chunk
        start = 0
        # keep at least one byte back: only the end of the input says which is last
        while len(buf) - start > size:
            view = memoryview(buf)[start : start + size]
            yield aead.encrypt(_nonce(header.prefix, index, False), view, None)
            view.release()
            start += size
            index += 1
        del buf[:start]
    yield aead.encrypt(_nonce(header.prefix, index, True), bytes(buf), None)


def open_object(
    f: BinaryIO, wrapping_key: bytes, ident: bytes = b"", allow_v1: bool = True
) -> tuple[Header, AESGCM]:
    """Read and authenticate the header, and unwrap the DEK: the only step that needs
    the wrapping key (so a key rotation need only be held off for this long). A vault
    past its migration to version 2 refuses version 1 objects (``allow_v1``): an old
    copy cannot be slipped in to dodge the identity check."""
    header = Header.decode(f.read(HEADER_LEN))
    if header.version == 1 and not allow_v1:
        raise IntegrityError(
            "a version 1 object in a version 2 vault (an old copy put in "
            "its place, or one that failed its checksum when the vault "
            "was migrated)"
        )
    return header, AESGCM(unwrap_dek(wrapping_key, header, ident))


def decrypt_segments(f: BinaryIO, header: Header, aead: AESGCM) -> Iterator[bytes]:
    """Yield plaintext segment by segment, authenticating each before it is given
    out; raise IntegrityError naming the first bad segment."""
    sealed_size = header.segment_size + TAG
    index = 0
    current = f.read(sealed_size)
    while True:
        following = f.read(sealed_size)
        last = not following
        if len(current) < TAG or (not last and len(current) != sealed_size):
            raise IntegrityError(f"segment {index} is truncated", index)
        try:
            plain = aead.decrypt(_nonce(header.prefix, index, last), current, None)
        except InvalidTag:
            why = "the object is truncated or was appended to" if last else "it was altered"
            raise IntegrityError(f"segment {index} failed authentication ({why})", index) from None
        if last and index > 0 and not plain:
            raise IntegrityError(f"segment {index}: empty final segment after data", index)
        yield plain
        if last:
            return
        current, index = following, index + 1


def decrypt_stream(f: BinaryIO, wrapping_key: bytes, ident: bytes = b"") -> Iterator[bytes]:
    header, aead = open_object(f, wrapping_key, ident)
    yield from decrypt_segments(f, header, aead)


def read_header(f: BinaryIO) -> Header:
    return Header.decode(f.read(HEADER_LEN))
