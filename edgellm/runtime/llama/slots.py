"""A slot: one sequence of the shared llama.cpp context, and the request it serves."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from edgellm.runtime.llama.text import StopMatcher
from edgellm.runtime.types import GenerationRequest


@dataclass
class Slot:
    index: int  # also its llama.cpp sequence id
    request: GenerationRequest | None = None
    state: str = "free"  # free | prefill | generate
    prompt: list[int] = field(default_factory=list)
    # Tokens whose KV cells this sequence holds and that a prefill computed as whole
    # aligned chunks: the part another request may reuse bit for bit.
    cached: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt positions evaluated so far
    reused: int = 0  # of those, taken from the cache
    pos: int = 0  # next position to decode
    last_token: int = -1
    max_tokens: int = 0
    generated: int = 0
    sampler: Any = None
    stops: StopMatcher | None = None
    admitted: float = 0.0
    prompt_seconds: float = 0.0
    first_token_at: float = 0.0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def busy(self) -> bool:
        return self.request is not None

    def release(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
        self.request, self.state, self.sampler, self.stops = None, "free", None, None
        self.last_used = time.monotonic()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def reusable(cached: list[int], prompt: list[int], chunk: int) -> int:
    """How much of ``prompt`` can come from ``cached``: whole chunks only, and never
    the whole prompt (its last token must be evaluated to get logits)."""
    n = min(common_prefix(cached, prompt), len(prompt) - 1)
    return (n // chunk) * chunk
