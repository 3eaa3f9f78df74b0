"""The vault's cost: format throughput, and loading a model from it.

    .venv/bin/python bench/vault_format.py

1. Throughput on the default model, one core. Baseline: reading the plaintext file,
   in the same run; also SHA-256 over the same bytes. Target (issue #4): decryption
   at >= 1 GB/s.
2. Loading the model into llama.cpp from a plaintext file vs from the vault (decrypt
   into a sealed memfd, then load). Page caches are dropped before each load when
   the machine allows it (root), so both are cold. Target: <= 1.2x the plaintext load.
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
    for name, fn in (
        ("read plaintext (baseline)", read_plain),
        ("sha256", sha),
        ("encrypt", encrypt),
        ("decrypt + authenticate", decrypt),
    ):
        t = base if fn is read_plain else best_of(fn)
        rows.append(
            {"operation": name, "GB/s": size / t / 1e9, "ms": t * 1000, "× baseline time": t / base}
        )
    print(f"{path.name}: {size / 1e6:.0f} MB, 1 MiB segments, best of 5, one core\n")
    print(
        table(
            rows,
            [
                ("operation", "operation"),
                ("GB/s", "GB/s"),
                ("ms", "ms"),
                ("× baseline time", "× baseline time"),
            ],
        )
    )
    load_times()


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def load_times(rounds: int = 5) -> None:
    import tempfile

    from edgellm.config import ModelSettings
    from edgellm.runtime.llama.backend import LlamaBackend
    from edgellm.vault.keys import create_key_file
    from edgellm.vault.store import VaultStore

    path = model_file()
    root = Path(tempfile.mkdtemp(prefix="edgellm-vault-bench-"))
    vault = VaultStore.create(root / "vault", create_key_file(root / "vault.key"))
    vault.add_file(path, "m")
    settings = ModelSettings(n_threads=1, n_batch=512)

    def plain() -> None:
        LlamaBackend(str(path), settings, 512, 1).close()

    def sealed() -> None:
        with vault.open("m") as memfd:
            LlamaBackend(memfd, settings, 512, 1).close()

    cold = drop_caches()
    results = {}
    for name, fn in (("plaintext file", plain), ("vault (decrypt to memfd + load)", sealed)):
        times = []
        for _ in range(rounds):
            drop_caches()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        results[name] = sorted(times)[len(times) // 2]
    base = results["plaintext file"]
    rows = [{"load": k, "median ms": v * 1000, "× plaintext": v / base} for k, v in results.items()]
    print(
        f"\nloading into llama.cpp, median of {rounds}, page caches "
        f"{'dropped before each load' if cold else 'NOT dropped (not root): warm loads'}\n"
    )
    print(
        table(rows, [("load", "load"), ("median ms", "median ms"), ("× plaintext", "× plaintext")])
    )


if __name__ == "__main__":
    main()
