"""Tiny ONNX models built with onnx.helper, for the tests (and their expected answers).

- ``affine``: y = x @ W + b and its row sums, x float32 [batch, 3]: batchable, and a
  MatMul for the quantizer.
- ``spin``: a Loop that adds 1 to x ``steps`` times: as slow as asked, to cancel.
- ``tiny-embed``: a bundle with a word-level tokenizer and a lookup table: the
  engine mean-pools and normalizes its token vectors (edgellm.json says so).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgellm.runtime.onnx import bundle

W = np.array([[2, 0, 0], [0, 2, 0], [0, 0, 2]], dtype=np.float32) + 0.25
B = np.array([1, -1, 0.5], dtype=np.float32)
VOCAB = ["[PAD]", "[UNK]", "edge", "device", "model", "cold", "hot", "warm"]
TABLE = np.arange(len(VOCAB) * 4, dtype=np.float32).reshape(len(VOCAB), 4) % 7 - 3


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def affine() -> bytes:
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"], name="project"),
            helper.make_node("Add", ["xw", "B"], ["y"]),
            helper.make_node("ReduceSum", ["y", "axis"], ["total"], keepdims=0),
        ],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"]),
        ],
        [
            numpy_helper.from_array(W, "W"),
            numpy_helper.from_array(B, "B"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"),
        ],
    )
    return _model(graph)


def affine_expected(x: np.ndarray) -> np.ndarray:
    return x @ W + B


def spin() -> bytes:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [2]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["steps", "", "x"], ["y"], body=body)],
        "spin",
        [
            helper.make_tensor_value_info("steps", TensorProto.INT64, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return _model(graph)


def tiny_embed_files() -> dict[str, bytes]:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["token_vectors"])],
        "tiny_embed",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("token_vectors", TensorProto.FLOAT, ["batch", "seq", 4])],
        [numpy_helper.from_array(TABLE, "table")],
    )
    # attention_mask is an input the graph does not read: keep it for the engine to feed
    config = {
        "task": "embedding",
        "output": "token_vectors",
        "pooling": "mean",
        "normalize": True,
        "max_length": 16,
    }
    return {
        bundle.MODEL: _model(graph),
        bundle.TOKENIZER: tok.to_str().encode(),
        bundle.CONFIG: json.dumps(config).encode(),
    }


def tiny_embed_expected(text: str) -> np.ndarray:
    ids = [VOCAB.index(w) if w in VOCAB else 1 for w in text.split()][:16]
    v = TABLE[ids].mean(0)
    return v / np.linalg.norm(v)
