"""Dynamic INT8 quantization of an ONNX model or bundle (onnxruntime.quantization).

MatMul and Gemm weights become per-channel INT8; activations are quantized at run
time. onnxruntime's quantizer works on files (it writes the model to a temporary
directory to infer shapes), so it runs in a child process whose temporary directory
is RAM-backed (tmpfs): a model from the vault never reaches the disk in plaintext,
and the daemon's memory is not left holding the quantizer's garbage.

    python -m edgellm.runtime.onnx.quantize [--exclude NODE]… < model > quantized
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edgellm.errors import EdgeError, InvalidRequest, Unavailable
from edgellm.runtime.onnx import bundle

RAM_FILESYSTEMS = {"tmpfs", "ramfs"}


def ram_directory() -> Path:
    """A writable directory on a RAM-backed filesystem (raises Unavailable if none)."""
    mounts: dict[str, str] = {}
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mounts[parts[1]] = parts[2]
    candidates = [
        os.environ.get("XDG_RUNTIME_DIR", ""),
        os.environ.get("RUNTIME_DIRECTORY", ""),
        "/dev/shm",
        f"/run/user/{os.getuid()}",
    ]
    for c in filter(None, candidates):
        path = Path(c.split(":")[0])
        mount = max(
            (m for m in mounts if str(path).startswith(m.rstrip("/") + "/") or str(path) == m),
            key=len,
            default="/",
        )
        if mounts.get(mount) in RAM_FILESYSTEMS and os.access(path, os.W_OK):
            return path
    raise Unavailable(
        "quantizing needs a RAM-backed directory (tmpfs), so that the model's "
        "plaintext never reaches the disk; none is writable here (/dev/shm, "
        "$XDG_RUNTIME_DIR)"
    )


def quantize_files(source: Path, target: Path, exclude: list[str]) -> None:
    """Quantize one .onnx file into another (in this process)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process, every time
    quantize_dynamic(
        source, target, per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=exclude
    )


def quantize_bundle(data: bytes, exclude: list[str], workdir: Path | None = None) -> bytes:
    """The quantized bundle (same tokenizer and config) of a model or bundle."""
    files = bundle.unpack(data)
    with tempfile.TemporaryDirectory(prefix="edgellm-quant-", dir=workdir) as tmp:
        source, target = Path(tmp) / "model.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(files[bundle.MODEL])
        quantize_files(source, target, exclude)
        files[bundle.MODEL] = target.read_bytes()
    return bundle.pack(files)


def quantize_in_memory(data: bytes, exclude: list[str]) -> bytes:
    """``quantize_bundle`` in a child process whose temporary files live in RAM."""
    ram = ram_directory()
    args = [sys.executable, "-m", "edgellm.runtime.onnx.quantize"]
    for node in exclude:
        args += ["--exclude", node]
    proc = subprocess.run(
        args, input=data, capture_output=True, env={**os.environ, "TMPDIR": str(ram)}
    )
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines() or ["no output"]
        if proc.returncode == 2:  # the model itself was refused
            raise InvalidRequest(f"cannot quantize this model: {lines[-1]}")
        raise EdgeError(f"quantization failed: {lines[-1]}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--exclude", action="append", default=[], help="a node to leave in float (repeatable)"
    )
    args = parser.parse_args()
    try:
        out = quantize_bundle(
            sys.stdin.buffer.read(),
            args.exclude,
            Path(os.environ["TMPDIR"]) if "TMPDIR" in os.environ else None,
        )
    except InvalidRequest as exc:
        print(exc.message, file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.stdout.buffer.write(out)


if __name__ == "__main__":
    main()
