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
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
SHORTLIST = 1024


class GrammarSampler:
    """``transform`` (penalties, biases) and ``select`` (greedy, or truncations and a
    draw) are llama-cpp-python ``LlamaSampler`` chains, ``grammar`` a
    ``llama_sampler`` pointer; this object owns all three."""

    def __init__(
        self, llama_cpp: Any, transform: Any, select: Any, grammar: Any, n_vocab: int
    ) -> None:
        assert TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)
        self._c, self.n_vocab = llama_cpp, n_vocab
        self.transform, self.select, self.grammar = transform, select, grammar
        self._data = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._pointer = ctypes.cast(self._data.ctypes.data, llama_cpp.llama_token_data_p)
        self._array = llama_cpp.llama_token_data_array(self._pointer, n_vocab, -1, False)
        self.steps = {"first": 0, "shortlist": 0, "all": 0}  # which step decided

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
        c.llama_sampler_accept(self.grammar, token)
        c.llama_sampler_accept(self.transform.sampler, token)
        c.llama_sampler_accept(self.select.sampler, token)
        return token

    def close(self) -> None:
        if self.grammar is not None:
            self._c.llama_sampler_free(self.grammar)
            self.grammar = None
        self.transform.close()
        self.select.close()
