"""Read what we need from a GGUF header, without loading the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgellm.errors import InvalidRequest

# llama.cpp's file-type numbers (general.file_type) for the common quantizations
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS",
    31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}


def _value(field: Any) -> Any:
    # scalar: the last part; string: bytes; array of strings: count only
    from gguf import GGUFValueType

    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return len(field.data)
    return field.parts[field.data[0]].tolist()[0]


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Architecture, sizes, quantization and chat template of a GGUF file.

    Raises InvalidRequest naming the file when it is not valid GGUF.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
        fields = reader.fields
        kv = {name: _value(field) for name, field in fields.items()
              if not name.startswith("tokenizer.ggml.") or name == "tokenizer.ggml.tokens"}
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors…
        raise InvalidRequest(f"{Path(path).name} is not a valid GGUF file ({exc})") from None
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise InvalidRequest(f"{Path(path).name} is not a valid GGUF model: no architecture")

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
