"""Real GGUF files made from the default model for the hostile-model tests: the same
weights under another chat template, and files corrupted the ways an attacker would."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class Layout:
    entries: list[tuple[str, int, int]]  # key, start, end of each key/value pair
    kv_end: int
    tensor_info: list[tuple[int, int]]  # where each tensor's (type, offset) pair starts
    info_end: int
    data_start: int
    alignment: int


def layout(raw: bytes) -> Layout:
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", raw, p)
        return raw[p + 8 : p + 8 + n].decode(), p + 8 + n

    def skip(vtype: int, p: int) -> int:
        if vtype in _SCALAR_SIZES:
            return p + _SCALAR_SIZES[vtype]
        if vtype == 8:
            return string(p)[1]
        etype, count = struct.unpack_from("<IQ", raw, p)
        p += 12
        for _ in range(count):
            p = skip(etype, p)
        return p

    entries, alignment = [], 32
    for _ in range(n_kv):
        start = pos
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", raw, pos)
        value_at = pos + 4
        pos = skip(vtype, value_at)
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", raw, value_at)
        entries.append((key, start, pos))
    kv_end, infos = pos, []
    for _ in range(n_tensors):
        _, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", raw, pos)
        pos += 4 + 8 * n_dims
        infos.append((pos, pos + 4))
        pos += 12
    data_start = (pos + alignment - 1) // alignment * alignment
    return Layout(entries, kv_end, infos, pos, data_start, alignment)


def _gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def with_template(src: Path, dst: Path, template: str) -> Path:
    """The same model with another chat template (tensor offsets are relative to the
    data section, so only its start moves)."""
    raw = src.read_bytes()
    lay = layout(raw)
    kv = b"".join(
        _gguf_string(key) + struct.pack("<I", 8) + _gguf_string(template)
        if key == "tokenizer.chat_template"
        else raw[start:end]
        for key, start, end in lay.entries
    )
    head = raw[:24] + kv + raw[lay.kv_end : lay.info_end]
    head += b"\0" * (-len(head) % lay.alignment)
    dst.write_bytes(head + raw[lay.data_start :])
    return dst


def corruptions(src: Path, out: Path) -> dict[str, Path]:
    """Files llama.cpp refuses at load, each a different way; the import must refuse
    them first."""
    raw = src.read_bytes()
    lay = layout(raw)
    made = {}

    def write(name: str, data: bytes) -> None:
        made[name] = out / f"{name}.gguf"
        made[name].write_bytes(data)

    write("one_byte_short", raw[:-1])
    write("cut_in_half", raw[: len(raw) // 2])
    huge = bytearray(raw)
    struct.pack_into("<Q", huge, 8, 1 << 63)
    write("tensor_count_2_63", bytes(huge))
    past = bytearray(raw)
    offset_at = lay.tensor_info[-1][1]
    struct.pack_into("<Q", past, offset_at, len(raw))
    write("offset_past_end", bytes(past))
    bad_type = bytearray(raw)
    struct.pack_into("<I", bad_type, lay.tensor_info[0][0], 250)
    write("unknown_tensor_type", bytes(bad_type))
    return made
