"""The model-source interface: how the runtime gets at a model's bytes.

The runtime never reads the store directly; it asks a ModelSource for a record
(what the model is) and to open it (a path llama.cpp can load, valid while the
context manager is open). The plain directory store implements it; the vault
implements it with encrypted storage.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from edgellm.errors import InvalidRequest

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidRequest(
            f"invalid model name {name!r}: use 1-64 lower-case letters, digits, '.', '_' or '-'",
            param="name",
        )
    return name


@dataclass(frozen=True)  # shared: the store keeps one per model for every reader
class ModelRecord:
    name: str
    format: str  # "gguf" | "onnx"
    sha256: str
    size: int
    architecture: str = ""
    quantization: str = ""
    context_length: int = 0
    n_layer: int = 0
    n_embd: int = 0
    n_head: int = 0
    n_head_kv: int = 0
    head_dim: int = 0
    n_vocab: int = 0
    has_chat_template: bool = False
    template_tools: bool = False  # the chat template renders tools
    tool_syntax: str = ""  # the template's own tool-call syntax ("hermes"), if edgellm knows it
    license: str = ""
    source: str = ""
    added: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ModelSource(Protocol):
    def get(self, name: str) -> ModelRecord:
        """The record of a model; raises ModelNotFound."""
        ...

    def list(self) -> list[ModelRecord]: ...

    def open(self, name: str) -> AbstractContextManager[str]:
        """A loadable path to the model's verified bytes; raises IntegrityError."""
        ...


class ModelStore(ModelSource, Protocol):
    """A ModelSource that can also take models in and let them go (the vault)."""

    def add_stream(
        self,
        chunks: Iterable[bytes],
        name: str,
        *,
        expected_sha256: str | None = None,
        replace: bool = False,
        info: dict[str, Any] | None = None,
    ) -> ModelRecord: ...

    def add_file(self, path: Any, name: str, report: Any = ..., **kw: Any) -> ModelRecord: ...

    def remove(self, name: str) -> ModelRecord: ...
