"""The llama.cpp engine: one thread owns one model's context and decodes in it.

Requests arrive on a thread-safe queue; events leave through each request's sink.
The loop is built around slots: it admits queued requests into free slots, then
advances every active slot by one step (a prefill chunk or one sampled token),
checking cancellation and deadlines between steps, so a cancelled or disconnected
request frees its slot within one decode step.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edgellm.config import ModelSettings
from edgellm.errors import ContextOverflow, EdgeError, InternalError, ModelLoadFailed
from edgellm.runtime.source import ModelRecord
from edgellm.runtime.text import StopMatcher
from edgellm.runtime.types import Delta, Failed, Finished, GenerationRequest, Usage

log = logging.getLogger("edgellm.engine")


@dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    last_tokens_per_second: float = 0.0


@dataclass
class Slot:
    index: int
    request: GenerationRequest | None = None
    tokens: list[int] = field(default_factory=list)


class LlamaEngine:
    def __init__(
        self,
        record: ModelRecord,
        model_path: str,
        settings: ModelSettings,
        on_request_done: Any = None,
    ) -> None:
        self.record = record
        self.name = record.name
        self.model_path = model_path
        self.settings = settings
        self.n_ctx = settings.n_ctx or 4096
        if record.context_length:
            self.n_ctx = min(self.n_ctx, record.context_length)
        self.slots = [Slot(i) for i in range(settings.n_parallel or 1)]
        self.prefill_chunk = min(settings.prefill_chunk or 256, settings.n_batch or 512)
        self.stats = EngineStats()
        self.gpu_offload = False
        self._on_request_done = on_request_done
        self._queue: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._load_error: EdgeError | None = None
        self._llm: Any = None
        self._thread = threading.Thread(target=self._main, name=f"engine-{self.name}", daemon=True)
        self.last_progress = time.monotonic()

    # --- called from other threads -----------------------------------------------
    def start(self, timeout: float = 600.0) -> None:
        """Load the model on the engine thread; raise ModelLoadFailed if it cannot."""
        self._thread.start()
        self._ready.wait(timeout)
        if self._load_error is not None:
            raise self._load_error
        if not self._ready.is_set():
            raise ModelLoadFailed(f"loading {self.name} took longer than {timeout:.0f}s")

    def submit(self, request: GenerationRequest) -> None:
        self._queue.put(request)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.request is not None)

    def cancel_all(self) -> None:
        for slot in self.slots:
            if slot.request is not None:
                slot.request.cancel()
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            if req is not None:
                req.cancel()
                req.emit(Finished("cancelled", Usage(), 0.0, 0.0))

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self.cancel_all()
        self._queue.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # --- the engine thread -----------------------------------------------------------
    def _main(self) -> None:
        try:
            self._load()
        except EdgeError as exc:
            self._load_error = exc
        except Exception as exc:  # llama.cpp raises ValueError with little detail
            self._load_error = ModelLoadFailed(f"could not load {self.name}: {exc}")
        finally:
            self._ready.set()
        if self._load_error is not None:
            return
        try:
            self._loop()
        finally:
            self.cancel_all()
            self._llm = None  # frees the context and the weights on this thread

    def _load(self) -> None:
        import llama_cpp
        from llama_cpp import llama_chat_format

        s = self.settings
        kwargs: dict[str, Any] = dict(
            model_path=self.model_path,
            n_ctx=self.n_ctx * len(self.slots),
            n_batch=s.n_batch or 512,
            n_threads=s.n_threads,
            n_threads_batch=s.n_threads,
            n_gpu_layers=s.n_gpu_layers or 0,
            use_mmap=True if s.use_mmap is None else s.use_mmap,
            use_mlock=bool(s.use_mlock),
            verbose=False,
        )
        if s.main_gpu is not None:
            kwargs["main_gpu"] = s.main_gpu
        if s.tensor_split:
            kwargs["tensor_split"] = s.tensor_split
        llm = llama_cpp.Llama(**kwargs)
        offload = bool(llama_cpp.llama_supports_gpu_offload())
        self.gpu_offload = offload and (s.n_gpu_layers or 0) != 0
        self._vocab = llm._model.vocab
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._eos = llm.token_eos()
        template = llm.metadata.get("tokenizer.chat_template")
        self._chat = None
        if template:
            def text(tok: int) -> str:
                return llm._model.token_get_text(tok) if tok != -1 else ""

            self._chat = llama_chat_format.Jinja2ChatFormatter(
                template=template, eos_token=text(self._eos), bos_token=text(llm.token_bos())
            )
        self._llm = llm

    def _loop(self) -> None:
        while not self._stopping.is_set():
            request = self._queue.get()
            if request is None:
                continue
            slot = self.slots[0]
            slot.request = request
            final: Finished | Failed
            try:
                final = self._generate(slot, request)
            except EdgeError as exc:
                final = Failed(exc)
            except Exception as exc:
                log.exception("event=engine_error model=%s request=%s", self.name, request.id)
                final = Failed(InternalError(f"engine error in {self.name}: {exc}"))
            # free the slot before the client hears the outcome, so that whatever it
            # asks next (/api/ps, another request) sees the slot free
            slot.request = None
            self.last_progress = time.monotonic()
            if self._on_request_done:
                self._on_request_done(self.name)
            request.emit(final)

    def _prompt_tokens(self, request: GenerationRequest) -> tuple[list[int], list[str]]:
        llm = self._llm
        if request.messages is not None:
            if self._chat is None:
                from edgellm.errors import InvalidRequest

                raise InvalidRequest(
                    f"model {self.name} has no chat template; use /v1/completions", param="model"
                )
            try:
                formatted = self._chat(messages=request.messages)
            except Exception as exc:  # a template may raise_exception() on bad roles
                from edgellm.errors import InvalidRequest

                raise InvalidRequest(f"the chat template rejected the messages: {exc}",
                                     param="messages") from None
            tokens = llm.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special,
                                  special=True)
            return tokens, [s for s in (formatted.stop or []) if isinstance(s, str)]
        return llm.tokenize((request.prompt or "").encode(), add_bos=True, special=True), []

    def _sampler(self, request: GenerationRequest) -> Any:
        from llama_cpp._internals import LlamaSampler

        p = request.sampling
        sampler = LlamaSampler()
        n_vocab = self._llm.n_vocab()
        if p.repeat_penalty != 1.0:
            sampler.add_penalties(n_vocab, 64, p.repeat_penalty, 0.0, 0.0)
        if p.ignore_eos:
            eogs = {t: float("-inf") for t in range(n_vocab) if self._is_eog(self._vocab, t)}
            sampler.add_logit_bias(n_vocab, eogs)
        if p.temperature <= 0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(p.top_k)
            sampler.add_top_p(p.top_p, 1)
            sampler.add_min_p(p.min_p, 1)
            sampler.add_temp(p.temperature)
            seed = p.seed if p.seed is not None else random.getrandbits(32)
            sampler.add_dist(seed & 0xFFFFFFFF)
        return sampler

    def _generate(self, slot: Slot, request: GenerationRequest) -> Finished:
        llm = self._llm
        if request.cancel_event.is_set():
            return self._account("cancelled", Usage(), 0.0, 0.0)
        request.state = "running"
        tokens, template_stops = self._prompt_tokens(request)
        n_prompt = len(tokens)
        request.prompt_tokens = n_prompt
        if n_prompt >= self.n_ctx:
            raise ContextOverflow(
                f"the prompt is {n_prompt} tokens but {self.name}'s context is {self.n_ctx} "
                f"tokens; shorten it (or raise n_ctx)",
                param="messages" if request.messages is not None else "prompt",
            )
        room = self.n_ctx - n_prompt
        max_tokens = room if request.max_tokens is None else min(request.max_tokens, room)
        stops = StopMatcher(list(request.stop) + template_stops)
        sampler = self._sampler(request)

        # Prefill in chunks aligned to absolute positions, reusing only whole chunks that
        # an earlier prefill computed: the CPU kernels round differently for a batch of
        # one token than for many, so reusing anything else would make greedy output
        # depend on what ran before.
        t0 = time.monotonic()
        chunk = self.prefill_chunk
        previous = slot.tokens
        common = 0
        for a, b in zip(previous, tokens, strict=False):
            if a != b:
                break
            common += 1
        keep = min(common, (len(previous) // chunk) * chunk, ((n_prompt - 1) // chunk) * chunk)
        keep = (keep // chunk) * chunk
        slot.tokens = []
        llm.n_tokens = keep
        for i in range(keep, n_prompt, chunk):
            if request.cancel_event.is_set():
                return self._account("cancelled", Usage(n_prompt, 0), time.monotonic() - t0, 0.0)
            llm.eval(tokens[i : i + chunk])
            self.last_progress = time.monotonic()
        slot.tokens = tokens
        t1 = time.monotonic()

        generated = 0
        reason = "length"
        deadline = request.deadline
        while generated < max_tokens:
            if request.cancel_event.is_set():
                reason = "cancelled"
                break
            if deadline is not None and time.monotonic() > deadline:
                reason = "deadline"
                break
            token = sampler.sample(llm._ctx, -1)
            if self._is_eog(self._vocab, token) and not request.sampling.ignore_eos:
                reason = "stop"
                break
            generated += 1
            request.completion_tokens = generated
            text, hit = stops.feed(llm.detokenize([token]))
            if text:
                request.emit(Delta(text))
            if hit:
                reason = "stop"
                break
            if generated < max_tokens:
                llm.eval([token])
                self.last_progress = time.monotonic()
        if reason != "stop":
            tail = stops.flush()
            if tail:
                request.emit(Delta(tail))
        sampler.close()
        t2 = time.monotonic()
        return self._account(reason, Usage(n_prompt, generated), t1 - t0, t2 - t1,
                             prefilled=n_prompt - keep)

    def _account(self, reason: str, usage: Usage, prompt_s: float, decode_s: float,
                 prefilled: int = 0) -> Finished:
        st = self.stats
        st.requests += 1
        st.prompt_tokens += prefilled
        st.generated_tokens += usage.completion_tokens
        st.prompt_seconds += prompt_s
        st.decode_seconds += decode_s
        if decode_s > 0 and usage.completion_tokens:
            st.last_tokens_per_second = usage.completion_tokens / decode_s
        return Finished(reason, usage, prompt_s, decode_s)  # type: ignore[arg-type]
