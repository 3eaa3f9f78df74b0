"""An ONNX model as the vault stores it: a bare ``.onnx`` file, or a bundle.

A bundle is an uncompressed POSIX tar of regular files, in any order:

    model.onnx       the graph and its weights (required; under 2 GB, no external data)
    tokenizer.json   a Hugging Face ``tokenizers`` file, for models that take text
    edgellm.json     what the runtime needs beyond the graph, e.g. for an embedding
                     model {"task": "embedding", "output": "sentence_embedding",
                     "pooling": "none" | "mean" | "cls", "normalize": true,
                     "max_length": 256}

Nothing else is read; names with a directory part are refused. A model is checked
with ``onnx.checker`` and described (inputs, outputs, dtypes, quantization) before
the vault stores it, so an invalid file never gets a catalog row.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from edgellm.errors import InvalidRequest

MODEL, TOKENIZER, CONFIG = "model.onnx", "tokenizer.json", "edgellm.json"
MEMBERS = (MODEL, TOKENIZER, CONFIG)
POOLINGS = ("none", "mean", "cls")
QUANTIZED_OPS = {
    "MatMulInteger",
    "DynamicQuantizeLinear",
    "QLinearMatMul",
    "QLinearConv",
    "ConvInteger",
    "DequantizeLinear",
    "QuantizeLinear",
}


def is_tar(data: bytes) -> bool:
    return len(data) > 262 and data[257:262] == b"ustar"


def pack(files: dict[str, bytes]) -> bytes:
    """A bundle of ``files`` (name → bytes); deterministic for the same input."""
    unknown = set(files) - set(MEMBERS)
    if unknown or MODEL not in files:
        raise InvalidRequest(
            f"a bundle holds {', '.join(MEMBERS)} (model.onnx required); "
            f"got {', '.join(sorted(files))}"
        )
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o644, 0
            tar.addfile(info, io.BytesIO(files[name]))
    return out.getvalue()


def unpack(data: bytes) -> dict[str, bytes]:
    """The files of a bundle, or ``{"model.onnx": data}`` for a bare model."""
    if not is_tar(data):
        return {MODEL: data}
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.name not in MEMBERS or not member.isfile():
                    raise InvalidRequest(
                        f"unexpected entry {member.name!r} in the ONNX "
                        f"bundle (it may hold {', '.join(MEMBERS)})"
                    )
                extracted = tar.extractfile(member)
                assert extracted is not None
                files[member.name] = extracted.read()
    except tarfile.TarError as exc:
        raise InvalidRequest(f"the ONNX bundle is not a readable tar file: {exc}") from None
    if MODEL not in files:
        raise InvalidRequest("the ONNX bundle has no model.onnx")
    return files


def read(path: str | Path) -> dict[str, bytes]:
    return unpack(Path(path).read_bytes())


def from_directory(directory: Path) -> dict[str, bytes]:
    """A bundle's files from a directory: model.onnx, tokenizer.json, and edgellm.json
    if there is one, or else the embedding settings of a sentence-transformers layout
    (``1_Pooling/config.json``, ``modules.json``, ``sentence_bert_config.json``)."""
    files = {
        name: (directory / name).read_bytes() for name in MEMBERS if (directory / name).is_file()
    }
    if MODEL not in files:
        raise InvalidRequest(f"{directory} has no model.onnx")
    pooling_file = directory / "1_Pooling" / "config.json"
    if CONFIG not in files and pooling_file.is_file():
        files[CONFIG] = json.dumps(sentence_transformers_config(directory)).encode()
    return files


def sentence_transformers_config(directory: Path) -> dict[str, Any]:
    """edgellm.json's embedding settings from a sentence-transformers model directory,
    for a graph whose output is the token embeddings (``last_hidden_state``)."""
    pooling = json.loads((directory / "1_Pooling" / "config.json").read_text())
    modules = directory / "modules.json"
    normalize = modules.is_file() and any(
        m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text())
    )
    bert = directory / "sentence_bert_config.json"
    max_length = json.loads(bert.read_text()).get("max_seq_length", 512) if bert.is_file() else 512
    mode = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
    return {
        "task": "embedding",
        "output": "last_hidden_state",
        "pooling": mode,
        "normalize": normalize,
        "max_length": int(max_length),
    }


def describe(data: bytes, name: str) -> dict[str, Any]:
    """Check an ONNX model or bundle and describe it for the catalog: the fields of a
    ModelRecord. Raises InvalidRequest naming what is wrong."""
    import onnx

    files = unpack(data)
    try:
        model = onnx.load_from_string(files[MODEL])
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf's DecodeError, onnx's ValidationError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidRequest(
            f"{name} is not a valid GGUF file or ONNX model (no GGUF "
            f"magic number; as ONNX: {first})"
        ) from None
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    inputs = [_value_info(v) for v in graph.input if v.name not in weights]
    outputs = [_value_info(v) for v in graph.output]
    config = _config(files, {o["name"] for o in outputs}, name)
    ops = {n.op_type for n in graph.node}
    meta = {p.key: p.value for p in model.metadata_props}
    dims = 0
    if config.get("task") == "embedding":
        out = next(o for o in outputs if o["name"] == config["output"])
        dims = out["shape"][-1] if isinstance(out["shape"][-1], int) else 0
    return {
        "format": "onnx",
        "architecture": meta.get("architecture") or graph.name or "onnx",
        "quantization": "int8" if ops & QUANTIZED_OPS else _float_kind(graph),
        "context_length": int(config.get("max_length", 0)),
        "n_embd": dims,
        "license": meta.get("license", ""),
        "extra": {
            "inputs": inputs,
            "outputs": outputs,
            "files": sorted(files),
            "opset": max(
                (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0
            ),
            "producer": model.producer_name,
            "task": config.get("task", "tensor"),
            **({"embedding": config} if config.get("task") == "embedding" else {}),
        },
    }


def _value_info(v: Any) -> dict[str, Any]:
    from onnx import helper

    t = v.type.tensor_type
    if not v.type.HasField("tensor_type"):
        raise InvalidRequest(f"input or output {v.name!r} is not a tensor; only tensors are served")
    shape = (
        [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        if t.HasField("shape")
        else None
    )
    import numpy as np

    return {
        "name": v.name,
        "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name,
        "shape": shape,
    }


def _float_kind(graph: Any) -> str:
    from onnx import TensorProto

    kinds = {i.data_type for i in graph.initializer}
    if TensorProto.FLOAT16 in kinds:
        return "fp16"
    return "fp32" if TensorProto.FLOAT in kinds or not kinds else "mixed"


def _config(files: dict[str, bytes], outputs: set[str], name: str) -> dict[str, Any]:
    if CONFIG not in files:
        return {}
    try:
        config = json.loads(files[CONFIG])
        assert isinstance(config, dict)
    except (ValueError, AssertionError):
        raise InvalidRequest(f"{name}: edgellm.json is not a JSON object") from None
    if config.get("task") != "embedding":
        return config
    if TOKENIZER not in files:
        raise InvalidRequest(f"{name}: an embedding model needs tokenizer.json in its bundle")
    if config.get("output") not in outputs:
        raise InvalidRequest(
            f"{name}: edgellm.json names output {config.get('output')!r}, "
            f"but the model's outputs are {', '.join(sorted(outputs))}"
        )
    if config.setdefault("pooling", "none") not in POOLINGS:
        raise InvalidRequest(f"{name}: pooling must be one of {', '.join(POOLINGS)}")
    config.setdefault("normalize", False)
    config.setdefault("max_length", 512)
    return config
