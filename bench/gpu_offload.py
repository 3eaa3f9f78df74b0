"""GPU offload: the default model through edgellm with every layer on the GPU vs on the CPU.

    # on a machine with an NVIDIA GPU and a CUDA build of llama-cpp-python:
    CMAKE_ARGS="-DGGML_CUDA=on" .venv/bin/pip install --force-reinstall llama-cpp-python
    .venv/bin/python bench/gpu_offload.py

Starts one daemon with `n_gpu_layers = 0` (the baseline, same run) and one with
`n_gpu_layers = -1`, checks that /api/ps reports where the model runs, streams
greedy completions of --max-tokens tokens at 1 and 8 clients, and reads the
governor's NVML readings (`gpu_*`) while the GPU daemon is busy. Prints a table whose
ratios are against the CPU daemon at the same number of clients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from batching import load_test, one_request  # noqa: E402
from common import MODEL, EdgeDaemon, table  # noqa: E402


def run_daemon(n_gpu_layers: int, args: argparse.Namespace) -> tuple[list[dict], dict]:
    daemon = EdgeDaemon(
        n_threads=args.threads, n_parallel=8, n_ctx=1024, max_queue=64, n_gpu_layers=n_gpu_layers
    )
    http = daemon.http
    try:
        with http() as h:
            h.post(f"/api/models/{MODEL}/load").raise_for_status()
            loaded = next(m for m in h.get("/api/ps").json()["models"] if m["name"] == MODEL)
            one_request(h, 0, 8, False, {})  # warm-up
        readings: dict[str, Any] = {}
        stop = threading.Event()

        def watch() -> None:  # the governor's view of the GPU while it works
            with http() as h:
                while not stop.wait(0.25):
                    for name, value in h.get("/api/governor").json()["readings"].items():
                        if name.startswith("gpu_") and isinstance(value, (int, float)):
                            readings[name] = max(value, readings.get(name, value))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        extra = {"stream_options": {"include_usage": True}}
        label = "gpu" if n_gpu_layers else "cpu"
        rows = [
            load_test(
                http,
                f"edgellm {label}",
                n,
                True,
                args.max_tokens,
                args.rounds,
                daemon.proc.pid,
                extra,
            )
            for n in args.clients
        ]
        stop.set()
        watcher.join()
        for row in rows:
            row["n_gpu_layers"] = n_gpu_layers
            row["reported"] = f"{loaded.get('device')}/{loaded.get('n_gpu_layers')}"
        return rows, readings
    finally:
        daemon.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--json", default="bench/results/gpu_offload.json")
    args = ap.parse_args()
    cpu, _ = run_daemon(0, args)
    gpu, readings = run_daemon(-1, args)
    base = {row["clients"]: row for row in cpu}
    for row in cpu + gpu:
        row["aggregate_x"] = row["aggregate_tps"] / base[row["clients"]]["aggregate_tps"]
        row["ttft_x"] = row["ttft_p50_ms"] / base[row["clients"]]["ttft_p50_ms"]
    cols = [
        ("system", "system"),
        ("reported", "device/layers"),
        ("clients", "clients"),
        ("aggregate_tps", "agg tok/s"),
        ("aggregate_x", "agg ×cpu"),
        ("per_request_tps", "req tok/s"),
        ("ttft_p50_ms", "TTFT p50 ms"),
        ("ttft_x", "TTFT ×cpu"),
        ("peak_rss_mb", "peak RSS MB"),
        ("tokens", "tokens/req"),
    ]
    print(
        f"model {MODEL}, {args.threads} threads, {args.max_tokens} tokens per request, "
        f"greedy, streamed; ratios against the CPU daemon in the same run\n"
    )
    print(table(cpu + gpu, cols))
    print(
        "\ngovernor readings from NVML while the GPU daemon worked (peaks):",
        json.dumps(readings) if readings else "none (is nvidia-ml-py installed?)",
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"rows": cpu + gpu, "gpu_readings": readings, "threads": args.threads}, indent=2)
    )
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
