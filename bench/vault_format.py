"""Vault object format throughput on the default model, one core.

    .venv/bin/python bench/vault_format.py

Baseline: reading the plaintext file from the page cache, in the same run; also
SHA-256 over the same bytes (what the plain store's integrity check costs).
Target (issue #4): decryption at >= 1 GB/s.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import model_file, table  # noqa: E402

from edgellm.vault.format import decrypt_stream, encrypt_stream  # noqa: E402
from edgellm.vault.keys import MasterKey  # noqa: E402


def best_of(fn, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    path = model_file()
    size = path.stat().st_size
    key = MasterKey(os.urandom(32), "bench")
    wrap = key.derive("object-wrap")

    def read_plain() -> None:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass

    def sha() -> None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)

    def encrypt() -> bytes:
        with open(path, "rb") as f:
            return b"".join(encrypt_stream(iter(lambda: f.read(1 << 20), b""), wrap, key.key_id))

    sealed = encrypt()

    def decrypt() -> None:
        for _ in decrypt_stream(io.BytesIO(sealed), wrap):
            pass

    base = best_of(read_plain)
    rows = []
    for name, fn in (("read plaintext (baseline)", read_plain), ("sha256", sha),
                     ("encrypt", encrypt), ("decrypt + authenticate", decrypt)):
        t = base if fn is read_plain else best_of(fn)
        rows.append({"operation": name, "GB/s": size / t / 1e9, "ms": t * 1000,
                     "× baseline time": t / base})
    print(f"{path.name}: {size / 1e6:.0f} MB, 1 MiB segments, best of 5, one core\n")
    print(table(rows, [("operation", "operation"), ("GB/s", "GB/s"), ("ms", "ms"),
                       ("× baseline time", "× baseline time")]))


if __name__ == "__main__":
    main()
