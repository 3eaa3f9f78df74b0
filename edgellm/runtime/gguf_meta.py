"""Read what we need from a GGUF header, without loading the model.

GGUF (llama.cpp's docs/gguf.md): magic "GGUF", u32 version (2 or 3), u64 tensor
count, u64 key/value count, then the key/value pairs, little-endian. We read only
the key/value section, skipping over arrays, with every length checked against the
file: an upload is untrusted input, and this reader runs inside the daemon. (The
`gguf` package parses every tensor and vocabulary string too: 5 s for a 98 MB
model, where this takes milliseconds.)
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from edgellm.errors import InvalidRequest

# value types: (struct format, size) for scalars; 8 = string, 9 = array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9
_MAX_KV = 1 << 20

# llama.cpp's file-type numbers (general.file_type) for the common quantizations
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS",
    31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}


class _Bad(Exception):
    pass


class _Reader:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> Any:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Bad("truncated header")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, size: int) -> Any:
        return struct.unpack(fmt, self.take(size))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q", 8))).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I", 4), self.scalar("<Q", 8)
            if etype in _SCALARS:
                self.take(_SCALARS[etype][1] * count)
            elif etype == _STRING:
                for _ in range(count):
                    self.take(self.scalar("<Q", 8))
            else:
                raise _Bad(f"unsupported array element type {etype}")
            return count  # arrays are summarised by their length
        raise _Bad(f"unknown value type {vtype}")


def _parse_kv(buf: Any) -> dict[str, Any]:
    r = _Reader(buf)
    if bytes(r.take(4)) != b"GGUF":
        raise _Bad("no GGUF magic number")
    version = r.scalar("<I", 4)
    if version not in (2, 3):
        raise _Bad(f"unsupported GGUF version {version}")
    r.scalar("<Q", 8)  # tensor count
    n_kv = r.scalar("<Q", 8)
    if n_kv > _MAX_KV:
        raise _Bad(f"implausible key count {n_kv}")
    kv = {}
    for _ in range(n_kv):
        key = r.string()
        kv[key] = r.value(r.scalar("<I", 4))
    return kv


def read_gguf_kv(source: str | Path | bytes | bytearray, name: str | None = None
                 ) -> dict[str, Any]:
    """The key/value section of a GGUF file, from its path or from its first bytes
    in memory (the vault checks uploads without writing plaintext anywhere)."""
    label = name or (Path(source).name if isinstance(source, str | Path) else "the upload")
    try:
        if isinstance(source, bytes | bytearray):
            with memoryview(source) as view:
                return _parse_kv(view)
        with open(source, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return _parse_kv(view)
            finally:
                view.release()
    except (_Bad, struct.error, ValueError) as exc:  # ValueError: mmap of an empty file
        raise InvalidRequest(f"{label} is not a valid GGUF file ({exc})") from None


def read_gguf_metadata(source: str | Path | bytes | bytearray,
                       name: str | None = None) -> dict[str, Any]:
    """Architecture, sizes, quantization and chat template of a GGUF file.

    Raises InvalidRequest naming the file when it is not valid GGUF.
    """
    kv = read_gguf_kv(source, name)
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        label = name or (Path(source).name if isinstance(source, str | Path) else "the upload")
        raise InvalidRequest(f"{label} is not a valid GGUF model: no architecture")

    def get(key: str, default: Any = 0) -> Any:
        return kv.get(f"{arch}.{key}", default)

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    n_head_kv = int(get("attention.head_count_kv", n_head) or n_head)
    head_dim = int(get("attention.key_length", 0) or (n_embd // n_head if n_head else 0))
    file_type = kv.get("general.file_type")
    return {
        "architecture": arch,
        "context_length": int(get("context_length")),
        "n_layer": int(get("block_count")),
        "n_embd": n_embd,
        "n_head": n_head,
        "n_head_kv": n_head_kv,
        "head_dim": head_dim,
        "n_vocab": int(kv.get("tokenizer.ggml.tokens", 0) or get("vocab_size")),
        "quantization": _FILE_TYPES.get(file_type, str(file_type or "")),
        "has_chat_template": isinstance(kv.get("tokenizer.chat_template"), str),
        "general_name": kv.get("general.name", ""),
        "license": kv.get("general.license", ""),
    }
