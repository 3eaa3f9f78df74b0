"""Several requests decoding together: correctness of continuous batching."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from edgellm.config import load_settings
from edgellm.runtime.manager import Runtime
from edgellm.runtime.types import Finished, GenerationRequest, Sampling
from edgellm.vault.open import open_vault

from conftest import MODEL, Daemon, wait_for

PROMPTS = [
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "List three uses of copper, and explain each in detail. " * 6,  # a long prompt
    "What is the capital of Japan?",
]


def _ask(d: Daemon, prompt: str, out: dict[str, Any], key: Any, **params: Any) -> None:
    with d.client() as c:
        stream = c.chat([{"role": "user", "content": prompt}], stream=True, **params)
        out[key] = ("".join(stream), stream.finish_reason, stream.usage)


def _start_generating(
    d: Daemon, prompt: str, out: dict[int, Any], key: int, max_tokens: int
) -> threading.Thread:
    """A long request in a thread, returned once it is producing tokens."""
    t = threading.Thread(
        target=_ask,
        args=(d, prompt, out, key),
        kwargs={"max_tokens": max_tokens, "ignore_eos": True},
    )
    t.start()
    with d.client() as c:
        wait_for(lambda: any(r["completion_tokens"] > 0 for r in c.requests()))
    return t


def _parallel(
    d: Daemon, jobs: list[tuple[str, dict[str, Any]]], stagger: float = 0.0
) -> dict[int, Any]:
    out: dict[int, Any] = {}
    threads = []
    for i, (prompt, params) in enumerate(jobs):
        t = threading.Thread(target=_ask, args=(d, prompt, out, i), kwargs=params)
        t.start()
        threads.append(t)
        time.sleep(stagger)
    for t in threads:
        t.join(120)
    return out


def test_greedy_output_is_the_same_alone_and_beside_others(make_daemon: Any) -> None:
    d: Daemon = make_daemon(n_parallel=4, prefill_chunk=64)
    greedy = {"temperature": 0, "max_tokens": 48, "ignore_eos": True}
    alone = {i: _parallel(d, [(p, greedy)])[0] for i, p in enumerate(PROMPTS)}
    # all four at once, arriving while the others decode (so prefill chunks interleave)
    together = _parallel(d, [(p, greedy) for p in PROMPTS], stagger=0.15)
    for i in range(len(PROMPTS)):
        assert together[i] == alone[i], f"prompt {i} changed when batched"
    # beside sampled neighbours that end at different steps and leave holes behind
    for trial in range(2):
        crowd = _parallel(
            d,
            [(PROMPTS[0], greedy)]
            + [(p, {"temperature": 0.8, "max_tokens": 5 + 9 * k}) for k, p in enumerate(PROMPTS)],
            stagger=0.05 * trial,
        )
        assert crowd[0] == alone[0], f"trial {trial}: changed beside sampled neighbours"
    with d.client() as c:
        ps = c.ps()[0]
    assert ps["mean_sequences_per_step"] > 1.0  # they really were decoded together
    steps = _metric(d, "llamacpp:n_decode_total")
    assert (
        _metric(d, "edgellm_decode_step_sequences_total") / steps == ps["mean_sequences_per_step"]
        or abs(
            _metric(d, "edgellm_decode_step_sequences_total") / steps
            - ps["mean_sequences_per_step"]
        )
        < 0.01
    )


def test_busy_sequences_stay_packed_and_a_moved_one_is_unchanged(make_daemon: Any) -> None:
    """llama.cpp batches only sequences with consecutive ids together, so a sequence
    left beyond a hole is moved into it (its KV stream copied): every decode step stays
    one graph evaluation, and the moved answer is the one it gives alone."""
    d: Daemon = make_daemon(n_parallel=4)
    greedy = {"temperature": 0, "max_tokens": 60, "ignore_eos": True}
    alone = _parallel(d, [(PROMPTS[3], greedy)])[0]
    out: dict[int, Any] = {}
    first = _start_generating(d, PROMPTS[0], out, 0, max_tokens=60)  # slot 0
    short = threading.Thread(  # slot 1, ends first: a hole between the other two
        target=_ask, args=(d, PROMPTS[1], out, 1), kwargs={"max_tokens": 24, "ignore_eos": True}
    )
    short.start()
    with d.client() as c:
        wait_for(lambda: sum(m["slots_busy"] for m in c.ps()) == 2)
    last = threading.Thread(target=_ask, args=(d, PROMPTS[3], out, 3), kwargs=greedy)  # slot 2
    last.start()
    for t in (first, short, last):
        t.join(120)
    assert out[3] == alone and out[1][2]["completion_tokens"] == 24
    with d.client() as c:
        ps = c.ps()[0]
    assert ps["sequence_moves"] >= 1 and ps["mean_micro_batches_per_step"] == 1.0


def test_fused_batching_prefills_prompts_that_arrive_together_together(
    make_daemon: Any,
) -> None:
    """Fused: the waiting prompts' chunks ride in the decode step's batch. Alone, a
    request is answered as in exact mode; beside others, every request is served in
    full (its text may differ: README, "Continuous batching")."""
    fused: Daemon = make_daemon(n_parallel=4, batching="fused")
    exact: Daemon = make_daemon(n_parallel=4)
    greedy = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}
    assert _parallel(fused, [(PROMPTS[2], greedy)]) == _parallel(exact, [(PROMPTS[2], greedy)])
    for d in (fused, exact):
        out = _parallel(d, [(p, greedy) for p in PROMPTS])
        assert [out[i][1:] for i in range(4)] == [("length", out[i][2]) for i in range(4)]
        assert all(out[i][2]["completion_tokens"] == 24 for i in range(4))
    with fused.client() as f, exact.client() as e:
        fused_ps, exact_ps = f.ps()[0], e.ps()[0]
    assert fused_ps["batching"] == "fused" and fused_ps["mean_prompts_per_prefill_step"] > 1.0
    assert exact_ps["batching"] == "exact" and exact_ps["mean_prompts_per_prefill_step"] == 1.0


def test_seeded_sampling_is_reproducible_alone_and_together(make_daemon: Any) -> None:
    d: Daemon = make_daemon(n_parallel=4)
    sampled = {"temperature": 0.9, "seed": 1234, "max_tokens": 32}
    first = _parallel(d, [(PROMPTS[0], sampled)])[0]
    again = _parallel(d, [(PROMPTS[0], sampled)])[0]
    crowd = _parallel(
        d,
        [(PROMPTS[0], sampled), (PROMPTS[1], {"max_tokens": 32}), (PROMPTS[3], {"max_tokens": 32})],
    )
    assert first == again == crowd[0]


def test_cancel_mid_batch_leaves_the_others_untouched(make_daemon: Any) -> None:
    d: Daemon = make_daemon(n_parallel=3)
    greedy = {"temperature": 0, "max_tokens": 40, "ignore_eos": True}
    alone = _parallel(d, [(PROMPTS[1], greedy)])[0]
    out: dict[int, Any] = {}
    long_one = _start_generating(d, PROMPTS[0], out, 0, max_tokens=3000)
    with d.client() as c:
        threads = [long_one] + [
            threading.Thread(target=_ask, args=(d, PROMPTS[1], out, k), kwargs=greedy)
            for k in (1, 2)
        ]
        for t in threads[1:]:
            t.start()
        wait_for(lambda: sum(m["slots_busy"] for m in c.ps()) == 3)
        oldest = max(c.requests(), key=lambda r: r["age_seconds"])  # the long one
        c.cancel(oldest["id"])
    for t in threads:
        t.join(60)
    assert out[0][1] == "cancelled"
    assert out[1] == out[2] == alone


def test_context_overflow_ends_only_that_slot(make_daemon: Any) -> None:
    d: Daemon = make_daemon(n_parallel=2, n_ctx=128)
    out = _parallel(
        d,
        [
            (
                "Tell me everything about the history of Rome.",
                {"max_tokens": 500, "ignore_eos": True},
            ),
            ("Hi", {"max_tokens": 60, "ignore_eos": True}),
        ],
    )
    text, finish, usage = out[0]
    assert finish == "length"
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 128
    assert out[1][1] == "length" and out[1][2]["completion_tokens"] == 60


def test_a_slot_freed_by_disconnect_is_reused(make_daemon: Any) -> None:
    d: Daemon = make_daemon(n_parallel=2, max_queue=0)
    with d.client() as c:
        c.load(MODEL)  # with max_queue=0 not even a load may be waited for
    out: dict[int, Any] = {}
    keeper = _start_generating(d, PROMPTS[0], out, 0, max_tokens=400)
    with d.client() as c:
        leaver = c.chat(
            [{"role": "user", "content": PROMPTS[1]}], stream=True, max_tokens=3000, ignore_eos=True
        )
        pieces = iter(leaver)  # held: dropping it would close the stream right away
        for _ in range(4):
            next(pieces)
        assert sum(m["slots_busy"] for m in c.ps()) == 2
        leaver.close()
        wait_for(lambda: sum(m["slots_busy"] for m in c.ps()) == 1)
        # with max_queue=0, this is served only because the freed slot takes it
        answer = c.chat([{"role": "user", "content": PROMPTS[3]}], max_tokens=8, ignore_eos=True)
        assert answer["usage"]["completion_tokens"] == 8
        assert keeper.is_alive()  # the other stream was running all along
    keeper.join(60)
    assert out[0][1] == "length"


def _metric(d: Daemon, name: str) -> float:
    with d.client() as c:
        for line in c.metrics().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(name)


def test_prefix_reuse_is_exact_and_counted(make_daemon: Any) -> None:
    system = "You are the assistant of a weather station on a mountain. " * 20  # ~260 tokens
    question = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Will it snow tomorrow?"},
    ]
    other = [{"role": "system", "content": system}, {"role": "user", "content": "How windy is it?"}]
    greedy = {"temperature": 0, "max_tokens": 24}
    d: Daemon = make_daemon(n_parallel=2, prefill_chunk=64)
    plain: Daemon = make_daemon(n_parallel=2, prefill_chunk=64, prefix_cache=False)
    with d.client() as c, plain.client() as p:
        cold = c.chat(question, **greedy)
        assert _metric(d, "edgellm_prompt_tokens_reused_total") == 0
        warm = c.chat(other, **greedy)  # shares the system prompt's whole chunks
        reused = _metric(d, "edgellm_prompt_tokens_reused_total")
        assert reused >= 192 and reused % 64 == 0
        assert warm["choices"][0]["message"] == p.chat(other, **greedy)["choices"][0]["message"]
        assert cold["choices"][0]["message"] == p.chat(question, **greedy)["choices"][0]["message"]
    assert _metric(plain, "edgellm_prompt_tokens_reused_total") == 0


def test_limits_lower_slots_and_threads_without_reloading(model_file: Path, tmp_path: Path) -> None:
    settings = load_settings(
        overrides={
            "state_dir": tmp_path,
            "n_parallel": 4,
            "n_ctx": 512,
            "vault_key_file": tmp_path / "vault.key",
        },
        environ={},
    )
    store = open_vault(settings)
    store.add_file(model_file, MODEL)
    rt = Runtime(settings, store)
    try:
        rt.load(MODEL)
        rt.set_limits(n_parallel=1, n_threads=1)
        done = threading.Semaphore(0)
        busiest = 0
        requests = [
            GenerationRequest(
                model=MODEL,
                prompt=p,
                max_tokens=16,
                sampling=Sampling(temperature=0),
                sink=lambda ev: isinstance(ev, Finished) and done.release(),
            )
            for p in PROMPTS
        ]
        for r in requests:
            rt.submit(r)
        finished = 0
        while finished < len(requests):
            if done.acquire(timeout=0.01):
                finished += 1
            busiest = max(busiest, rt.loaded()[0].slots_busy)
        loaded = rt.loaded()[0]
        assert busiest == 1 and loaded.slot_limit == 1 and loaded.n_threads == 1
        assert loaded.slots == 4 and rt.stats["loads"] == 1
        rt.set_limits(n_parallel=4, n_threads=2)
        assert rt.loaded()[0].slot_limit == 4
    finally:
        rt.close()
