"""all-MiniLM-L6-v2 in plain numpy (float64), written apart from the ONNX graph that
edgellm builds, to check that graph against: normalised mean-pooled sentence
embeddings [batch, hidden] from the same safetensors weights."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def reference(
    weights: dict[str, np.ndarray],
    config: dict[str, Any],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
) -> np.ndarray:
    """The same model in plain numpy (float64), written apart from the graph, to check
    the graph against: normalised mean-pooled sentence embeddings [batch, hidden]."""
    w = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype != np.int64}
    heads = int(config["num_attention_heads"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    erf = np.vectorize(math.erf)

    def norm(x: np.ndarray, p: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[f"{p}.weight"] + w[f"{p}.bias"]

    def dense(x: np.ndarray, p: str) -> np.ndarray:
        return x @ w[f"{p}.weight"].T + w[f"{p}.bias"]

    batch, seq = input_ids.shape
    x = (
        w["embeddings.word_embeddings.weight"][input_ids]
        + w["embeddings.position_embeddings.weight"][np.arange(seq)][None]
        + w["embeddings.token_type_embeddings.weight"][np.zeros_like(input_ids)]
    )
    x = norm(x, "embeddings.LayerNorm")
    keep = attention_mask.astype(np.float64)
    for i in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{i}"
        parts = [
            dense(x, f"{p}.attention.self.{n}").reshape(batch, seq, heads, -1).transpose(0, 2, 1, 3)
            for n in ("query", "key", "value")
        ]
        q, k, v = parts
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
        scores = np.where(keep[:, None, None, :] > 0, scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = scores / scores.sum(-1, keepdims=True)
        ctx = (attn @ v).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        x = norm(dense(ctx, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        h = dense(x, f"{p}.intermediate.dense")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = norm(dense(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    pooled = (x * keep[..., None]).sum(1) / keep.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
