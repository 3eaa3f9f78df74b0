"""Continuous batching: edgellm against raw llama-cpp-python and llama-cpp-python's server.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/batching.py            # about 6 minutes on 2 cores

All three run the default model with the same thread count, greedy, on a prompt
that keeps going (counting), so every request generates exactly --max-tokens
tokens (checked). Prints a table whose ratios are against raw llama-cpp-python
measured in the same run, and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import MODEL, EdgeDaemon, PeakRSS, mean, model_file, percentile, table  # noqa: E402


def prompt(i: int) -> str:
    return f"Counting, list {i}: 1, 2, 3, 4, 5,"


# --- the baseline: llama-cpp-python called directly, no server ---------------------------
def raw_baseline(threads: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(model_file()),
        n_ctx=2048,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    llm.create_completion(prompt(0), max_tokens=8, temperature=0)  # warm-up
    ttfts, rates, totals, counts = [], [], [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        first, n = None, 0
        for chunk in llm.create_completion(
            prompt(r + 1), max_tokens=max_tokens, temperature=0, repeat_penalty=1.0, stream=True
        ):
            if first is None:
                first = time.perf_counter()
            n += 1 if chunk["choices"][0]["text"] else 0
        end = time.perf_counter()
        ttfts.append(first - t0)
        rates.append((n - 1) / (end - first))
        totals.append(n / (end - t0))
        counts.append(n)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    return {
        "system": "llama-cpp-python (direct)",
        "clients": 1,
        "stream": True,
        "aggregate_tps": mean(totals),
        "per_request_tps": mean(rates),
        "slowest_tps": min(rates),
        "ttft_p50_ms": percentile(ttfts, 0.5) * 1000,
        "ttft_p95_ms": percentile(ttfts, 0.95) * 1000,
        "peak_rss_mb": hwm,
        "tokens": counts,
    }


# --- clients over HTTP ----------------------------------------------------------------------
def one_request(
    http: httpx.Client, i: int, max_tokens: int, stream: bool, extra: dict[str, Any]
) -> dict[str, float]:
    body = {
        "model": MODEL,
        "prompt": prompt(i),
        "max_tokens": max_tokens,
        "temperature": 0,
        "repeat_penalty": 1.0,
        "stream": stream,
        **extra,
    }
    t0 = time.perf_counter()
    if not stream:
        data = http.post("/v1/completions", json=body).json()
        end = time.perf_counter()
        n = data["usage"]["completion_tokens"]
        return {"start": t0, "end": end, "first": None, "tokens": n, "tps": n / (end - t0)}
    first, n, usage = None, 0, None
    with http.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if payload.get("usage"):
                usage = payload["usage"]["completion_tokens"]
            for choice in payload.get("choices", []):
                if choice.get("text"):
                    first = first or time.perf_counter()
                    n += 1
    end = time.perf_counter()
    n = usage or n
    return {
        "start": t0,
        "end": end,
        "first": first,
        "tokens": n,
        "tps": (n - 1) / (end - first) if first and n > 1 else 0.0,
    }


def load_test(
    make_http: Any,
    system: str,
    clients: int,
    stream: bool,
    max_tokens: int,
    rounds: int,
    pid: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    results: list[dict[str, float]] = []
    walls: list[float] = []
    rss = PeakRSS(pid)
    for r in range(rounds):
        batch: list[dict[str, float]] = []

        def client(i: int, batch: list[dict[str, float]] = batch, r: int = r) -> None:
            with make_http() as http:
                batch.append(one_request(http, r * 100 + i, max_tokens, stream, extra))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        walls.append(sum(x["tokens"] for x in batch) / (time.perf_counter() - t0))
        results += batch
    ttfts = [x["first"] - x["start"] for x in results if x["first"]]
    rates = [x["tps"] for x in results]
    return {
        "system": system,
        "clients": clients,
        "stream": stream,
        "aggregate_tps": mean(walls),
        "per_request_tps": mean(rates),
        "slowest_tps": min(rates),
        "ttft_p50_ms": percentile(ttfts, 0.5) * 1000 if ttfts else None,
        "ttft_p95_ms": percentile(ttfts, 0.95) * 1000 if ttfts else None,
        "peak_rss_mb": rss.stop(),
        "tokens": sorted({int(x["tokens"]) for x in results}),
    }


def edgellm_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    daemon = EdgeDaemon(n_threads=args.threads, n_parallel=8, n_ctx=1024, max_queue=64)
    try:
        http = daemon.http
        with http() as h:
            h.post(f"/api/models/{MODEL}/load").raise_for_status()
            one_request(h, 0, 8, False, {})  # warm-up
        extra = {"stream_options": {"include_usage": True}}
        return [
            load_test(
                http,
                "edgellm",
                n,
                stream,
                args.max_tokens,
                args.rounds,
                daemon.proc.pid,
                extra if stream else {},
            )
            for n in args.clients
            for stream in (True, False)
        ]
    finally:
        daemon.stop()


def peer_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model_file()),
            "--n_threads",
            str(args.threads),
            "--n_threads_batch",
            str(args.threads),
            "--n_ctx",
            "2048",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            # by default it aborts a running request when another arrives
            "--interrupt_requests",
            "False",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{base}/v1/models", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("llama-cpp-python's server did not start") from None
                time.sleep(0.2)

        def http() -> httpx.Client:
            return httpx.Client(base_url=base, timeout=600)

        with http() as h:
            one_request(h, 0, 8, False, {})
        return [
            load_test(
                http, "llama-cpp-python server", n, True, args.max_tokens, args.rounds, proc.pid, {}
            )
            for n in args.clients
        ]
    finally:
        proc.terminate()
        proc.wait(30)


def prefix_reuse(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time to first token with a long shared system prompt, with and without reuse."""
    system = "You are the assistant of a weather station high on a mountain. " * 60
    out = []
    for enabled in (False, True):
        daemon = EdgeDaemon(n_threads=args.threads, n_parallel=2, n_ctx=2048, prefix_cache=enabled)
        try:
            with daemon.http() as h:
                ttfts = []
                for i in range(6):
                    body = {
                        "messages": [
                            {"role": "system", "content": system},
                            {"role": "user", "content": f"Question {i}: wind?"},
                        ],
                        "max_tokens": 4,
                        "stream": True,
                    }
                    t0 = time.perf_counter()
                    first = None
                    with h.stream("POST", "/v1/chat/completions", json=body) as r:
                        for line in r.iter_lines():
                            if (
                                first is None
                                and '"content":"' in line
                                and '"content":""' not in line
                            ):
                                first = time.perf_counter() - t0
                    ttfts.append(first)
                warm = ttfts[1:]  # the first request fills the cache in both cases
                out.append(
                    {
                        "prefix_cache": enabled,
                        "prompt": "~800-token system prompt",
                        "ttft_p50_ms": percentile(warm, 0.5) * 1000,
                        "ttft_p95_ms": percentile(warm, 0.95) * 1000,
                    }
                )
        finally:
            daemon.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--json", default="bench/results/batching.json")
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw:  # the baseline runs in a child, so its memory is its own
        print(json.dumps(raw_baseline(args.threads, args.max_tokens, args.rounds + 1)))
        return
    raw = json.loads(
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--raw",
                "--threads",
                str(args.threads),
                "--max-tokens",
                str(args.max_tokens),
                "--rounds",
                str(args.rounds),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    rows = [raw] + edgellm_runs(args) + peer_runs(args)
    for row in rows:
        row["aggregate_x"] = row["aggregate_tps"] / raw["aggregate_tps"]
        row["per_request_x"] = row["per_request_tps"] / raw["per_request_tps"]
        if row.get("ttft_p50_ms") is not None:
            row["ttft_p50_delta_ms"] = row["ttft_p50_ms"] - raw["ttft_p50_ms"]
    reuse = prefix_reuse(args)
    cols = [
        ("system", "system"),
        ("clients", "clients"),
        ("stream", "stream"),
        ("aggregate_tps", "agg tok/s"),
        ("aggregate_x", "agg ×raw"),
        ("per_request_tps", "req tok/s"),
        ("per_request_x", "req ×raw"),
        ("slowest_tps", "slowest"),
        ("ttft_p50_ms", "TTFT p50 ms"),
        ("ttft_p50_delta_ms", "Δ raw ms"),
        ("ttft_p95_ms", "TTFT p95 ms"),
        ("peak_rss_mb", "peak RSS MB"),
        ("tokens", "tokens/req"),
    ]
    print(
        f"model {MODEL}, {args.threads} threads, {args.max_tokens} tokens per request, "
        f"greedy; ratios against llama-cpp-python called directly, same run\n"
    )
    print(table(rows, cols))
    print("\nprefix reuse (edgellm, 1 client, time to first token of warm requests)\n")
    print(
        table(
            reuse,
            [
                ("prefix_cache", "prefix cache"),
                ("prompt", "prompt"),
                ("ttft_p50_ms", "TTFT p50 ms"),
                ("ttft_p95_ms", "TTFT p95 ms"),
            ],
        )
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "rows": rows,
                "prefix_reuse": reuse,
                "threads": args.threads,
                "max_tokens": args.max_tokens,
            },
            indent=2,
        )
    )
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
