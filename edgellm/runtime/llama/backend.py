"""A thin layer over llama.cpp's C API (through llama-cpp-python's bindings).

Everything ctypes lives here: the model and a multi-sequence context with a
unified KV cache, one reusable batch, per-sequence KV operations, tokenization and
the chat template. Only the engine thread calls into it.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from edgellm.config import ModelSettings
from edgellm.errors import InvalidRequest, ModelLoadFailed
from edgellm.runtime.llama.chat_template import TemplateRenderer
from edgellm.runtime.llama.grammar_sampler import GrammarSampler, Trigger
from edgellm.runtime.types import Sampling, TokenLogprob

log = logging.getLogger("edgellm.engine")


_errors: deque[str] = deque(maxlen=8)  # llama.cpp's latest error lines, for messages
_log_callback: Any = None


def _capture_llama_log(llama_cpp: Any) -> None:
    """Route llama.cpp's own log through ours: errors are kept (a failed load's message
    names their reason, where llama-cpp-python says only "Failed to load model from
    file") and logged one line each; its chatter is dropped."""
    global _log_callback
    if _log_callback is not None:
        return
    partial: list[str] = []

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: Any) -> None:
        # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (a continuation)
        if level not in (4, 5):
            partial.clear()
            return
        if level == 5 and not partial:
            return
        partial.append(text.decode("utf-8", "replace"))
        if partial[-1].endswith("\n"):
            line = "".join(partial).strip()
            partial.clear()
            if line:
                _errors.append(line)
                log.warning("event=llama_cpp_error message=%r", line)

    _log_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def _reason(default: str) -> str:
    """What llama.cpp said last, in words: its error lines, without the function names."""
    lines = [line.split(": ", 1)[-1] for line in _errors]
    _errors.clear()
    return "; ".join(dict.fromkeys(lines)) or default


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(" amx_int8" in line for line in f if line.startswith("flags"))
    except OSError:
        return False


