"""Continuous batching: edgellm against llama-server, with llama-cpp-python direct as baseline.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/batching.py     # about 6 minutes on 2 cores, once llama-server is built

Every system runs the default model with the same threads, greedy, on a prompt that
keeps going (counting), streamed ``/v1/completions``, clients started together:
edgellm in both batching modes (``exact`` and ``fused``), and llama.cpp's C++ server
(``llama-server``, built once from the llama.cpp that llama-cpp-python vendors, so
both run the same llama.cpp; the build, about 15 minutes on 2 cores, is cached in
``~/.cache/edgellm-bench``; without a compiler the peer is left out, and the table
says so) with the same slots and context per slot. The systems take turns round by
round, so noise hits each alike (at 1 and 2 clients 4 and 2 times as many rounds: each
row has at least 4 × --rounds requests). llama-cpp-python called directly (one client,
no server) is the baseline for time to first token.

Printed: aggregate tokens/s against llama-server at the same concurrency and against
the system's own single client; the slowest stream against the mean; time to first
token (median and slowest); and edgellm's own account of its first token: when each
request reached each step (``timings.ttft_marks_ms`` of the stream's last chunk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import MODEL, EdgeDaemon, mean, model_file, percentile, table  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgellm-bench"


def prompt(i: int) -> str:
    return f"Counting, list {i}: 1, 2, 3, 4, 5,"


# --- the baseline: llama-cpp-python called directly, in a child that runs on request ---
def raw_child(threads: int, max_tokens: int) -> None:
    """Reads a request number per line, answers each with its timings as JSON."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(model_file()),
        n_ctx=1024,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    llm.create_completion(prompt(0), max_tokens=8, temperature=0)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        first, n = None, 0
        for chunk in llm.create_completion(
            prompt(int(line)),
            max_tokens=max_tokens,
            temperature=0,
            repeat_penalty=1.0,
            stream=True,
        ):
            if chunk["choices"][0]["text"]:
                first = first or time.perf_counter()
                n += 1
        print(json.dumps({"start": t0, "first": first, "end": time.perf_counter(), "tokens": n}))
        sys.stdout.flush()


