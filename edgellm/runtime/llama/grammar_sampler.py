"""A grammar beside a sampler chain, applied without matching the whole vocabulary
against it on every step.

Applying a grammar to every candidate costs more than the model's decode step on a
small model: the whole vocabulary (49,152 tokens for SmolLM2) is matched against
the grammar's stacks each step, and constrained decoding ran at 0.63x the free
rate (bench/structured.py). Each step here:

1. the chain picks a token from all candidates and the grammar checks that one
   token; if it passes, it is the answer (llama.cpp's own ``common_sampler_sample``
   does this);
2. if not, the grammar checks the ``SHORTLIST`` candidates the logits (after
   penalties and biases) rank highest, and if any pass, the chain chooses among
   those;
3. only otherwise is every candidate checked.

Every token is one the grammar allows. Greedy output is exactly greedy over the
allowed tokens (the likeliest allowed token is the likeliest allowed one in the
shortlist). A seeded draw is reproducible, but not exactly a draw renormalised
over every allowed token: in step 1 it is drawn before the grammar filters (as in
llama.cpp's server), and in step 2 allowed tokens ranked below the shortlist's
1,024 are left out (``top_k``, 40 by default, and ``min_p`` leave out such tokens
anyway in all but rare cases).

A lazy grammar (``Trigger``) lets every token through until the text so far holds
the trigger; llama.cpp then feeds the grammar the text from the trigger on, and a
grammar that cannot take that text aborts the process (a C++ exception through
ctypes). So a token that would complete the trigger with more than a little
whitespace after it in its own text is never chosen: it is left out and the chain
chooses again (the grammar begins with the trigger and takes up to two spaces or
newlines after it).
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
SHORTLIST = 1024
SAFE_AFTER_TRIGGER = re.compile(rb"[ \n]{0,2}")


@dataclass
class Trigger:
    """The text that sets a lazy grammar to work, and the tokens' text as llama.cpp
    matches it (special tokens written out); ``seen`` is the text so far."""

    text: str
    piece: Callable[[int], bytes]
    seen: bytearray = field(default_factory=bytearray)
    fired: bool = False

    def after(self, token: int) -> bytes | None:
        """The text after the trigger if ``token`` completes it, else None."""
        text, trigger = self.seen + self.piece(token), self.text.encode()
        at = text.find(trigger, max(0, len(self.seen) - len(trigger) + 1))
        return None if at < 0 else bytes(text[at + len(trigger) :])

    def accept(self, token: int) -> None:
        if not self.fired:
            self.fired = self.after(token) is not None
            self.seen += self.piece(token)


class GrammarSampler:
    """``transform`` (penalties, biases) and ``select`` (greedy, or truncations and a
    draw) are llama-cpp-python ``LlamaSampler`` chains, ``grammar`` a
    ``llama_sampler`` pointer; this object owns all three."""

    def __init__(
        self,
        llama_cpp: Any,
        transform: Any,
        select: Any,
        grammar: Any,
        n_vocab: int,
        trigger: Trigger | None = None,
    ) -> None:
        assert TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)
        self._c, self.n_vocab = llama_cpp, n_vocab
        self.transform, self.select, self.grammar = transform, select, grammar
        self._data = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._pointer = ctypes.cast(self._data.ctypes.data, llama_cpp.llama_token_data_p)
        self._array = llama_cpp.llama_token_data_array(self._pointer, n_vocab, -1, False)
        self.steps = {"first": 0, "shortlist": 0, "all": 0}  # which step decided
        self.trigger = trigger

    def _reset(self, size: int) -> Any:
        a = self._array
        a.data, a.size, a.selected, a.sorted = self._pointer, size, -1, False
        return ctypes.byref(a)

    def _apply(self, sampler: Any, size: int) -> None:
        self._c.llama_sampler_apply(sampler, self._reset(size))

    def _chosen(self) -> int:
        return int(self._array.data[self._array.selected].id)

    def sample(self, ctx: Any, index: int) -> int:
        c, data = self._c, self._data
        ptr = c.llama_get_logits_ith(ctx.ctx, index)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        data["id"], data["logit"], data["p"] = self._ids, logits, 0.0
        self._apply(self.transform.sampler, self.n_vocab)
        adjusted = data["logit"].copy()
        self._apply(self.select.sampler, self.n_vocab)
        token = self._chosen()
        data[0] = (token, 1.0, 0.0)
        self._apply(self.grammar, 1)
        if data[0]["logit"] != float("-inf"):
            self.steps["first"] += 1
        else:
            size = self.n_vocab
            if self.n_vocab > SHORTLIST:
                best = np.argpartition(adjusted, -SHORTLIST)[-SHORTLIST:]
                data["id"][:SHORTLIST], data["logit"][:SHORTLIST] = best, adjusted[best]
                data["p"][:SHORTLIST] = 0.0
                self._apply(self.grammar, SHORTLIST)
                if np.isfinite(data["logit"][:SHORTLIST]).any():
                    size = SHORTLIST
            if size == self.n_vocab:
                data["id"], data["logit"], data["p"] = self._ids, adjusted, 0.0
                self._apply(self.grammar, size)
            self.steps["shortlist" if size < self.n_vocab else "all"] += 1
            self._apply(self.select.sampler, size)
            token = self._chosen()
        if self.trigger is not None and not self.trigger.fired:
            token = self._safe_trigger(token, adjusted)
            self.trigger.accept(token)
        c.llama_sampler_accept(self.grammar, token)
        c.llama_sampler_accept(self.transform.sampler, token)
        c.llama_sampler_accept(self.select.sampler, token)
        return token

    def _safe_trigger(self, token: int, adjusted: Any) -> int:
        """``token``, or the chain's choice without the tokens that would complete the
        trigger with text after it the grammar may not take."""
        assert self.trigger is not None
        data = self._data
        while True:
            after = self.trigger.after(token)
            if after is None or SAFE_AFTER_TRIGGER.fullmatch(after):
                return token
            adjusted[token] = float("-inf")
            data["id"], data["logit"], data["p"] = self._ids, adjusted, 0.0
            self._apply(self.select.sampler, self.n_vocab)
            token = self._chosen()

    def close(self) -> None:
        if self.grammar is not None:
            self._c.llama_sampler_free(self.grammar)
            self.grammar = None
        self.transform.close()
        self.select.close()
