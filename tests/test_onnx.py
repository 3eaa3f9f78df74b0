"""ONNX models through the socket: import (checked), signature, inference on JSON and
.npy tensors, every bad input's error, micro-batching, cancellation and deadlines,
embeddings (also through the openai SDK), quantization, the governor's thread limit,
and a dead engine, on real daemons with real onnxruntime and tiny real graphs."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_models
import pytest
from textual.widgets import DataTable

from edgellm.errors import EdgeError
from edgellm.tui.app import EdgeApp

from conftest import MODEL, Daemon, wait_for

BATCH_WAIT_MS = 400


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("onnx-models")
    (root / "affine.onnx").write_bytes(onnx_models.affine())
    (root / "spin.onnx").write_bytes(onnx_models.spin())
    embed = root / "tiny-embed"
    embed.mkdir()
    for name, data in onnx_models.tiny_embed_files().items():
        (embed / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def onnx_daemon(
    tmp_path_factory: pytest.TempPathFactory, model_file: Path, models_dir: Path
) -> Iterator[Daemon]:
    # room in the queue for the eight concurrent clients of the batching test, however
    # the scheduler spreads them (with the default 4 for tests, one could be refused)
    d = Daemon(
        tmp_path_factory.mktemp("onnx"),
        model_file,
        max_queue=8,
        model_settings={"affine-batched": {"batch_wait_ms": BATCH_WAIT_MS}},
    ).start()
    for name, path in [
        ("affine", "affine.onnx"),
        ("affine-batched", "affine.onnx"),
        ("spin", "spin.onnx"),
        ("tiny-embed", "tiny-embed"),
    ]:
        added = d.cli("models", "add", str(models_dir / path), "--name", name)
        assert added.returncode == 0, added.stderr
    yield d
    if d.alive():
        d.stop()


def error_of(response: Any) -> dict[str, Any]:
    return response.json()["error"]


# --- import, signature, inference -------------------------------------------------------
def test_models_add_describes_and_refuses_an_invalid_model(
    onnx_daemon: Daemon, tmp_path: Path
) -> None:
    with onnx_daemon.client() as c:
        models = {m["name"]: m for m in c.models()}
        assert models["affine"]["format"] == "onnx"
        assert models["affine"]["quantization"] == "fp32"
        assert models["tiny-embed"]["extra"]["task"] == "embedding"
        assert models["tiny-embed"]["n_embd"] == 4
        sig = c.onnx_model("affine")
    assert sig["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 3]}]
    assert [o["name"] for o in sig["outputs"]] == ["y", "total"]
    shown = onnx_daemon.cli("onnx", "show", "affine")
    assert shown.returncode == 0 and "x" in shown.stdout and "[batch, 3]" in shown.stdout

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(onnx_models.affine()[:-40])  # cut off: not a valid protobuf
    refused = onnx_daemon.cli("models", "add", str(broken))
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: broken is not a valid GGUF file or ONNX model")
    assert "Traceback" not in refused.stderr
    # and over the socket itself (curl's way), the same check, before anything is stored
    with onnx_daemon.http() as h:
        r = h.put("/api/models/broken", content=broken.read_bytes())
        assert r.status_code == 400
        assert "not a valid GGUF file or ONNX model" in error_of(r)["message"]
        assert h.get("/api/models/broken").status_code == 404
        assert h.get("/health").json()["status"] == "ready"


def test_infer_with_json_and_with_npy(onnx_daemon: Daemon, tmp_path: Path) -> None:
    x = np.array([[1, 2, 3], [-1, 0, 0.5]], dtype=np.float32)
    with onnx_daemon.http() as h:
        r = h.post("/api/onnx/affine/infer", json={"inputs": {"x": x.tolist()}})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"]
    assert out["y"]["dtype"] == "float32" and out["y"]["shape"] == [2, 3]
    np.testing.assert_allclose(out["y"]["data"], onnx_models.affine_expected(x), rtol=1e-6)
    np.testing.assert_allclose(
        out["total"]["data"], onnx_models.affine_expected(x).sum(1), rtol=1e-6
    )
    with onnx_daemon.client() as c:
        got = c.infer("affine", {"x": x}, outputs=["total"])
    assert list(got) == ["total"] and got["total"].dtype == np.float32
    np.testing.assert_allclose(got["total"], onnx_models.affine_expected(x).sum(1), rtol=1e-6)
    # the CLI, from and to .npy files
    np.save(tmp_path / "x.npy", x)
    ran = onnx_daemon.cli(
        "onnx",
        "run",
        "affine",
        "--input",
        f"x={tmp_path / 'x.npy'}",
        "--save",
        str(tmp_path / "out"),
    )
    assert ran.returncode == 0, ran.stderr
    np.testing.assert_allclose(
        np.load(tmp_path / "out" / "y.npy"), onnx_models.affine_expected(x), rtol=1e-6
    )


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"inputs": {"z": [[1, 2, 3]]}}, 400, "affine has no input 'z'; its inputs are x"),
        ({"inputs": {}}, 400, "missing input 'x' (float32 [batch, 3])"),
        (
            {"inputs": {"x": {"dtype": "float64", "data": [[1, 2, 3]]}}},
            400,
            "input 'x' is float64 but affine expects float32",
        ),
        (
            {"inputs": {"x": [1, 2, 3]}},
            400,
            "input 'x' has shape [3] but affine expects [batch, 3]",
        ),
        (
            {"inputs": {"x": [[1, 2, 3, 4]]}},
            400,
            "input 'x' has shape [1, 4] but affine expects [batch, 3]",
        ),
        (
            {"inputs": {"x": [[1, 2, 3], [4, 5]]}},
            400,
            "input 'x': data is not a rectangular nested list of float32 values",
        ),
        ({"inputs": {"x": [["a", "b", "c"]]}}, 400, "input 'x': data is not a rectangular"),
        ({"inputs": {"x": {"npy": "not base64!"}}}, 400, "input 'x': not a base64 .npy file"),
        (
            {"inputs": {"x": {"dtype": "complex512", "data": [1]}}},
            400,
            "input 'x': unknown dtype 'complex512'",
        ),
        (
            {"inputs": {"x": [[1, 2, 3]]}, "outputs": ["nope"]},
            400,
            "affine has no output 'nope'; its outputs are y, total",
        ),
        ({"inputs": {"x": [[1, 2, 3]]}, "extra": 1}, 400, "unknown field 'extra'"),
        ({"inputs": [1]}, 400, "invalid value for 'inputs'"),
    ],
)
def test_bad_tensors_get_a_400_naming_the_problem(
    onnx_daemon: Daemon, body: dict[str, Any], status: int, message: str
) -> None:
    with onnx_daemon.http() as h:
        r = h.post("/api/onnx/affine/infer", json=body)
        assert r.status_code == status
        assert error_of(r)["message"].startswith(message), error_of(r)["message"]
        # and the daemon keeps serving
        ok = h.post("/api/onnx/affine/infer", json={"inputs": {"x": [[0, 0, 0]]}})
        assert ok.status_code == 200 and ok.json()["outputs"]["y"]["data"] == [[1, -1, 0.5]]


def test_models_of_the_wrong_kind_are_refused(onnx_daemon: Daemon) -> None:
    with onnx_daemon.http() as h:
        r = h.post(f"/api/onnx/{MODEL}/infer", json={"inputs": {"x": [[1, 2, 3]]}})
        assert r.status_code == 400 and "only ONNX models take tensors" in error_of(r)["message"]
        r = h.post(
            "/v1/chat/completions",
            json={"model": "affine", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 400
        assert error_of(r)["message"].startswith("affine is an ONNX model")
        r = h.post("/v1/embeddings", json={"model": "affine", "input": "hi"})
        assert r.status_code == 400 and "is not an embedding model" in error_of(r)["message"]
        r = h.post("/v1/embeddings", json={"model": MODEL, "input": "hi"})
        assert r.status_code == 400
        assert f"{MODEL} is a GGUF model, which generates text" in error_of(r)["message"]
        r = h.get("/api/onnx/nope")
        assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"


# --- batching, cancellation, deadlines ----------------------------------------------------
def test_concurrent_requests_share_runs_and_each_gets_its_own_rows(onnx_daemon: Daemon) -> None:
    """affine-batched waits BATCH_WAIT_MS for company: eight clients at once share runs,
    and each gets exactly its own rows back (requests of 1 to 3 rows)."""
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        x = np.full((1 + i % 3, 3), i, dtype=np.float32)
        with onnx_daemon.client() as c:
            results[i] = (x, c.infer("affine-batched", {"x": x})["y"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(8))
    for x, y in results.values():
        np.testing.assert_allclose(y, onnx_models.affine_expected(x), rtol=1e-6)
    with onnx_daemon.client() as c:
        ps = next(m for m in c.ps() if m["name"] == "affine-batched")
    assert ps["format"] == "onnx" and ps["batching"] is True
    assert ps["runs"] < 8 and ps["mean_batch_size"] > 2  # 16 rows in fewer than 8 runs


def test_a_running_request_is_cancelled_and_a_late_one_stopped(onnx_daemon: Daemon) -> None:
    endless = {"inputs": {"steps": 10**12, "x": [0, 0]}}
    answer: dict[str, Any] = {}

    def run() -> None:
        with onnx_daemon.http() as h:
            answer["r"] = h.post("/api/onnx/spin/infer", json=endless)

    t = threading.Thread(target=run)
    t.start()
    with onnx_daemon.client() as c:
        running = wait_for(
            lambda: [r for r in c.requests() if r["model"] == "spin" and r["state"] == "running"],
            30,
        )
        c.cancel(running[0]["id"])
    t.join(30)
    assert answer["r"].status_code == 409
    assert error_of(answer["r"])["code"] == "request_cancelled"
    with onnx_daemon.http() as h:
        r = h.post("/api/onnx/spin/infer", json={**endless, "timeout": 1})
        assert r.status_code == 503 and error_of(r)["code"] == "deadline_exceeded"
        assert "took longer than its timeout (1s)" in error_of(r)["message"]
        r = h.post("/api/onnx/spin/infer", json={"inputs": {"steps": 5, "x": [1, 2]}})
        assert r.status_code == 200 and r.json()["outputs"]["y"]["data"] == [6, 7]


# --- embeddings ----------------------------------------------------------------------------
def test_embeddings_through_the_openai_sdk_and_the_cli(onnx_daemon: Daemon) -> None:
    import httpx
    import openai

    texts = ["edge device", "cold model warm", "hot hot unknownword"]
    sdk = openai.OpenAI(
        base_url="http://edgellm/v1",
        api_key="unused",
        http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(onnx_daemon.socket))),
    )
    got = sdk.embeddings.create(model="tiny-embed", input=texts)  # base64 on the wire
    floats = sdk.embeddings.create(model="tiny-embed", input=texts[0], encoding_format="float")
    for i, text in enumerate(texts):
        np.testing.assert_allclose(
            got.data[i].embedding, onnx_models.tiny_embed_expected(text), rtol=1e-5, atol=1e-6
        )
    assert floats.data[0].embedding == pytest.approx(got.data[0].embedding, abs=1e-6)
    assert got.usage.prompt_tokens == 8 and got.model == "tiny-embed"
    with onnx_daemon.http() as h:
        raw = h.post(
            "/v1/embeddings",
            json={"model": "tiny-embed", "input": ["edge"], "encoding_format": "base64"},
        ).json()
        vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
        np.testing.assert_allclose(vector, onnx_models.tiny_embed_expected("edge"), rtol=1e-6)
        for body, message in [
            ({"model": "tiny-embed", "input": []}, "input must hold 1 to"),
            ({"model": "tiny-embed", "input": [""]}, "empty strings"),
            ({"model": "tiny-embed", "input": [[1, 2]]}, "token ids"),
            (
                {"model": "tiny-embed", "input": "a", "dimensions": 2},
                "tiny-embed gives 4 dimensions",
            ),
        ]:
            r = h.post("/v1/embeddings", json=body)
            assert r.status_code == 400 and message in error_of(r)["message"], r.text
        r = h.post("/v1/embeddings", json={"input": "edge"})  # the default model: not pulled
        assert r.status_code == 404 and "all-minilm-l6-v2" in error_of(r)["message"]
    cli = onnx_daemon.cli("embed", "edge device", "--model", "tiny-embed")
    assert cli.returncode == 0, cli.stderr
    np.testing.assert_allclose(
        eval(cli.stdout), onnx_models.tiny_embed_expected("edge device"), atol=1e-5
    )


# --- the vault, quantization, the governor, failures ----------------------------------------
def test_quantize_stores_an_int8_model_with_no_plaintext_on_disk(onnx_daemon: Daemon) -> None:
    started = time.time()
    quantized = onnx_daemon.cli("models", "quantize", "affine", "--to", "affine-q")
    assert quantized.returncode == 0, quantized.stderr
    assert "quantized affine into affine-q" in quantized.stdout and "int8" in quantized.stdout
    x = np.array([[1, 2, 3], [0.5, -2, 1]], dtype=np.float32)
    with onnx_daemon.client() as c:
        assert c.model("affine-q")["quantization"] == "int8"
        y = c.infer("affine-q", {"x": x})["y"]
        np.testing.assert_allclose(y, onnx_models.affine_expected(x), atol=0.1)
        with pytest.raises(EdgeError, match="ONNX models take tensors"):
            c.quantize(MODEL)
    # neither the model nor its quantized copy was written anywhere in plaintext
    needles = [onnx_models.W.tobytes()]
    written = [
        p
        for root in (Path("/tmp"), Path("/var/tmp"), onnx_daemon.state_dir)
        for p in root.rglob("*")
        if p.is_file() and p.stat().st_mtime >= started
    ]
    assert [p for p in written if needles[0] in p.read_bytes()] == []
    fds = [
        str(p.readlink())
        for p in Path(f"/proc/{onnx_daemon.proc.pid}/fd").iterdir()
        if onnx_daemon.proc
    ]
    assert "/memfd:edgellm:affine-q (deleted)" in fds  # loaded from sealed memory


def test_the_governor_lowers_threads_with_a_new_session(make_daemon: Any, models_dir: Path) -> None:
    from edgellm.config import load_settings
    from edgellm.runtime.manager import Runtime
    from edgellm.runtime.types import Limits, Result, TensorRequest
    from edgellm.vault.keys import create_key_file
    from edgellm.vault.store import VaultStore

    root = models_dir.parent / "threads"
    store = VaultStore.create(root / "vault", create_key_file(root / "vault.key"))
    store.add_file(models_dir / "affine.onnx", "affine")
    rt = Runtime(load_settings(overrides={"n_threads": 2}, environ={}), store)
    try:
        rt.load("affine")
        assert rt.loaded()[0].n_threads == 2

        def run() -> Any:
            done: list[Any] = []
            x = np.ones((1, 3), dtype=np.float32)
            rt.submit(TensorRequest(model="affine", sink=done.append, inputs={"x": x}))
            wait_for(lambda: done, 10)
            assert isinstance(done[0], Result), done
            return done[0].outputs["y"]

        run()
        rt.apply_limits(Limits(thread_fraction=0.5))
        np.testing.assert_allclose(run(), onnx_models.affine_expected(np.ones((1, 3))), rtol=1e-6)
        engine = rt._loaded["affine"].engine
        assert engine._applied_threads == 1 and rt.loaded()[0].n_threads == 1
        assert engine._session.get_session_options().intra_op_num_threads == 1
    finally:
        rt.close()


def test_a_dead_onnx_engine_fails_its_request_and_is_reloaded(
    make_daemon: Any, models_dir: Path
) -> None:
    d: Daemon = make_daemon(env={"EDGELLM_FAILPOINTS": "engine.onnx_run=raise@1"})
    assert d.cli("models", "add", str(models_dir / "affine.onnx")).returncode == 0
    body = {"inputs": {"x": [[0, 0, 0]]}}
    with d.http() as h:
        assert h.post("/api/onnx/affine/infer", json=body).status_code == 200
        r = h.post("/api/onnx/affine/infer", json=body)
        assert r.status_code == 503 and error_of(r)["code"] == "engine_failed"
        assert "failpoint engine.onnx_run fired" in error_of(r)["message"]
        r = h.post("/api/onnx/affine/infer", json=body)  # reloaded at once
        assert r.status_code == 200 and r.json()["outputs"]["y"]["data"] == [[1, -1, 0.5]]


@pytest.mark.parametrize("named", [True, False])
# the CPU build's warning that it has no CUDA provider: only the simulated list claims one
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_a_gpu_provider_that_does_not_start_is_not_passed_off_as_running(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, named: bool
) -> None:
    """onnxruntime-gpu without working CUDA libraries lists CUDA as available, then runs
    on the CPU without a word. Only the list is simulated here (there is no GPU build
    on this machine); the session and its fallback are onnxruntime's own."""
    import onnxruntime as ort

    from edgellm.config import ModelSettings
    from edgellm.errors import ModelLoadFailed
    from edgellm.runtime.onnx.engine import OnnxEngine
    from edgellm.runtime.source import ModelRecord

    cpu_only = ort.get_available_providers()
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *cpu_only]
    )
    record = ModelRecord(name="affine", format="onnx", sha256="", size=0)
    settings = ModelSettings(
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"] if named else []
    )
    engine = OnnxEngine(record, "/dev/null", settings)
    if named:
        with pytest.raises(ModelLoadFailed, match="CUDAExecutionProvider did not start"):
            engine._build(onnx_models.affine(), 1)
    else:
        session = engine._build(onnx_models.affine(), 1)
        assert engine.providers == ["CPUExecutionProvider"] and not engine.gpu_offload
        assert "providers_dropped" in caplog.text and "CUDAExecutionProvider" in caplog.text
        x = np.ones((2, 3), dtype=np.float32)
        assert np.allclose(session.run(None, {"x": x})[0], onnx_models.affine_expected(x))


