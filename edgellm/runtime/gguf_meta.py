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
_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9
_MAX_KV = 1 << 20

# llama.cpp's file-type numbers (general.file_type) for the common quantizations
_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4",
}


# ggml tensor types: (elements per block, bytes per block), from ggml.h / ggml.c
_TENSOR_TYPES = {
    0: (1, 4),
    1: (1, 2),
    2: (32, 18),
    3: (32, 20),
    6: (32, 22),
    7: (32, 24),
    8: (32, 34),
    9: (32, 36),
    10: (256, 84),
    11: (256, 110),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
    15: (256, 292),
    16: (256, 66),
    17: (256, 74),
    18: (256, 98),
    19: (256, 50),
    20: (32, 18),
    21: (256, 110),
    22: (256, 82),
    23: (256, 136),
    24: (1, 1),
    25: (1, 2),
    26: (1, 4),
    27: (1, 8),
    28: (1, 8),
    29: (256, 56),
    30: (1, 2),
    34: (256, 54),
    35: (256, 66),
    39: (32, 17),
}
_MAX_TENSORS = 1 << 16
_MAX_DIMS = 4


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
    return _parse(buf)[0]


def _parse(buf: Any) -> tuple[dict[str, Any], _Reader, int]:
    """The key/value section, the reader left after it, and the tensor count."""
    r = _Reader(buf)
    if bytes(r.take(4)) != b"GGUF":
        raise _Bad("no GGUF magic number")
    version = r.scalar("<I", 4)
    if version not in (2, 3):
        raise _Bad(f"unsupported GGUF version {version}")
    n_tensors = r.scalar("<Q", 8)
    n_kv = r.scalar("<Q", 8)
    if n_kv > _MAX_KV:
        raise _Bad(f"implausible key count {n_kv}")
    kv = {}
    for _ in range(n_kv):
        key = r.string()
        kv[key] = r.value(r.scalar("<I", 4))
    return kv, r, n_tensors


def check_gguf_tensors(head: bytes | bytearray, file_size: int, name: str) -> None:
    """Check the tensor-info section against the file, as llama.cpp will read it: a
    sane count, known types and shapes, and every tensor's data inside the file. An
    import that would fail only at load (a file cut short, a count of 2^63, an offset
    past the end) is refused here, naming the problem."""
    try:
        with memoryview(head) as view:
            kv, r, n_tensors = _parse(view)
            if n_tensors == 0 or n_tensors > _MAX_TENSORS:
                raise _Bad(f"implausible tensor count {n_tensors}")
            align = kv.get("general.alignment", 32)
            if not isinstance(align, int) or align <= 0 or align & (align - 1):
                raise _Bad(f"invalid general.alignment {align!r}")
            tensors = []
            for _ in range(n_tensors):
                tname = r.string()
                n_dims = r.scalar("<I", 4)
                if not 1 <= n_dims <= _MAX_DIMS:
                    raise _Bad(f"tensor {tname!r} has {n_dims} dimensions")
                dims = [r.scalar("<Q", 8) for _ in range(n_dims)]
                ttype, offset = r.scalar("<I", 4), r.scalar("<Q", 8)
                tensors.append((tname, dims, ttype, offset))
            data_start = (r.pos + align - 1) // align * align
    except (_Bad, struct.error) as exc:
        raise InvalidRequest(
            f"{name} is not a valid GGUF file ({exc}; or its tensor list "
            f"is longer than the {len(head) >> 20} MB edgellm reads)"
        ) from None
    for tname, dims, ttype, offset in tensors:
        if ttype not in _TENSOR_TYPES:
            raise InvalidRequest(f"{name}: tensor {tname!r} has unknown type {ttype}")
        per_block, block_bytes = _TENSOR_TYPES[ttype]
        count = 1
        for d in dims:
            count *= d
        if count == 0 or dims[0] % per_block:
            raise InvalidRequest(f"{name}: tensor {tname!r} has an invalid shape {dims}")
        end = data_start + offset + count // per_block * block_bytes
        if offset % align or end > file_size:
            raise InvalidRequest(
                f"{name} is truncated or corrupt: tensor {tname!r} lies at bytes "
                f"{data_start + offset}–{end} of a {file_size}-byte file"
            )


def read_gguf_kv(source: str | Path | bytes | bytearray, name: str | None = None) -> dict[str, Any]:
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


def read_gguf_metadata(
    source: str | Path | bytes | bytearray, name: str | None = None
) -> dict[str, Any]:
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
    from edgellm.runtime.llama.tool_format import template_syntax

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
        "quantization": "" if file_type is None else _FILE_TYPES.get(file_type, str(file_type)),
        "has_chat_template": isinstance(template := kv.get("tokenizer.chat_template"), str),
        # a template that renders a ``tools`` variable offers the model its tools
        "template_tools": isinstance(template, str) and "tools" in template,
        "tool_syntax": template_syntax(template) if isinstance(template, str) else "",
        "general_name": kv.get("general.name", ""),
        "license": kv.get("general.license", ""),
    }
