"""Constrained decoding against free decoding, and what a schema costs to compile.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/structured.py          # about 4 minutes on 2 cores

One daemon (the default model, 2 threads, 4 slots), the same chat prompts asked
three ways in alternating rounds: free; under a medium JSON schema (an order: a
name, three to five lines of item, quantity and price, a flag); and as a required
tool call whose arguments are that order. Tokens per second are each request's
decode rate (first streamed byte to last: text, or a call's arguments) and the
aggregate over the round, at 1 and 4 concurrent clients; the free answers run to
--max-tokens (``ignore_eos``), the constrained ones end where their object does.
Ratios are over free, in the same run; "first byte" is the time to the first text,
or to a tool call's first argument byte. Then the schema's compile time: cold (a
new schema each time, so the cache misses: checking, converting, our range rules)
and cached, and llama.cpp's own parse of the grammar, which every request pays when
it takes its slot.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import MODEL, EdgeDaemon, mean, model_file, percentile, table  # noqa: E402

ORDER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "maxLength": 24},
        "lines": {
            "type": "array",
            "minItems": 3,
            "maxItems": 5,
            "items": {
                "type": "object",
                "properties": {
                    "item": {"type": "string", "maxLength": 20},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 12},
                    "price": {"type": "number", "minimum": 0, "maximum": 1000},
                },
                "required": ["item", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "express": {"type": "boolean"},
    },
    "required": ["customer", "lines", "express"],
    "additionalProperties": False,
}


def ask(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write order number {i} from a hardware shop."}]


MODES = ("free", "json schema", "tool call")
ORDER_TOOL = {"type": "function", "function": {"name": "place_order", "parameters": ORDER}}


def one(daemon: EdgeDaemon, i: int, mode: str, max_tokens: int) -> dict[str, float]:
    body: dict[str, Any] = {
        "messages": ask(i),
        "max_tokens": max_tokens,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if mode == "free":  # the free answer runs its full length, a steady measure
        body["ignore_eos"] = True
    elif mode == "json schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "order", "schema": ORDER},
        }
    else:  # the same object as a tool's arguments
        body.update(tools=[ORDER_TOOL], tool_choice="required")
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    text: list[str] = []
    finish = None
    with daemon.http() as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                finish = c.get("finish_reason") or finish
                calls = c["delta"].get("tool_calls") or [{}]
                piece = c["delta"].get("content") or calls[0].get("function", {}).get("arguments")
                if piece:  # text, or for a tool call its arguments' first byte on
                    last = time.perf_counter()
                    first = first or last
                    text.append(piece)
    if mode != "free" and finish in ("stop", "tool_calls"):
        json.loads("".join(text))  # it parsed (the daemon validated it against ORDER)
    assert first is not None and last is not None and tokens > 1
    return {
        "tokens": tokens,
        "length": finish == "length",
        "rate": (tokens - 1) / (last - first),
        "ttft": first - t0,
        "start": t0,
        "end": last,
    }


def throughput(daemon: EdgeDaemon, args: argparse.Namespace) -> list[dict[str, Any]]:
    runs: dict[tuple[int, str], list[list[dict[str, float]]]] = {}
    for r in range(args.rounds):
        for clients in (1, 4):
            for mode in MODES:  # interleaved: drift hits them alike
                batch: list[dict[str, float]] = []
                lock = threading.Lock()

                def client(i: int, m: str, b: list[Any], lock: threading.Lock = lock) -> None:
                    result = one(daemon, i, m, args.max_tokens)
                    with lock:
                        b.append(result)

                threads = [
                    threading.Thread(target=client, args=(100 * r + k, mode, batch))
                    for k in range(clients)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                runs.setdefault((clients, mode), []).append(batch)
    rows = []
    for (clients, mode), batches in sorted(
        runs.items(), key=lambda kv: (kv[0][0], MODES.index(kv[0][1]))
    ):
        flat = [x for b in batches for x in b]
        agg = [
            sum(x["tokens"] for x in b) / (max(x["end"] for x in b) - min(x["start"] for x in b))
            for b in batches
        ]
        rows.append(
            {
                "decoding": mode,
                "clients": clients,
                "req_rate": mean([x["rate"] for x in flat]),
                "agg_rate": mean(agg),
                "tokens": round(mean([x["tokens"] for x in flat])),
                "ttft_ms": 1000 * percentile([x["ttft"] for x in flat], 0.5),
            }
        )
    for row in rows:
        base = next(b for b in rows if b["clients"] == row["clients"] and b["decoding"] == "free")
        row["req_x"] = row["req_rate"] / base["req_rate"]
        row["agg_x"] = row["agg_rate"] / base["agg_rate"]
    return rows


def compile_times(samples: int) -> list[dict[str, Any]]:
    import llama_cpp

    from edgellm.runtime.llama import schema_grammar

    def variant(i: int) -> dict[str, Any]:  # a schema the cache has not seen
        return {**ORDER, "properties": {**ORDER["properties"], f"note{i}": {"type": "boolean"}}}

    def timed(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t0)

    cold, cached, parse = [], [], []
    model = llama_cpp.llama_model_load_from_file(
        str(model_file()).encode(),
        llama_cpp.llama_model_params(vocab_only=True),
    )
    vocab = llama_cpp.llama_model_get_vocab(model)
    grammar = schema_grammar.to_grammar(ORDER)
    for i in range(samples):
        schema = variant(i)
        cold.append(timed(lambda s=schema: schema_grammar.to_grammar(s)))
        cached.append(timed(lambda s=schema: schema_grammar.to_grammar(s)))

        def parsed() -> None:
            g = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            llama_cpp.llama_sampler_free(g)

        parse.append(timed(parsed))
    llama_cpp.llama_model_free(model)
    return [
        {"step": what, "p50_ms": percentile(xs, 0.5), "p95_ms": percentile(xs, 0.95)}
        for what, xs in (
            ("schema -> grammar, cold", cold),
            ("schema -> grammar, cached", cached),
            ("llama.cpp grammar parse (per request)", parse),
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--compile-samples", type=int, default=40)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "structured.json"))
    args = parser.parse_args()
    daemon = EdgeDaemon(n_threads=args.threads, n_parallel=4, n_ctx=1024, max_queue=64)
    try:
        with daemon.http() as h:  # load it, and warm the grammar cache
            one(daemon, 0, "json schema", 16)
            h.get("/health")
        rows = throughput(daemon, args)
    finally:
        daemon.stop()
    print(f"{MODEL}, {args.threads} threads, 4 slots, {args.rounds} rounds")
    print(
        table(
            rows,
            [
                ("decoding", "decoding"),
                ("clients", "clients"),
                ("req_rate", "req tok/s"),
                ("req_x", "req ×free"),
                ("agg_rate", "agg tok/s"),
                ("agg_x", "agg ×free"),
                ("tokens", "tokens/req"),
                ("ttft_ms", "first byte p50 ms"),
            ],
        )
    )
    compiles = compile_times(args.compile_samples)
    print()
    print(table(compiles, [("step", "step"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms")]))
    Path(args.out).write_text(json.dumps({"throughput": rows, "compile": compiles}, indent=1))


if __name__ == "__main__":
    main()
