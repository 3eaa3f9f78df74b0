"""What one llama_decode costs, by the slots it covers and the prompts it carries.

    .venv/bin/python bench/llama_steps.py        # about 1 minute on 2 cores

edgellm's own backend (``LlamaBackend``: one KV stream per slot, as the daemon runs
it), no server around it. Three tables:

1. a decode step of one token per sequence, by which slots hold the sequences:
   llama.cpp evaluates sequences together only when their ids follow each other,
   so 4 sequences in slots 0, 2, 5, 7 cost more than in slots 0 to 3 (the 4-client
   dip of issue #21; the engine keeps busy sequences packed since);
2. eight prompts evaluated one batch each against all in one batch: what fused
   batching could save in compute here;
3. one prompt alone, in edgellm's 8-stream context, a 1-stream one and a plain
   ``Llama``: whether the context's shape costs a first token anything.

Ratios are against the first row of each table, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import model_file, table  # noqa: E402

from edgellm.config import ModelSettings  # noqa: E402
from edgellm.runtime.llama.backend import LlamaBackend  # noqa: E402

LAYOUTS = [[0], [0, 1, 2, 3], [4, 5, 6, 7], [0, 2, 5, 7], [0, 1, 6, 7], list(range(8))]


def decode_steps(llm: LlamaBackend, prompt: list[int], steps: int) -> list[dict[str, Any]]:
    for seq in range(8):
        llm.seq_keep_prefix(seq, 0)
        llm.decode([(t, i, seq, i == len(prompt) - 1) for i, t in enumerate(prompt)])
    rows = []
    for seqs in LAYOUTS:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            llm.decode([(prompt[-1], len(prompt), s, True) for s in seqs])
            times.append(time.perf_counter() - t0)
            for s in seqs:  # the same position again next time: the same work each step
                llm.seq_keep_prefix(s, len(prompt))
        ms = statistics.median(times) * 1000
        rows.append({"slots": ",".join(map(str, seqs)), "sequences": len(seqs), "ms": ms})
    for row in rows:
        row["x_one"] = row["ms"] / rows[0]["ms"]
        row["ms_per_sequence"] = row["ms"] / row["sequences"]
    return rows


def prompts(llm: LlamaBackend, prompt: list[int], rounds: int) -> list[dict[str, Any]]:
    def clear() -> None:
        for seq in range(8):
            llm.seq_keep_prefix(seq, 0)

    alone, together = [], []
    for _ in range(rounds):
        clear()
        t0 = time.perf_counter()
        for seq in range(8):
            llm.decode([(t, i, seq, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        alone.append(time.perf_counter() - t0)
        clear()
        t0 = time.perf_counter()
        llm.decode(
            [(t, i, s, i == len(prompt) - 1) for s in range(8) for i, t in enumerate(prompt)]
        )
        together.append(time.perf_counter() - t0)
    a, b = statistics.median(alone) * 1000, statistics.median(together) * 1000
    return [
        {"how": "8 prompts, one batch each", "ms": a, "x": 1.0},
        {"how": "8 prompts, one batch", "ms": b, "x": b / a},
    ]


def one_prompt(threads: int, rounds: int) -> list[dict[str, Any]]:
    """One prompt's evaluation in edgellm's 8-stream context, a 1-stream one, and a
    plain llama-cpp-python ``Llama`` (what the batching benchmark's baseline calls)."""
    from llama_cpp import Llama

    text = "Counting, list 1017: 1, 2, 3, 4, 5,"
    rows = []
    for n_seq in (8, 1):
        llm = LlamaBackend(str(model_file()), ModelSettings(n_threads=threads), 1024, n_seq)
        try:
            tokens = llm.tokenize(text, True)
            times = []
            for _ in range(rounds):
                llm.seq_keep_prefix(0, 0)
                t0 = time.perf_counter()
                llm.decode([(t, i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)])
                times.append(time.perf_counter() - t0)
        finally:
            llm.close()
        rows.append({"how": f"edgellm's context, {n_seq} streams", "ms": statistics.median(times)})
    plain = Llama(
        str(model_file()), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    tokens = plain.tokenize(text.encode())
    times = []
    for _ in range(rounds):
        plain.reset()  # eval drops the cells from n_tokens (now 0) on
        t0 = time.perf_counter()
        plain.eval(tokens)
        times.append(time.perf_counter() - t0)
    rows.append({"how": "llama-cpp-python Llama.eval", "ms": statistics.median(times)})
    for row in rows:
        row["ms"] *= 1000
        row["x"] = row["ms"] / rows[0]["ms"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    settings = ModelSettings(n_threads=args.threads, n_batch=512)
    llm = LlamaBackend(str(model_file()), settings, 1024, 8)
    try:
        prompt = llm.tokenize("Counting, list 1017: 1, 2, 3, 4, 5,", True)
        steps = decode_steps(llm, prompt, args.steps)
        batches = prompts(llm, prompt, max(3, args.steps // 8))
    finally:
        llm.close()
    single = one_prompt(args.threads, max(5, args.steps // 4))
    print(f"\nthe default model, {args.threads} threads, 8 slots (one KV stream each)\n")
    print("a decode step, one token per sequence, median of", args.steps, "\n")
    print(
        table(
            steps,
            [
                ("slots", "slots"),
                ("sequences", "sequences"),
                ("ms", "ms/step"),
                ("x_one", "× one sequence"),
                ("ms_per_sequence", "ms/sequence"),
            ],
        )
    )
    print(f"\nprompts of {len(prompt)} tokens\n")
    print(table(batches, [("how", "prefill"), ("ms", "ms"), ("x", "× one batch each")]))
    print("\none prompt alone\n")
    print(table(single, [("how", "prefill"), ("ms", "ms"), ("x", "× edgellm's")]))


if __name__ == "__main__":
    main()