def test_every_tensor_request_is_audited_and_none_is_served_unaudited(onnx_daemon: Daemon) -> None:
    """The allow row is committed while the model runs and the outcome row after the
    answer; a reader of the log sees both at once, in order. If the allow row cannot
    be written, the answer is withheld (503), and the daemon serves once it can."""
    import sqlite3

    with onnx_daemon.http() as h:
        ok = h.post("/v1/embeddings", json={"model": "tiny-embed", "input": "edge device"})
        assert ok.status_code == 200
        rid = ok.headers["X-Request-Id"]
        rows = [r for r in h.get("/api/audit").json()["rows"] if r["request_id"] == rid]
        assert [(r["decision"], r["status"]) for r in rows] == [("allow", None), ("outcome", 200)]
        assert rows[0]["seq"] < rows[1]["seq"] and rows[1]["prompt_tokens"] == 2
        assert rows[0]["action"] == "models.use" and rows[0]["resource"] == "tiny-embed"
        assert rows[0]["exe"] and rows[0]["prompt_hmac"]  # who, and a keyed hash of what
        blocker = sqlite3.connect(
            onnx_daemon.state_dir / "vault" / "audit.db", isolation_level=None
        )
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            refused = h.post("/api/onnx/affine/infer", json={"inputs": {"x": [[1, 2, 3]]}})
            assert refused.status_code == 503 and "Retry-After" in refused.headers
            assert "audit log cannot be written" in error_of(refused)["message"]
            assert "outputs" not in refused.json()
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        again = h.post("/api/onnx/affine/infer", json={"inputs": {"x": [[1, 2, 3]]}})
        assert again.status_code == 200
        np.testing.assert_allclose(
            again.json()["outputs"]["y"]["data"],
            onnx_models.affine_expected(np.array([[1, 2, 3]], dtype=np.float32)),
        )
        assert h.get("/api/audit/verify").json()["ok"] is True