class LlamaBackend:
    def __init__(self, path: str, settings: ModelSettings, n_ctx: int, n_seq: int) -> None:
        import llama_cpp
        from llama_cpp import _internals, _logger

        _logger.set_verbose(False)  # llama.cpp's own chatter: errors only
        _capture_llama_log(llama_cpp)
        self._c = llama_cpp
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = settings.n_gpu_layers or 0
        mp.use_mmap = True if settings.use_mmap is None else settings.use_mmap
        mp.use_mlock = bool(settings.use_mlock)
        # llama.cpp's AMX weights (an "extra buffer type", chosen on CPUs with AMX, such
        # as Xeon Sapphire Rapids) crash in ggml_backend_amx_mul_mat once the context
        # holds several KV streams (one per slot, as here): seen with llama-cpp-python
        # 0.3.36 on a first prompt. Plain CPU buffers there; other CPUs keep theirs.
        if _cpu_has_amx():
            mp.use_extra_bufts = False
        if settings.main_gpu is not None:
            mp.main_gpu = settings.main_gpu
        if settings.tensor_split:
            values = settings.tensor_split[: llama_cpp.LLAMA_MAX_DEVICES]
            self._tensor_split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*values)
            mp.tensor_split = self._tensor_split
        _errors.clear()
        try:
            self.model = _internals.LlamaModel(path_model=path, params=mp, verbose=False)
        except ValueError as exc:
            raise ModelLoadFailed(
                f"llama.cpp could not load the model: {_reason(str(exc))}"
            ) from None
        self.n_batch = max(settings.n_batch or 512, n_seq)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq
        cp.n_batch = cp.n_ubatch = self.n_batch
        cp.n_seq_max = n_seq
        # One KV stream per slot, not a unified cache: in a shared cache a sequence's
        # cells interleave with its neighbours' and refill their holes, attention then
        # sums in another order, and output depends on what else ran. In its own
        # stream a sequence is laid out the same whether it runs alone or not.
        cp.kv_unified = False
        cp.n_threads = cp.n_threads_batch = settings.n_threads or 1
        try:
            self.ctx = _internals.LlamaContext(model=self.model, params=cp, verbose=False)
        except ValueError as exc:
            raise ModelLoadFailed(
                f"llama.cpp could not create a context: {_reason(str(exc))}"
            ) from None
        self._mem = self.ctx.memory
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab()
        self.gpu_offload = bool(llama_cpp.llama_supports_gpu_offload()) and mp.n_gpu_layers != 0
        self.eos = self.model.token_eos()
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self.eog_tokens = [
            t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)
        ]
        meta = self.model.metadata()
        template = meta.get("tokenizer.chat_template")
        self.chat: TemplateRenderer | None = None
        self._eos_text = ""
        if template:

            def text(tok: int) -> str:
                return self.model.token_get_text(tok) if tok != -1 else ""

            self._eos_text = text(self.eos)
            self.chat = TemplateRenderer(
                template,
                bos=text(self.model.token_bos()),
                eos=self._eos_text,
                timeout=settings.template_timeout or 2.0,
            )
            try:
                self.chat.start()
            except InvalidRequest as exc:
                log.warning("event=chat_template_unusable problem=%r", exc.message)
                self.chat = None
                self._template_problem = exc.message

    def close(self) -> None:
        if self.chat is not None:
            self.chat.close()
        if self.batch is not None:
            self._c.llama_batch_free(self.batch)
            self.batch = None
        self.ctx.close()
        self.model.close()

    # --- text ----------------------------------------------------------------------
    def prompt_tokens(
        self,
        prompt: str | None,
        messages: list[dict[str, Any]] | None,
        template_vars: dict[str, Any] | None = None,
    ) -> tuple[list[int], list[str]]:
        if messages is None:
            return self.model.tokenize((prompt or "").encode(), True, True), []
        if self.chat is None:
            why = getattr(self, "_template_problem", "this model has no chat template")
            raise InvalidRequest(f"{why}; use /v1/completions", param="model")
        # bounded in time, memory and output, in a worker (chat_template.py); raises
        # InvalidRequest for a template that rejects the messages or overruns
        prompt = self.render(messages, **(template_vars or {}))
        tokens = self.model.tokenize(prompt.encode(), False, True)
        return tokens, [self._eos_text] if self._eos_text else []

    def piece(self, token: int) -> bytes:
        """The bytes of one token (memoised: the vocabulary does not change)."""
        cached = self._pieces.get(token)
        if cached is None:
            cached = self._pieces[token] = self._piece(token, special=False)
        return cached

    def _piece(self, token: int, special: bool) -> bytes:
        n = self._c.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, special)
        if n >= 0:
            return self._piece_buf.raw[:n]
        buf = ctypes.create_string_buffer(-n)  # longer than the buffer: llama.cpp says how long
        n = self._c.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """Special tokens written out (``<|im_end|>``) are read as themselves."""
        return self.model.tokenize(text.encode(), add_special, True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens``, special tokens written out."""
        self.check_tokens(tokens, "tokens")
        return b"".join(self._piece(t, special=True) for t in tokens).decode("utf-8", "replace")

    def check_tokens(self, tokens: Iterable[int], param: str) -> None:
        """InvalidRequest (``param``) naming the first id outside the vocabulary."""
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise InvalidRequest(
                f"{param} names token {bad[0]}, but the model's vocabulary has "
                f"{self.n_vocab} tokens (0 to {self.n_vocab - 1})",
                param=param,
            )

    def render(self, messages: list[dict[str, Any]], **template_vars: Any) -> str:
        """The prompt the chat template makes of ``messages`` (and, say, ``tools``)."""
        if self.chat is None:
            why = getattr(self, "_template_problem", "this model has no chat template")
            raise InvalidRequest(why, param="model")
        return self.chat.render(messages, **template_vars)

    def is_eog(self, token: int) -> bool:
        return bool(self._c.llama_vocab_is_eog(self.vocab, token))

    # --- decoding --------------------------------------------------------------------
    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> int:
        """One llama_decode over (token, position, sequence, want_logits) entries."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(entries)
        return self._c.llama_decode(self.ctx.ctx, b)

    def seq_keep_prefix(self, seq: int, length: int) -> None:
        """Drop a sequence's cells from ``length`` on."""
        self._c.llama_memory_seq_rm(self._mem, seq, length, -1)

    def seq_copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Make ``dst`` hold ``src``'s first ``length`` cells. Between streams llama.cpp
        copies only whole sequences, so copy all of it and trim."""
        self._c.llama_memory_seq_rm(self._mem, dst, -1, -1)
        if length and src != dst:
            self._c.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
            self._c.llama_memory_seq_rm(self._mem, dst, length, -1)

    def set_threads(self, n: int) -> None:
        self._c.llama_set_n_threads(self.ctx.ctx, n, n)

    def sampler(
        self,
        p: Sampling,
        seed: int,
        grammar: str | None = None,
        penalty_window: int = 64,
        trigger: str | None = None,
    ) -> Any:
        """One request's sampler chain: penalties and biases on the logits, then greedy
        or the truncations and a seeded draw; with a grammar, the grammar beside it
        (grammar_sampler.py), which every token must pass — with a ``trigger``, every
        token from the one that completes the trigger's text on."""
        from llama_cpp._internals import LlamaSampler

        self.check_tokens(p.logit_bias, "logit_bias")
        bias = {t: float("-inf") if b <= -100 else b for t, b in p.logit_bias.items()}
        g, lazy = None, None
        if grammar is not None:
            _errors.clear()
            if trigger is None:
                g = self._c.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
            else:
                lazy = Trigger(trigger, lambda t: self._piece(t, special=True))
                # the pattern is matched against all the text so far (^…$ in either
                # llama.cpp's old or new reading); the grammar starts at the group
                pattern = f"^[\\s\\S]*?({re.escape(trigger)})[\\s\\S]*$".encode()
                patterns = (ctypes.c_char_p * 1)(pattern)
                g = self._c.llama_sampler_init_grammar_lazy_patterns(
                    self.vocab, grammar.encode(), b"root", patterns, 1, None, 0
                )
            if not g:
                raise InvalidRequest(
                    f"the grammar does not compile: {_reason('llama.cpp refused it')}",
                    param="grammar",
                )
        if g is None:  # one chain: the transforms, then the selection
            chain = LlamaSampler()
            self._add_samplers(p, seed, bias, penalty_window, chain, chain)
            return chain
        transform, select = LlamaSampler(), LlamaSampler()
        self._add_samplers(p, seed, bias, penalty_window, transform, select)
        return GrammarSampler(self._c, transform, select, g, self.n_vocab, lazy)

    def _add_samplers(
        self,
        p: Sampling,
        seed: int,
        bias: dict[int, float],
        penalty_window: int,
        transform: Any,
        select: Any,
    ) -> None:
        """Penalties and biases onto ``transform``; greedy, or the truncations and a
        seeded draw, onto ``select``."""
        if p.frequency_penalty or p.presence_penalty:  # over the whole answer so far
            transform.add_penalties(
                self.n_vocab,
                penalty_window,
                p.repeat_penalty,
                p.frequency_penalty,
                p.presence_penalty,
            )
        elif p.repeat_penalty != 1.0:
            transform.add_penalties(self.n_vocab, 64, p.repeat_penalty, 0.0, 0.0)
        if p.ignore_eos:
            bias.update({t: float("-inf") for t in self.eog_tokens})
        if bias:
            transform.add_logit_bias(self.n_vocab, bias)
        if p.temperature <= 0:
            select.add_greedy()
        else:
            select.add_top_k(p.top_k)
            select.add_top_p(p.top_p, 1)
            select.add_min_p(p.min_p, 1)
            select.add_temp(p.temperature)
            select.add_dist(seed & 0xFFFFFFFF)

    def sample(self, sampler: Any, index: int) -> int:
        return sampler.sample(self.ctx, index)

    def logprob(self, index: int, token: int, top: int) -> TokenLogprob:
        """``token``'s log-probability in the model's distribution at batch ``index``
        (the softmax of its logits, before any sampler), and the ``top`` likeliest."""
        import numpy as np

        ptr = self._c.llama_get_logits_ith(self.ctx.ctx, index)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        peak = logits.max()
        norm = peak + np.log(np.exp(logits - peak).sum())
        best: tuple[tuple[bytes, float], ...] = ()
        if top:
            ids = np.argpartition(logits, -top)[-top:]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            best = tuple((self.piece(int(t)), float(logits[t] - norm)) for t in ids)
        return TokenLogprob(self.piece(token), float(min(0.0, logits[token] - norm)), best)
