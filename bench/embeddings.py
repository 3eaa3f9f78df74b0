"""Embeddings through the socket against onnxruntime called directly, FP32 and INT8.

    .venv/bin/python bench/embeddings.py          # about 3 minutes on 2 cores

The default embedding model (all-MiniLM-L6-v2, built and quantized as `edgellm
models pull` does) and its FP32 build, in one daemon. One sentence per request, as a
search query would be. For each: onnxruntime called directly in this process (same
threads, same graph optimization, one sentence per run: the baseline), edgellm with 1
client, edgellm with 8 concurrent clients (micro-batched), and onnxruntime directly on
batches of 8 (what batching could give at best). Ratios are against the direct
baseline of the same model, measured in the same run; the table also gives size and
INT8's cosine against FP32, and the CPU time each embedding cost: this process's for
onnxruntime directly; the daemon's and its clients' (in this process) through the
socket. On a device with few cores, CPU spent outside onnxruntime is taken from it.

    --providers CUDAExecutionProvider,CPUExecutionProvider   # a GPU, both sides
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from common import EdgeDaemon, percentile, table  # noqa: E402

from edgellm.catalog import Catalog, fetch, prepare  # noqa: E402
from edgellm.config import load_settings  # noqa: E402
from edgellm.runtime.onnx import bert, bundle  # noqa: E402

NAME = "all-minilm-l6-v2"
WORDS = [
    "the",
    "device",
    "keeps",
    "its",
    "models",
    "encrypted",
    "and",
    "answers",
    "local",
    "questions",
    "about",
    "sensors",
    "memory",
    "heat",
    "batteries",
    "cameras",
    "networks",
    "maintenance",
    "schedules",
    "for",
    "remote",
    "sites",
]


def sentences(n: int) -> list[str]:
    rng = np.random.default_rng(7)
    return [
        " ".join(rng.choice(WORDS, size=int(rng.integers(6, 24)))).capitalize() + "."
        for _ in range(n)
    ]


def bundles() -> dict[str, bytes]:
    settings = load_settings(environ={})
    manifest = Catalog().get(NAME)
    int8 = prepare(manifest, settings.cache_dir).read_bytes()
    work = fetch(manifest, settings.cache_dir).with_suffix(".files") / "work"
    return {"fp32": bundle.pack(bert.bundle_files(work)), "int8": int8}


def direct(
    data: bytes, threads: int, texts: list[str], batch: int, providers: list[str]
) -> dict[str, Any]:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    files = bundle.unpack(data)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as edgellm
    if hasattr(ort, "preload_dlls") and providers[0] != "CPUExecutionProvider":
        ort.preload_dlls()
    session = ort.InferenceSession(files[bundle.MODEL], options, providers=providers)
    assert session.get_providers()[0] == providers[0], session.get_providers()
    tok = Tokenizer.from_str(files[bundle.TOKENIZER].decode())
    tok.no_padding()
    tok.enable_truncation(256)

    def run(chunk: list[str]) -> np.ndarray:
        enc = tok.encode_batch(chunk)
        width = max(len(e.ids) for e in enc)
        ids = np.zeros((len(chunk), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, : len(e.ids)], mask[i, : len(e.ids)] = e.ids, 1
        return session.run(
            ["sentence_embedding"],
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
        )[0]

    run(texts[:batch])
    latencies, t0, cpu0 = [], time.perf_counter(), time.process_time()
    for i in range(0, len(texts), batch):
        s = time.perf_counter()
        run(texts[i : i + batch])
        latencies.append(time.perf_counter() - s)
    took = time.perf_counter() - t0
    return {
        "per_s": len(texts) / took,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "cpu_ms": (time.process_time() - cpu0) / len(texts) * 1000,
    }


def through_socket(
    daemon: EdgeDaemon, model: str, texts: list[str], clients: int
) -> dict[str, Any]:
    latencies: list[float] = []
    share = [texts[i::clients] for i in range(clients)]
    with daemon.http() as h:  # warm: loaded, first runs done
        for t in texts[:8]:
            h.post("/v1/embeddings", json={"model": model, "input": t}).raise_for_status()

    def client(mine: list[str]) -> None:
        with daemon.http() as h:
            for text in mine:
                s = time.perf_counter()
                r = h.post(
                    "/v1/embeddings",
                    json={"model": model, "input": text, "encoding_format": "base64"},
                )
                r.raise_for_status()
                latencies.append(time.perf_counter() - s)

    threads = [threading.Thread(target=client, args=(m,)) for m in share]
    server = psutil.Process(daemon.proc.pid)
    t0, cpu0, server0 = time.perf_counter(), time.process_time(), server.cpu_times()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    server1 = server.cpu_times()
    server_cpu = server1.user + server1.system - server0.user - server0.system
    return {
        "per_s": len(texts) / took,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "cpu_ms": (time.process_time() - cpu0 + server_cpu) / len(texts) * 1000,
        "daemon_cpu_ms": server_cpu / len(texts) * 1000,
    }


def cosine_int8_vs_fp32(daemon: EdgeDaemon, texts: list[str]) -> float:
    with daemon.http() as h:
        got = {
            m: np.array(
                [
                    d["embedding"]
                    for d in h.post("/v1/embeddings", json={"model": m, "input": texts}).json()[
                        "data"
                    ]
                ]
            )
            for m in (NAME, "minilm-fp32")
        }
    a, b = got[NAME], got["minilm-fp32"]
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--providers",
        default="CPUExecutionProvider",
        help="execution providers in order, comma-separated (both sides)",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "embeddings.json"))
    args = parser.parse_args()
    texts = sentences(args.requests)
    models = bundles()
    providers = args.providers.split(",")
    daemon = EdgeDaemon(names=(), n_threads=args.threads, max_queue=64, providers=providers)
    rows: list[dict[str, Any]] = []
    try:
        with daemon.http() as h:
            for label, name in (("int8", NAME), ("fp32", "minilm-fp32")):
                h.put(f"/api/models/{name}", content=models[label]).raise_for_status()
        for label, name in (("fp32", "minilm-fp32"), ("int8", NAME)):
            base = direct(models[label], args.threads, texts, 1, providers)
            size = len(models[label]) / 2**20
            cases = [
                ("onnxruntime direct, 1 per run", base),
                ("edgellm, 1 client", through_socket(daemon, name, texts, 1)),
                ("edgellm, 8 clients", through_socket(daemon, name, texts, 8)),
                (
                    "onnxruntime direct, 8 per run",
                    direct(models[label], args.threads, texts, 8, providers),
                ),
            ]
            for case, r in cases:
                rows.append(
                    {
                        "model": label,
                        "size_mb": size,
                        "case": case,
                        **r,
                        "ratio": r["per_s"] / base["per_s"],
                    }
                )
        with daemon.http() as h:
            ps = {m["name"]: m for m in h.get("/api/ps").json()["models"]}
        cos = cosine_int8_vs_fp32(daemon, texts[:64])
    finally:
        daemon.stop()
    print(
        table(
            rows,
            [
                ("model", "model"),
                ("size_mb", "MB"),
                ("case", "case"),
                ("per_s", "embeddings/s"),
                ("p50_ms", "p50 ms"),
                ("cpu_ms", "CPU ms/emb"),
                ("daemon_cpu_ms", "of it daemon"),
                ("ratio", "× direct 1"),
            ],
        )
    )
    one = {r["model"]: r["per_s"] for r in rows if r["case"] == "edgellm, 1 client"}
    eight = {r["model"]: r["per_s"] for r in rows if r["case"] == "edgellm, 8 clients"}
    for m in one:
        print(
            f"{m}: 8 clients / 1 client = {eight[m] / one[m]:.2f}×, mean batch "
            f"{ps[NAME if m == 'int8' else 'minilm-fp32']['mean_batch_size']}"
        )
    print(f"INT8 vs FP32, min cosine over 64 sentences: {cos:.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(f"providers: {ps[NAME]['providers']}")
    Path(args.out).write_text(
        json.dumps(
            {
                "rows": rows,
                "min_cosine_int8_fp32": cos,
                "threads": args.threads,
                "providers": ps[NAME]["providers"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