class RawBaseline:
    def __init__(self, threads: int, max_tokens: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--raw", "--threads", str(threads)]
            + ["--max-tokens", str(max_tokens)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the llama-cpp-python baseline did not start")

    def run(self, i: int) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{i}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


# --- llama.cpp's own server ------------------------------------------------------------
def llama_server_binary() -> Path | None:
    """llama-server built from the llama.cpp inside llama-cpp-python's sdist (the
    version installed here), cached; None, with the reason printed, if it cannot be."""
    from importlib.metadata import version

    wanted = version("llama-cpp-python")
    binary = CACHE / f"llama-server-{wanted}" / "llama-server"
    if binary.exists():
        return binary
    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))):
        print("llama-server left out: building it needs cmake and a C++ compiler")
        return None
    print(f"building llama-server from llama-cpp-python {wanted}'s sdist (once, ~15 min)…")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
                + ["-q", "-d", str(work), f"llama-cpp-python=={wanted}"],
                check=True,
            )
            sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(work, filter="data")
            source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
            build = work / "build"
            subprocess.run(
                ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
                + ["-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DBUILD_SHARED_LIBS=OFF"]
                + ["-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            subprocess.run(
                ["cmake", "--build", str(build), "--target", "llama-server"]
                + ["-j", str(os.cpu_count() or 2)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        except (subprocess.CalledProcessError, StopIteration, OSError) as exc:
            print(f"llama-server left out: it did not build ({exc})")
            return None
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(next(build.rglob("llama-server")), binary)
    return binary


class LlamaServer:
    # llama-server reuses any common prefix of a slot's last prompt, token by token
    # (these prompts share their first words); edgellm reuses whole 256-token chunks
    # only, so none here: both evaluate every prompt token, as the baseline does
    extra = {"cache_prompt": False}

    def __init__(self, binary: Path, threads: int, slots: int, n_ctx: int) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="llama-server-"))
        self.socket = self.root / "llama.sock"
        self.proc = subprocess.Popen(
            [str(binary), "--model", str(model_file()), "--host", str(self.socket)]
            + ["-np", str(slots), "-c", str(slots * n_ctx), "-t", str(threads)]
            + ["-tb", str(threads), "--no-webui"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                with self.http() as h:
                    h.get("/health").raise_for_status()
                break
            except (httpx.HTTPError, OSError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("llama-server did not start") from None
                time.sleep(0.2)

    def http(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://llama-server",
            timeout=600,
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.root, ignore_errors=True)


# --- clients ------------------------------------------------------------------------------
def one_request(
    http: httpx.Client, i: int, max_tokens: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    body = {
        **(extra or {}),
        "model": MODEL,
        "prompt": prompt(i),
        "max_tokens": max_tokens,
        "temperature": 0,
        "repeat_penalty": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, n, usage, marks = None, 0, None, None
    with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if payload.get("usage"):
                usage = payload["usage"]["completion_tokens"]
                marks = (payload.get("timings") or {}).get("ttft_marks_ms")
            for choice in payload.get("choices") or []:
                if choice.get("text"):
                    first = first or time.perf_counter()
                    n += 1
    return {
        "start": t0,
        "first": first,
        "end": time.perf_counter(),
        "tokens": usage or n,
        "marks": marks,
    }


def one_round(system: Any, clients: int, first_id: int, max_tokens: int) -> list[dict[str, Any]]:
    if isinstance(system, RawBaseline):
        return [system.run(first_id)]
    out: list[dict[str, Any]] = []
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        with system.http() as http:
            barrier.wait()
            out.append(one_request(http, first_id + i, max_tokens, getattr(system, "extra", None)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def summarize(name: str, clients: int, rounds: list[list[dict[str, Any]]]) -> dict[str, Any]:
    every = [x for r in rounds for x in r]
    aggregates = [
        sum(x["tokens"] for x in r) / (max(x["end"] for x in r) - min(x["start"] for x in r))
        for r in rounds
    ]
    rates = [(x["tokens"] - 1) / (x["end"] - x["first"]) for x in every if x["first"]]
    ttfts = [(x["first"] - x["start"]) * 1000 for x in every if x["first"]]
    return {
        "system": name,
        "clients": clients,
        "aggregate_tps": mean(aggregates),
        "per_request_tps": mean(rates),
        "slowest_vs_mean": min(rates) / mean(rates),
        "ttft_p50_ms": percentile(ttfts, 0.5),
        "ttft_max_ms": max(ttfts),
        "tokens": sorted({int(x["tokens"]) for x in every}),
        "phases_ms": phases(every),
    }


PHASES = {  # name: (from, to) marks; the row's commit runs beside, from submitted
    "parse": ("received", "parsed"),
    "to engine": ("parsed", "admitted"),
    "tokenize": ("admitted", "tokenized"),
    "prefill": ("tokenized", "first_token"),
}


def phases(results: list[dict[str, Any]]) -> dict[str, float] | None:
    """Mean milliseconds of each step of edgellm's way to a first token: the fixed
    steps above; "row wait", how long the first token waited for its allow row to be
    durable (0 when the row was first); "write", from then to the first token's
    write; "client", the client's TTFT less edgellm's; and "(row commit)", the row's
    own commit, which runs beside the model."""
    spans: defaultdict[str, list[float]] = defaultdict(list)
    for x in results:
        m = x.get("marks")
        if not m or not x["first"] or "first_write" not in m:
            continue
        for name, (a, b) in PHASES.items():
            spans[name].append(m[b] - m[a])
        ready = max(m["first_token"], m["audited"])
        spans["row wait"].append(ready - m["first_token"])
        spans["write"].append(m["first_write"] - ready)
        spans["client"].append((x["first"] - x["start"]) * 1000 - m["first_write"])
        spans["(row commit)"].append(m["audited"] - m["submitted"])
    return {k: round(mean(v), 2) for k, v in spans.items()} or None


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
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=1024, help="context per slot")
    ap.add_argument("--json", default="bench/results/batching.json")
    ap.add_argument("--no-llama-server", action="store_true")
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw:  # the baseline runs in a child, so its memory and threads are its own
        raw_child(args.threads, args.max_tokens)
        return
    binary = None if args.no_llama_server else llama_server_binary()
    systems: dict[str, Any] = {
        "llama-cpp-python (direct)": RawBaseline(args.threads, args.max_tokens)
    }
    try:
        for mode in ("exact", "fused"):
            daemon = EdgeDaemon(
                n_threads=args.threads,
                n_parallel=args.slots,
                n_ctx=args.n_ctx,
                max_queue=64,
                batching=mode,
            )
            systems[f"edgellm {mode}"] = daemon
            with daemon.http() as h:
                h.post(f"/api/models/{MODEL}/load").raise_for_status()
                one_request(h, 0, 8)  # warm-up
        if binary is not None:
            systems["llama-server"] = LlamaServer(binary, args.threads, args.slots, args.n_ctx)
            with systems["llama-server"].http() as h:
                one_request(h, 0, 8)
        rows = run_all(systems, args)
    finally:
        for system in systems.values():
            system.stop()
    report(rows, prefix_reuse(args), args, binary is not None)


def run_all(systems: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for clients in args.clients:
        taking = {k: v for k, v in systems.items() if clients == 1 or "direct" not in k}
        rounds: dict[str, list[list[dict[str, Any]]]] = {k: [] for k in taking}
        # fewer clients, more rounds: at least 4 × rounds requests per system each time
        for r in range(args.rounds * max(1, 4 // clients)):
            order = list(taking)
            order = order[r % len(order) :] + order[: r % len(order)]  # each goes first in turn
            for name in order:
                rounds[name].append(
                    one_round(taking[name], clients, 1000 * r + 10 * clients, args.max_tokens)
                )
        rows += [summarize(name, clients, rounds[name]) for name in taking]
    return rows


def report(
    rows: list[dict[str, Any]], reuse: list[dict[str, Any]], args: argparse.Namespace, peer: bool
) -> None:
    raw = next(r for r in rows if "direct" in r["system"])
    single = {r["system"]: r["aggregate_tps"] for r in rows if r["clients"] == 1}
    by = {(r["system"], r["clients"]): r for r in rows}
    for row in rows:
        row["own_1_x"] = row["aggregate_tps"] / single[row["system"]]
        if peer and "direct" not in row["system"]:
            row["llama_server_x"] = (
                row["aggregate_tps"] / by[("llama-server", row["clients"])]["aggregate_tps"]
            )
        row["ttft_vs_direct_ms"] = row["ttft_p50_ms"] - raw["ttft_p50_ms"]
    print(
        f"\nmodel {MODEL}, {args.threads} threads, {args.slots} slots of {args.n_ctx} tokens, "
        f"{args.max_tokens} tokens per request, greedy, streamed, {args.rounds} rounds "
        "(×4 at 1 client, ×2 at 2) taken in turn\n"
    )
    print(
        table(
            rows,
            [
                ("system", "system"),
                ("clients", "clients"),
                ("aggregate_tps", "agg tok/s"),
                ("llama_server_x", "× llama-server"),
                ("own_1_x", "× own 1 client"),
                ("slowest_vs_mean", "slowest/mean"),
                ("ttft_p50_ms", "TTFT p50 ms"),
                ("ttft_vs_direct_ms", "p50 − direct ms"),
                ("ttft_max_ms", "TTFT max ms"),
                ("tokens", "tokens/req"),
            ],
        )
    )
    print(
        "\nedgellm's first token, step by step (mean ms; the client's share: "
        "its TTFT less edgellm's)\n"
    )
    steps = [*PHASES, "row wait", "write", "client", "(row commit)"]
    phase_rows = [
        {"system": r["system"], "clients": r["clients"], **r["phases_ms"]}
        for r in rows
        if r["phases_ms"]
    ]
    print(
        table(phase_rows, [("system", "system"), ("clients", "clients")] + [(s, s) for s in steps])
    )
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
        json.dumps({"rows": rows, "prefix_reuse": reuse, **vars(args)}, indent=2)
    )
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
