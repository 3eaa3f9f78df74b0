"""A BERT sentence-embedding model (e.g. all-MiniLM-L6-v2) as an ONNX graph, built
straight from its safetensors weights with ``onnx.helper`` — no torch, at build time
or at run time.

The graph takes ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64,
[batch, sequence]) and gives ``last_hidden_state`` [batch, sequence, hidden] and
``sentence_embedding`` [batch, hidden]: mean pooling over the mask, then L2
normalisation, as sentence-transformers' Pooling and Normalize modules do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.runtime.onnx import bundle

OPSET = 17  # LayerNormalization


def build(weights: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
    """An ``onnx.ModelProto`` for a BertModel's weights and config."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = hidden // heads
    eps = float(config.get("layer_norm_eps", 1e-12))
    nodes: list[Any] = []
    inits: list[Any] = []
    counter = [0]

    def name(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}_{counter[0]}"

    def const(value: Any, prefix: str = "c", dtype: Any = np.float32) -> str:
        n = name(prefix)
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), n))
        return n

    def weight(key: str, transpose: bool = False) -> str:
        array = weights[key].astype(np.float32)
        inits.append(
            numpy_helper.from_array(np.ascontiguousarray(array.T if transpose else array), key)
        )
        return key

    def op(kind: str, inputs: list[str], node: str | None = None, **attrs: Any) -> str:
        out = node or name(kind.lower())
        nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    def linear(x: str, prefix: str) -> str:
        # named after the weight, so a quantizer can be told which to leave alone
        return op(
            "Add",
            [
                op(
                    "MatMul",
                    [x, weight(f"{prefix}.weight", transpose=True)],
                    node=f"{prefix}.matmul",
                ),
                weight(f"{prefix}.bias"),
            ],
        )

    def layer_norm(x: str, prefix: str) -> str:
        return op(
            "LayerNormalization",
            [x, weight(f"{prefix}.weight"), weight(f"{prefix}.bias")],
            axis=-1,
            epsilon=eps,
        )

    # embeddings: words + positions (0..S-1) + token types, then LayerNorm
    seq_len = op("Gather", [op("Shape", ["input_ids"]), const(1, dtype=np.int64)], axis=0)
    positions = op("Range", [const(0, dtype=np.int64), seq_len, const(1, dtype=np.int64)])
    x = op(
        "Add",
        [
            op(
                "Add",
                [
                    op("Gather", [weight("embeddings.word_embeddings.weight"), "input_ids"]),
                    op("Gather", [weight("embeddings.position_embeddings.weight"), positions]),
                ],
            ),
            op("Gather", [weight("embeddings.token_type_embeddings.weight"), "token_type_ids"]),
        ],
    )
    x = layer_norm(x, "embeddings.LayerNorm")

    # the attention mask as an additive bias: 0 where attended, a large negative where not
    mask = op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    bias = op("Mul", [op("Sub", [const(1.0), mask]), const(-1e4)])
    bias = op("Unsqueeze", [bias, const([1, 2], dtype=np.int64)])  # [B, 1, 1, S]
    split_shape = const([0, 0, heads, head_dim], dtype=np.int64)
    merge_shape = const([0, 0, hidden], dtype=np.int64)
    scale = const(1.0 / math.sqrt(head_dim))

    for i in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{i}"

        def heads_of(t: str) -> str:  # [B, S, H] -> [B, heads, S, head_dim]
            return op("Transpose", [op("Reshape", [t, split_shape])], perm=[0, 2, 1, 3])

        q = heads_of(linear(x, f"{p}.attention.self.query"))
        k = heads_of(linear(x, f"{p}.attention.self.key"))
        v = heads_of(linear(x, f"{p}.attention.self.value"))
        scores = op(
            "Add",
            [op("Mul", [op("MatMul", [q, op("Transpose", [k], perm=[0, 1, 3, 2])]), scale]), bias],
        )
        context = op("MatMul", [op("Softmax", [scores], axis=-1), v])
        context = op("Reshape", [op("Transpose", [context], perm=[0, 2, 1, 3]), merge_shape])
        x = layer_norm(
            op("Add", [linear(context, f"{p}.attention.output.dense"), x]),
            f"{p}.attention.output.LayerNorm",
        )
        h = linear(x, f"{p}.intermediate.dense")
        # exact GELU: 0.5 x (1 + erf(x / sqrt 2))
        h = op(
            "Mul",
            [
                op("Mul", [h, const(0.5)]),
                op("Add", [op("Erf", [op("Div", [h, const(math.sqrt(2.0))])]), const(1.0)]),
            ],
        )
        x = layer_norm(op("Add", [linear(h, f"{p}.output.dense"), x]), f"{p}.output.LayerNorm")

    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))
    # mean pooling over the mask, then L2 normalisation
    weights_3d = op("Unsqueeze", [mask, const([2], dtype=np.int64)])  # [B, S, 1]
    summed = op("ReduceSum", [op("Mul", [x, weights_3d]), const([1], dtype=np.int64)], keepdims=0)
    count = op(
        "Max", [op("ReduceSum", [weights_3d, const([1], dtype=np.int64)], keepdims=0), const(1e-9)]
    )
    mean = op("Div", [summed, count])
    norm = op(
        "Max",
        [
            op("ReduceL2", [mean], axes=[1], keepdims=1),  # axes: an attribute
            const(1e-12),
        ],
    )
    nodes.append(helper.make_node("Div", [mean, norm], ["sentence_embedding"]))

    ids = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    outputs = [
        helper.make_tensor_value_info(
            "last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden]
        ),
        helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden]),
    ]
    graph = helper.make_graph(nodes, "bert_sentence_embedding", ids, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgellm"
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def bundle_files(directory: Path) -> dict[str, bytes]:
    """A sentence-transformers BERT model directory (model.safetensors, config.json,
    tokenizer.json, sentence_bert_config.json) as an FP32 ONNX bundle's files."""
    import onnx
    from safetensors.numpy import load_file

    weights = load_file(directory / "model.safetensors")
    weights = {k.removeprefix("bert."): v for k, v in weights.items()}
    config = json.loads((directory / "config.json").read_text())
    model = build(weights, config)
    model.graph.name = str(config.get("model_type", "bert"))
    onnx.helper.set_model_props(
        model, {"architecture": "bert", "built_by": "edgellm from safetensors"}
    )
    st = bundle.sentence_transformers_config(directory)
    st.update(output="sentence_embedding", pooling="none", normalize=False)  # in the graph
    return {
        bundle.MODEL: model.SerializeToString(),
        bundle.TOKENIZER: (directory / "tokenizer.json").read_bytes(),
        bundle.CONFIG: json.dumps(st).encode(),
    }