def test_metrics_and_the_dashboard_with_an_onnx_model_loaded(onnx_daemon: Daemon) -> None:
    """Both read the one rate field every engine has: with an ONNX model loaded they
    failed on a key only the llama engine set (KeyError: 'tokens_per_second')."""
    with onnx_daemon.client() as c:
        c.infer("affine", {"x": np.ones((2, 3), dtype=np.float32)})
        c.chat([{"role": "user", "content": "Hi"}], max_tokens=2)  # and a GGUF model beside it
        metrics = c.metrics()  # was a 500
        shown = {m["name"]: m for m in c.ps()}
        assert shown["affine"]["rate_unit"] == "rows" and shown[MODEL]["rate_unit"] == "tokens"
    assert 'edgellm_rows_per_second{model="affine"}' in metrics
    assert f'edgellm_tokens_per_second{{model="{MODEL}"}}' in metrics
    app = EdgeApp(onnx_daemon.socket)

    async def main() -> list[str]:
        async with app.run_test(size=(120, 30)) as pilot:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                table = app.query_one("#loaded", DataTable)
                names = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
                if "affine" in names:
                    return [str(c) for c in table.get_row_at(names.index("affine"))]
                await pilot.pause(0.1)
        raise AssertionError("the dashboard did not show the ONNX model")

    row = asyncio.run(main())
    assert row[0] == "affine" and row[3].endswith("rows/s")
    assert onnx_daemon.alive()
