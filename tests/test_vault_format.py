"""The vault's object format and keys, with real cryptography: round trips and every
kind of tampering the format must catch."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from edgellm.vault.format import (
    HEADER_LEN,
    TAG,
    IntegrityError,
    decrypt_stream,
    encrypt_stream,
    read_header,
    rewrap,
)
from edgellm.vault.keys import (
    MasterKey,
    VaultKeyError,
    VaultMeta,
    WrongKey,
    create_key_file,
    find_master_key,
    from_passphrase,
    new_kdf_params,
    read_key_file,
)

KEY = MasterKey(bytes(range(32)), "test")
WRAP = KEY.derive("object-wrap")
SHIFT = 10  # 1 KiB segments: many segments from little data
SEALED = (1 << SHIFT) + TAG


def seal(data: bytes, key: bytes = WRAP, shift: int = SHIFT) -> bytes:
    return b"".join(
        encrypt_stream(
            [data[i : i + 700] for i in range(0, len(data), 700)] or [b""], key, KEY.key_id, shift
        )
    )


def open_(blob: bytes, key: bytes = WRAP) -> bytes:
    return b"".join(decrypt_stream(io.BytesIO(blob), key))


def test_round_trip_of_the_real_default_model(model_file: Path) -> None:
    with open(model_file, "rb") as f:
        chunks = iter(lambda: f.read(1 << 20), b"")
        sealed = b"".join(encrypt_stream(chunks, WRAP, KEY.key_id))
    assert len(sealed) == HEADER_LEN + model_file.stat().st_size + TAG * 94  # 94 segments
    digest = hashlib.sha256()
    for piece in decrypt_stream(io.BytesIO(sealed), WRAP):
        digest.update(piece)
    assert digest.hexdigest() == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert sealed.find(model_file.read_bytes()[:4096]) == -1  # no plaintext inside


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 3 * 1024, 5000])
def test_round_trip_at_segment_boundaries(size: int) -> None:
    data = os.urandom(size)
    assert open_(seal(data)) == data


DATA = os.urandom(4 * 1024 + 100)  # 5 segments


def _flip(blob: bytes, at: int) -> bytes:
    b = bytearray(blob)
    b[at] ^= 0x01
    return bytes(b)


def _segment(blob: bytes, i: int) -> slice:
    return slice(HEADER_LEN + i * SEALED, HEADER_LEN + (i + 1) * SEALED)


TAMPERING = {
    "header magic": lambda b: _flip(b, 0),
    "header segment size": lambda b: _flip(b, 8),
    "header nonce prefix": lambda b: _flip(b, 12),
    "header key id": lambda b: _flip(b, 20),
    "wrapped data key": lambda b: _flip(b, 40),
    "segment body": lambda b: _flip(b, HEADER_LEN + SEALED + 5),
    "segment tag": lambda b: _flip(b, HEADER_LEN + 2 * SEALED - 1),
    "final segment": lambda b: _flip(b, len(b) - 3),
    "truncated by a segment": lambda b: b[: HEADER_LEN + 4 * SEALED],
    "truncated mid-segment": lambda b: b[: HEADER_LEN + 2 * SEALED + 100],
    "truncated header": lambda b: b[:40],
    "appended bytes": lambda b: b + b"\x00" * 32,
    "appended copy of a segment": lambda b: b + b[_segment(b, 0)],
    "swapped segments": lambda b: (
        b[:HEADER_LEN] + b[_segment(b, 1)] + b[_segment(b, 0)] + b[HEADER_LEN + 2 * SEALED :]
    ),
    "segment spliced from another object": lambda b: (
        b[:HEADER_LEN] + seal(DATA)[_segment(b, 0)] + b[HEADER_LEN + SEALED :]
    ),
    "header from another object": lambda b: seal(DATA)[:HEADER_LEN] + b[HEADER_LEN:],
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_every_tampering_is_detected(case: str) -> None:
    blob = seal(DATA)
    assert open_(blob) == DATA
    with pytest.raises(IntegrityError):
        open_(TAMPERING[case](blob))


def test_the_bad_segment_is_named() -> None:
    blob = _flip(seal(DATA), HEADER_LEN + 3 * SEALED + 7)
    with pytest.raises(IntegrityError, match="segment 3") as err:
        open_(blob)
    assert err.value.segment == 3


def test_wrong_key_fails_at_the_header() -> None:
    other = MasterKey(os.urandom(32), "other").derive("object-wrap")
    with pytest.raises(IntegrityError, match="header authentication failed") as err:
        open_(seal(DATA), other)
    assert err.value.segment is None


def test_rewrap_changes_the_key_not_the_payload() -> None:
    blob = seal(DATA)
    new = MasterKey(os.urandom(32), "new")
    header = rewrap(blob[:HEADER_LEN], WRAP, new.derive("object-wrap"), new.key_id)
    rotated = header + blob[HEADER_LEN:]
    assert open_(rotated, new.derive("object-wrap")) == DATA
    assert read_header(io.BytesIO(rotated)).key_id == new.key_id
    with pytest.raises(IntegrityError):
        open_(rotated, WRAP)


def test_derived_keys_differ_by_purpose() -> None:
    assert KEY.derive("object-wrap") != KEY.derive("audit-hmac")
    assert len(KEY.derive("audit-hmac")) == 32


def test_key_file_must_be_private(tmp_path: Path) -> None:
    key = create_key_file(tmp_path / "vault.key")
    path = tmp_path / "vault.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_key_file(path).key == key.key
    with pytest.raises(FileExistsError):
        create_key_file(path)  # never overwrites a key
    path.chmod(0o640)
    with pytest.raises(VaultKeyError, match="must be 0600"):
        read_key_file(path)
    hexed = tmp_path / "hex.key"
    hexed.write_text(key.key.hex() + "\n")
    hexed.chmod(0o600)
    assert read_key_file(hexed).key == key.key
    short = tmp_path / "short.key"
    short.write_bytes(b"too short")
    short.chmod(0o600)
    with pytest.raises(VaultKeyError, match="256-bit"):
        read_key_file(short)


def test_key_sources_in_order(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "vault-key").write_bytes(b"\x07" * 32)
    file_key = create_key_file(tmp_path / "k")
    found = find_master_key(tmp_path / "k", None, None, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert found.source == "credential" and found.key == b"\x07" * 32
    assert find_master_key(tmp_path / "k", None, None, {}).key == file_key.key
    with pytest.raises(VaultKeyError, match="no vault key"):
        find_master_key(None, None, None, {})


def test_passphrase_and_the_key_check_value(tmp_path: Path) -> None:
    kdf = new_kdf_params()
    assert kdf["n"] == 1 << 17 and kdf["r"] == 8 and kdf["p"] == 1
    key = from_passphrase("correct horse battery staple", kdf)
    meta = VaultMeta.for_key(key, kdf)
    meta.save(tmp_path / "vault.json")
    loaded = VaultMeta.load(tmp_path / "vault.json")
    loaded.verify(from_passphrase("correct horse battery staple", loaded.kdf or {}))
    with pytest.raises(WrongKey, match="wrong vault key"):
        loaded.verify(from_passphrase("wrong horse", loaded.kdf or {}))
    with pytest.raises(VaultKeyError, match="weaker"):
        from_passphrase("x", {**kdf, "n": 1 << 14})
