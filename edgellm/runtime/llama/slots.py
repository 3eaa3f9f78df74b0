"""A slot: one sequence of the shared llama.cpp context, and the request it serves."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from edgellm.runtime.llama.text import StopMatcher
from edgellm.runtime.llama.tool_format import ToolCallParser
from edgellm.runtime.types import FinishReason, GenerationRequest, TokenLogprob


@dataclass
class Run:
    """One request in the engine: its choices (one slot each) and how each ended."""

    request: GenerationRequest
    prompt_tokens: int
    reasons: list[FinishReason | None]
    generated: int = 0
    prompt_seconds: float = 0.0
    first_token_at: float = 0.0

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def overall(self) -> FinishReason:
        """The request's reason: the worst of its choices'."""
        for worst in ("error", "deadline", "cancelled", "length", "tool_calls"):
            if worst in self.reasons:
                return worst
        return "stop"


@dataclass
class Slot:
    index: int  # also its llama.cpp sequence id
    request: GenerationRequest | None = None
    run: Run | None = None
    choice: int = 0  # which of its run's choices this slot decodes
    # free | prefill | wait (a further choice, waiting for the first's prompt) | generate
    state: str = "free"
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
    tool_calls: ToolCallParser | None = None  # the answer is a tool-call object
    admitted: float = 0.0
    last_used: float = field(default_factory=time.monotonic)
    # tokens whose text the stop matcher has not all let out yet: (start, end) byte
    # offsets into the choice's text, and the token with its log-probabilities
    held_logprobs: list[tuple[int, int, TokenLogprob]] = field(default_factory=list)
    bytes_fed: int = 0
    bytes_out: int = 0

    @property
    def busy(self) -> bool:
        return self.request is not None

    def release(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
        self.request, self.run, self.state, self.sampler = None, None, "free", None
        self.stops, self.tool_calls = None, None
        self.held_logprobs, self.bytes_fed, self.bytes_out = [], 0, 0
        self.last_used = time.monotonic()

    def let_out(
        self, nbytes: int, stopped: bool = False, final: bool = False
    ) -> tuple[TokenLogprob, ...]:
        """The held tokens whose text is now out, after ``nbytes`` more bytes of it:
        those it covers; at a stop string, those it reaches into (the stop's own tokens
        are dropped with it); at the end, all."""
        self.bytes_out += nbytes
        if stopped or final:
            out = [lp for start, _, lp in self.held_logprobs if final or start < self.bytes_out]
            self.held_logprobs = []
        else:
            out = [lp for _, end, lp in self.held_logprobs if end <= self.bytes_out]
            self.held_logprobs = self.held_logprobs[len(out) :]
        return tuple(out)


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


def micro_batches(sequences: Iterable[int]) -> int:
    """How many graph evaluations llama.cpp makes of one step over these sequences.

    With a KV stream per sequence, llama.cpp groups sequences into one micro-batch
    only when their ids follow each other (``split_equal(..., sequential=true)``):
    a step over sequences 0, 2, 5 and 7 is four evaluations, each reading all the
    weights, where one over 0 to 3 is one. The engine keeps busy sequences packed."""
    ordered = sorted(set(sequences))
    return sum(1 for i, s in enumerate(ordered) if i == 0 or s != ordered[i - 1] + 1)
