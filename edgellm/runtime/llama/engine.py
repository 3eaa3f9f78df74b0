"""The llama.cpp engine: one thread owns one model's context and its slots.

Requests arrive on a thread-safe queue; events leave through each request's sink.
Every turn of the loop:

1. admits queued requests into free slots (reusing a cached prompt prefix when
   one matches, copied between sequences with ``llama_memory_seq_cp``); a request
   for ``n`` choices takes ``n`` slots at once, and its prompt, evaluated in the
   first, is copied to the others when it is done;
2. packs the busy sequences into consecutive ids (``_pack``): llama.cpp evaluates a
   step's sequences together only when their ids follow each other, so a sequence
   left beyond a hole is moved into it (its KV stream copied);
3. decodes one token for every generating slot in a single ``llama_decode``, and
   samples each with its own sampler chain;
4. evaluates the waiting prompts' next chunks, in admission order, up to
   ``prefill_chunk`` tokens in all (the first chunk always): a long prompt never
   freezes the streams already running for more than one chunk, and short prompts
   that arrive together are all prefilled in one turn. ``batching = "exact"`` (the
   default): each chunk in a batch of its own, after step 3's. ``"fused"``: the
   chunks go into step 3's batch.

In exact mode prompt chunks run as batches of their own sequence, aligned to
absolute positions, decode steps carry one token per sequence, and each slot has its
own KV stream (see backend.py): every row is computed exactly as if the request ran
alone, so output does not depend on what else runs. In fused mode llama.cpp cuts a
batch into micro-batches of equal tokens per sequence, so a prompt chunk beside
others is evaluated in other shapes than alone, and its answer may differ from the
one it gets alone (README, "Continuous batching"). Cancellation and
deadlines are checked every turn: a cancelled or disconnected request frees its
slot within one decode step.

If the thread dies, the runtime is told first (so nothing more is sent here), then
every request it holds fails with the reason. An engine stuck inside llama.cpp
cannot run this loop: ``abandon`` fails its requests from the outside instead.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from typing import Any

from edgellm.config import ModelSettings
from edgellm.errors import ContextOverflow, EdgeError, InternalError, InvalidRequest
from edgellm.runtime import failpoints
from edgellm.runtime.engine import EngineThread
from edgellm.runtime.llama import tool_format
from edgellm.runtime.llama.backend import LlamaBackend
from edgellm.runtime.llama.slots import Run, Slot, micro_batches, reusable
from edgellm.runtime.llama.text import StopMatcher
from edgellm.runtime.source import ModelRecord
from edgellm.runtime.types import (
    Delta,
    Failed,
    Finished,
    FinishReason,
    GenerationRequest,
    Result,
    TextRequest,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)

log = logging.getLogger("edgellm.engine")


class LlamaEngine(EngineThread):
    def __init__(
        self,
        record: ModelRecord,
        model_path: str,
        settings: ModelSettings,
        on_request_done: Any = None,
        on_died: Any = None,
    ) -> None:
        super().__init__(record, model_path, settings, on_request_done, on_died)
        self.n_ctx = settings.context_for(record.context_length)
        self.slots = [Slot(i) for i in range(settings.n_parallel or 1)]
        self.capacity = self.max_active = len(self.slots)  # requests it can run at once
        self.prefill_chunk = min(settings.prefill_chunk or 256, settings.n_batch or 512)
        self.prefix_cache = True if settings.prefix_cache is None else settings.prefix_cache
        self.n_batch = max(settings.n_batch or 512, len(self.slots))
        self.batching = settings.batching or "exact"
        self.tokens_per_second_cap = 0.0  # a duty cycle, so a hot device cools
        self._llm: LlamaBackend | None = None
        self._waiting: GenerationRequest | None = None  # next, until it has its n slots
        self._texts: queue.SimpleQueue[TextRequest] = queue.SimpleQueue()

    # --- called from other threads -----------------------------------------------
    def submit(self, request: GenerationRequest | TextRequest) -> None:
        if isinstance(request, TextRequest):  # served next turn, busy slots or not
            self._texts.put(request)
            self._queue.put(None)  # wakes an idle loop
        else:
            self._enqueue(request)

    def abandon(self, error: EdgeError) -> None:
        """Give up on an engine that makes no progress, from another thread: its
        requests fail with ``error`` now; if its thread ever returns, it exits."""
        self._stopping.set()
        self._fail_requests(error)
        self._queue.put(None)

    def _fail_requests(self, error: EdgeError) -> None:
        for slot in self.slots:
            if (request := slot.request) is not None:
                request.emit(Failed(error))
        for request in self._taken_back():
            request.emit(Failed(error))

    def _taken_back(self) -> list[GenerationRequest]:
        """Every request not yet in a slot: the one waiting for slots, then the queue."""
        waiting, self._waiting = self._waiting, None
        texts: list[Any] = []
        while not self._texts.empty():
            texts.append(self._texts.get_nowait())
        return texts + ([waiting] if waiting is not None else []) + list(self._drain())

    @property
    def pending(self) -> int:
        return self._queue.qsize() + (self._waiting is not None)

    def set_limits(
        self,
        n_threads: int | None = None,
        n_parallel: int | None = None,
        tokens_per_second: float | None = None,
    ) -> None:
        """Fewer threads or slots, or a cap on tokens per second (0: none), from the
        next step on, without reloading the model. Sequences already running in slots
        above the new limit finish normally."""
        if n_threads is not None:
            self.n_threads = max(1, n_threads)
        if n_parallel is not None:
            self.max_active = max(1, min(n_parallel, len(self.slots)))
        if tokens_per_second is not None:
            self.tokens_per_second_cap = max(0.0, tokens_per_second)

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.busy)

    def details(self) -> dict[str, Any]:
        st = self.stats
        steps = st.decode_steps or 1
        return {
            "format": "gguf",
            "n_gpu_layers": self.settings.n_gpu_layers or 0,
            "batching": self.batching,
            "mean_sequences_per_step": round(st.decode_step_sequences / steps, 2),
            # llama.cpp's graph evaluations per decode step: 1 while the busy sequences
            # are packed (see micro_batches)
            "mean_micro_batches_per_step": round(st.decode_micro_batches / steps, 2),
            # prompts evaluated in one step: above 1 only when fused
            "mean_prompts_per_prefill_step": round(st.prefill_chunks / (st.prefill_steps or 1), 2),
            "sequence_moves": st.sequence_moves,
        }

    def cancel_all(self) -> None:
        for slot in self.slots:
            if slot.request is not None:
                slot.request.cancel()
        for request in self._taken_back():
            request.cancel()
            request.emit(Finished("cancelled", Usage(), 0.0, 0.0))

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stopping.set()
        self.cancel_all()
        self._queue.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # --- the engine thread -----------------------------------------------------------
    activity = "generating"

    def _load(self) -> None:
        self._llm = LlamaBackend(self.model_path, self.settings, self.n_ctx, len(self.slots))
        self.gpu_offload = self._llm.gpu_offload

    def _close(self) -> None:
        if self.failure is None:
            self.cancel_all()
            for slot in self.slots:
                if slot.request is not None:
                    self._end(slot, "cancelled")
        if self._llm is not None:
            self._llm.close()
        self._llm = None

    def _loop(self) -> None:
        llm = self._llm
        assert llm is not None  # _load ran before the loop
        while not self._stopping.is_set():
            if self.n_threads != self._applied_threads:
                llm.set_threads(self.n_threads)
                self._applied_threads = self.n_threads
            self._serve_texts()
            self._admit()
            self._check_cancelled()
            self._pack()
            decoding, chunks, together = self._turn_work()
            if together:
                self._step(decoding, chunks)
                continue
            if decoding:
                self._step(decoding, [])
            for chunk in chunks:
                if chunk[0].state == "prefill":  # not ended meanwhile
                    self._step([], [chunk])

    # --- text requests ------------------------------------------------------------------
    def _serve_texts(self) -> None:
        llm = self._llm
        assert llm is not None
        while not self._texts.empty():
            request = self._texts.get_nowait()
            if request.cancel_event.is_set():
                request.emit(Finished("cancelled", Usage(), 0.0, 0.0))
                continue
            t0 = time.monotonic()
            try:
                if request.op == "tokenize":
                    tokens = llm.tokenize(request.text, request.add_special)
                    out: dict[str, Any] = {
                        "tokens": tokens,
                        "pieces": [llm.detokenize([t]) for t in tokens],  # specials too
                    }
                    usage = Usage(len(tokens))
                elif request.op == "detokenize":
                    out, usage = (
                        {"content": llm.detokenize(request.tokens)},
                        Usage(len(request.tokens)),
                    )
                else:
                    prompt = llm.render(request.messages)
                    out = {"prompt": prompt}
                    usage = Usage(len(llm.tokenize(prompt, False)))
            except EdgeError as exc:
                request.emit(Failed(exc))
                continue
            request.state, request.prompt_tokens = "running", usage.prompt_tokens
            request.emit(Result(out, usage, time.monotonic() - t0))

    # --- admission ----------------------------------------------------------------------
    def _fits(self, request: GenerationRequest) -> bool:
        """Whether its n slots are free now. A request for more choices than the
        governor's limit allows runs alone, once the model is idle."""
        busy = self.busy_slots
        free = len(self.slots) - busy
        return request.n <= free and (busy + request.n <= self.max_active or busy == 0)

    def _admit(self) -> None:
        while self._waiting is not None or self.busy_slots < self.max_active:
            idle = self.busy_slots == 0
            if self._waiting is not None:
                request: GenerationRequest | None = self._waiting
                self._waiting = None
            else:
                try:
                    request = self._queue.get(timeout=0.25) if idle else self._queue.get_nowait()
                except queue.Empty:
                    return
            if request is None:
                return
            try:
                if request.cancel_event.is_set():
                    request.emit(Finished("cancelled", Usage(), 0.0, 0.0))
                    continue
                if request.n > len(self.slots):
                    raise InvalidRequest(
                        f"n is {request.n}, but {self.name} decodes at most "
                        f"{len(self.slots)} choices at once (its n_parallel slots); "
                        f"ask for n up to {len(self.slots)}",
                        param="n",
                    )
                if not self._fits(request):
                    self._waiting = request  # first in line: nothing overtakes it
                    return
                self._place(request)
            except EdgeError as exc:
                request.emit(Failed(exc))
            except Exception as exc:  # one request's content must never end the engine
                log.exception(
                    "event=request_failed_in_engine model=%s id=%s", self.name, request.id
                )
                request.emit(
                    Failed(
                        InternalError(
                            f"{self.name} could not start this request ({type(exc).__name__}: "
                            f"{exc}); the model keeps serving others"
                        )
                    )
                )

    def _place(self, request: GenerationRequest) -> None:
        llm = self._llm
        assert llm is not None
        request.marks["admitted"] = time.monotonic()
        messages, use = request.messages, request.tools
        template_vars: dict[str, Any] = {}
        if use is not None and messages is not None:  # the tools, in the model's format
            messages, template_vars = tool_format.prompt(messages, use)
        tokens, template_stops = llm.prompt_tokens(request.prompt, messages, template_vars)
        request.marks["tokenized"] = time.monotonic()
        n = len(tokens)
        n_ctx = min(self.n_ctx, request.n_ctx or self.n_ctx)  # a request may ask for less
        if n >= n_ctx:
            raise ContextOverflow(
                f"the prompt is {n} tokens but {self.name}'s context is {n_ctx} tokens "
                "per request"
                + ("" if n_ctx == self.n_ctx else " (as this request asked)")
                + "; shorten it (or raise n_ctx)",
                param="messages" if request.messages is not None else "prompt",
            )
        source, keep = None, 0
        if self.prefix_cache:
            for s in self.slots:
                k = reusable(s.cached, tokens, self.prefill_chunk)
                if k > keep:
                    source, keep = s, k
        chosen = self._choose_slots(request.n, source)
        lead = chosen[0]
        p = request.sampling
        seed = p.seed if p.seed is not None else random.getrandbits(32)
        constraint = request.constraint
        grammar = constraint.grammar if constraint is not None else None
        trigger = constraint.trigger if constraint is not None else None
        # before any slot changes: a bad grammar or token id fails here
        samplers = []
        try:
            for choice in range(request.n):  # choice i draws with seed + i
                samplers.append(llm.sampler(p, seed + choice, grammar, self.n_ctx, trigger=trigger))
        except Exception:
            for made in samplers:
                made.close()
            raise
        if lead is source:
            llm.seq_keep_prefix(lead.index, keep)
        elif source is None:
            llm.seq_keep_prefix(lead.index, 0)
        else:
            llm.seq_copy_prefix(source.index, lead.index, keep)
        lead.cached = tokens[:keep]
        run = Run(request, n, [None] * request.n)
        room = n_ctx - n
        now = time.monotonic()
        for choice, (slot, sampler) in enumerate(zip(chosen, samplers, strict=True)):
            if slot is not lead:  # its cells come from the lead when its prompt is done
                llm.seq_keep_prefix(slot.index, 0)
                slot.cached = []
            slot.request, slot.run, slot.choice, slot.prompt = request, run, choice, tokens
            slot.state = "prefill" if slot is lead else "wait"
            slot.prefilled = slot.reused = keep if slot is lead else 0
            slot.pos, slot.generated = slot.prefilled, 0
            slot.max_tokens = room if request.max_tokens is None else min(request.max_tokens, room)
            slot.sampler = sampler
            slot.stops = StopMatcher(list(request.stop) + template_stops)
            slot.tool_calls = tool_format.parser(use) if use is not None else None
            slot.admitted = now
        request.state, request.prompt_tokens = "running", n
        self.last_progress = time.monotonic()
        self.stats.reused_prompt_tokens += keep

    def _choose_slots(self, n: int, source: Slot | None) -> list[Slot]:
        """``n`` free slots for a request, the lead first: those that keep the busy
        sequences fewest micro-batches (see ``micro_batches``); among them the prefix
        cache's own slot (reused in place, not copied), then the slots whose caches are
        least worth keeping: shortest, then oldest."""
        taken = {s.index for s in self.slots if s.busy}
        chosen: list[Slot] = []
        for _ in range(n):

            def cost(s: Slot) -> tuple[int, bool, int, float]:
                in_place = s is source and not chosen
                return (micro_batches(taken | {s.index}), not in_place, len(s.cached), s.last_used)

            best = min((s for s in self.slots if not s.busy and s not in chosen), key=cost)
            chosen.append(best)
            taken.add(best.index)
        return chosen

    def _pack(self) -> None:
        """Keep the busy sequences one run of consecutive ids: a sequence left beyond a
        hole moves into it (its KV stream copied), so every decode step stays one
        micro-batch. The hole's cache — most likely the finished request's, which its
        next turn may reuse — goes to the free slot whose cache is least worth keeping."""
        llm = self._llm
        assert llm is not None
        while True:
            busy = [s for s in self.slots if s.busy]
            if micro_batches(s.index for s in busy) <= 1:
                return
            moving = busy[-1]
            hole = next(s for s in self.slots[busy[0].index :] if not s.busy)
            spare = [s for s in self.slots if not s.busy and s is not hole]
            if hole.cached and spare:
                keeper = min(spare, key=lambda s: (len(s.cached), s.last_used))
                if (len(keeper.cached), keeper.last_used) < (len(hole.cached), hole.last_used):
                    llm.seq_copy_prefix(hole.index, keeper.index, len(hole.cached))
                    keeper.cached, keeper.last_used = hole.cached, hole.last_used
            a, b = moving.index, hole.index
            llm.seq_copy_prefix(a, b, moving.pos)  # applied before the next decode
            moving.index, hole.index = b, a
            self.slots[b], self.slots[a] = moving, hole
            hole.cached = list(moving.cached)  # the moved prompt's whole chunks stay behind
            llm.seq_keep_prefix(a, len(hole.cached))
            self.stats.sequence_moves += 1

    # --- stepping -----------------------------------------------------------------------
    def _check_cancelled(self) -> None:
        now = time.monotonic()
        waiting = self._waiting
        if waiting is not None and (
            waiting.cancel_event.is_set()
            or (waiting.deadline is not None and now > waiting.deadline)
        ):
            self._waiting = None
            reason: FinishReason = "cancelled" if waiting.cancel_event.is_set() else "deadline"
            waiting.emit(Finished(reason, Usage(), 0.0, 0.0))
        for slot in self.slots:
            r = slot.request
            if r is None:
                continue
            if r.cancel_event.is_set():
                self._end(slot, "cancelled")
            elif r.deadline is not None and now > r.deadline:
                self._end(slot, "deadline")

    def _turn_work(self) -> tuple[list[Slot], list[tuple[Slot, int]], bool]:
        """This turn's work: the generating slots, the prompt chunks to evaluate as
        (slot, end), and whether they all go in one batch (fused) or each in a batch
        of its own after the decode step (exact). The waiting prompts' next chunks are
        taken in admission order while they add up to ``prefill_chunk`` tokens (the
        first always), so prompts that arrive together are prefilled in one turn, and
        the running streams are held up for at most one chunk's worth per turn."""
        decoding = [s for s in self.slots if s.state == "generate"]
        waiting = sorted((s for s in self.slots if s.state == "prefill"), key=lambda s: s.admitted)
        chunks: list[tuple[Slot, int]] = []
        budget = self.prefill_chunk
        for slot in waiting:
            end = min(slot.prefilled + self.prefill_chunk, len(slot.prompt))
            if chunks and end - slot.prefilled > budget:
                break
            chunks.append((slot, end))
            budget -= end - slot.prefilled
        prompt = sum(end - slot.prefilled for slot, end in chunks)
        together = self.batching == "fused" and len(decoding) + prompt <= self.n_batch
        return decoding, chunks, together

    def _step(self, decoding: list[Slot], chunks: list[tuple[Slot, int]]) -> None:
        """One ``llama_decode``: a token for each slot in ``decoding`` and each prompt
        chunk, ordered by sequence id (so llama.cpp groups them into as few micro-batches
        as their ids allow); then each slot samples from its own logits."""
        llm = self._llm
        assert llm is not None
        ends = {id(slot): end for slot, end in chunks}
        entries: list[tuple[int, int, int, bool]] = []
        logits_at: dict[int, int] = {}  # id(slot) -> its logits' index in the batch
        for slot in sorted([*decoding, *(c[0] for c in chunks)], key=lambda s: s.index):
            end = ends.get(id(slot))
            if end is None:
                logits_at[id(slot)] = len(entries)
                entries.append((slot.last_token, slot.pos, slot.index, True))
                continue
            last = end == len(slot.prompt)
            for i in range(slot.prefilled, end):
                entries.append((slot.prompt[i], i, slot.index, last and i == end - 1))
            if last:
                logits_at[id(slot)] = len(entries) - 1
        if not entries:
            return
        t0 = time.monotonic()
        if decoding:
            failpoints.hit("engine.decode")
        code = llm.decode(entries)
        if code != 0:
            what = "decode" if decoding else "evaluate the prompt"
            error = InternalError(
                f"llama.cpp could not {what} ({code}): {self.name}'s KV cache is full"
            )
            for slot in [*decoding, *(c[0] for c in chunks)]:
                if slot.request is not None:
                    self._fail(slot, error)
            return
        now = time.monotonic()
        elapsed, st = now - t0, self.stats
        prompt_share = elapsed * (len(entries) - len(decoding)) / len(entries)
        if chunks:
            st.prefill_steps += 1
            st.prefill_chunks += len(chunks)
        for slot, end in chunks:
            self._prefilled(slot, end, logits_at.get(id(slot)), prompt_share)
        for slot in decoding:
            if slot.request is None:  # ended with a sibling that failed
                continue
            slot.pos += 1
            index = logits_at[id(slot)]
            self._take(slot, llm.sample(slot.sampler, index), index)
        self.last_progress = now
        if not decoding:
            return
        st.decode_seconds += elapsed - prompt_share
        st.decode_steps += 1
        st.decode_step_sequences += len(decoding)
        st.decode_micro_batches += micro_batches(s.index for s in decoding)
        self._recent.append((now, len(decoding)))
        if self.tokens_per_second_cap:  # idle out the rest of this step's time share
            self._stopping.wait(max(0.0, len(decoding) / self.tokens_per_second_cap - elapsed))

    def _prefilled(self, slot: Slot, end: int, index: int | None, seconds: float) -> None:
        """A prompt chunk is in the cache; with the last one, the first token is drawn."""
        llm, run = self._llm, slot.run
        assert llm is not None and run is not None
        start = slot.prefilled
        run.prompt_seconds += seconds
        self.stats.prompt_seconds += seconds
        self.stats.prompt_tokens += end - start
        slot.prefilled = slot.pos = end
        if end - start == self.prefill_chunk and end % self.prefill_chunk == 0:
            slot.cached = slot.prompt[:end]  # a whole aligned chunk: reusable bit for bit
        if index is None:
            return
        # the further choices get a copy of the prompt's cells, and draw their first
        # token from the same logits with their own samplers
        choices = [slot, *(s for s in self.slots if s.run is run and s is not slot)]
        for other in choices[1:]:
            llm.seq_copy_prefix(slot.index, other.index, end)
            other.prefilled = other.pos = end
            other.cached = list(slot.cached)
        run.first_token_at = time.monotonic()
        run.request.marks["first_token"] = run.first_token_at
        for each in choices:
            each.state = "generate"
        for each in choices:
            self._take(each, llm.sample(each.sampler, index), index)

    def _take(self, slot: Slot, token: int, index: int) -> None:
        """A sampled token (from the logits at batch ``index``): emit its text, and end
        the choice if it is done."""
        llm, request, run = self._llm, slot.request, slot.run
        assert llm is not None and request is not None and run is not None
        assert slot.stops is not None
        if llm.is_eog(token) and not request.sampling.ignore_eos:
            self._end(slot, "stop")
            return
        slot.generated += 1
        run.generated += 1
        request.completion_tokens = run.generated
        self.stats.generated_tokens += 1
        piece = llm.piece(token)
        if request.logprobs is not None:
            start, slot.bytes_fed = slot.bytes_fed, slot.bytes_fed + len(piece)
            lp = llm.logprob(index, token, request.logprobs)
            slot.held_logprobs.append((start, slot.bytes_fed, lp))
        text, hit = slot.stops.feed(piece)
        self._emit(slot, text, stopped=hit)
        if hit:
            self._end(slot, "stop")
        elif slot.generated >= slot.max_tokens or slot.pos >= self.n_ctx:
            self._end(slot, "length")
        else:
            slot.last_token = token

    def _emit(self, slot: Slot, text: str, stopped: bool = False, final: bool = False) -> None:
        assert slot.request is not None
        logprobs: tuple[TokenLogprob, ...] = ()
        if slot.request.logprobs is not None:
            logprobs = slot.let_out(len(text.encode()), stopped, final)
        if slot.tool_calls is not None:  # the answer object, as text and calls
            for part in slot.tool_calls.feed(text):
                self._deliver(slot, part)
        elif text or logprobs:
            slot.request.emit(Delta(text, slot.choice, logprobs))

    def _deliver(self, slot: Slot, part: str | ToolCallDelta) -> None:
        assert slot.request is not None
        if isinstance(part, str):
            slot.request.emit(Delta(part, slot.choice))
        else:
            part.choice = slot.choice
            slot.request.emit(part)

    def _end(self, slot: Slot, reason: FinishReason) -> None:
        """One choice ended; the request ends with its last choice."""
        run = slot.run
        if run is None:
            return
        if reason != "stop" and slot.stops is not None:
            self._emit(slot, slot.stops.flush(), final=True)
        if slot.tool_calls is not None:  # text it held in case a call began there
            for part in slot.tool_calls.flush():
                self._deliver(slot, part)
        if reason == "stop" and slot.tool_calls is not None and slot.tool_calls.calls:
            reason = "tool_calls"
        run.reasons[slot.choice] = reason
        self._free(slot, keep_cache=True)
        if run.done:
            now = time.monotonic()
            self._done(
                run.request,
                Finished(
                    run.overall(),
                    Usage(run.prompt_tokens, run.generated),
                    run.prompt_seconds,
                    now - run.first_token_at if run.first_token_at else 0.0,
                    tuple(r for r in run.reasons if r is not None) if len(run.reasons) > 1 else (),
                ),
            )

    def _fail(self, slot: Slot, error: EdgeError) -> None:
        """The request fails as a whole: every choice's slot is freed."""
        run = slot.run
        for each in self.slots:
            if each.run is run:
                self._free(each, keep_cache=False)
        if run is not None:
            self._done(run.request, Failed(error))

    def _free(self, slot: Slot, keep_cache: bool) -> None:
        """Free the slot, keeping its reusable prefix (whatever the client asks next
        sees the slot free)."""
        if self._llm is not None:
            if not keep_cache or not self.prefix_cache:
                slot.cached = []
            self._llm.seq_keep_prefix(slot.index, len(slot.cached))
        slot.release()

    def _done(self, request: GenerationRequest, final: Finished | Failed) -> None:
        self.stats.requests += 1
        self.last_progress = time.monotonic()
        if self._on_request_done:
            self._on_request_done(self.name)
        request.emit(final)
