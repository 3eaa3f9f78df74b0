"""The models on the device, and the requests in flight."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edgellm.cli.base import (
    client,
    daemon_or_none,
    emit,
    friendly,
    json_option,
    key_file_option,
    load_settings,
    main,
    offline_store,
    socket_option,
    state_dir_option,
    table,
)


@main.group()
def models() -> None:
    """The models on this device, and the catalog."""


@models.command("list")
@socket_option
@state_dir_option
@key_file_option
@json_option
@friendly
def models_list(
    socket: str | None, state_dir: str | None, as_json: bool, key_file: str | None = None
) -> None:
    """Models on the device, then catalog models not pulled yet."""
    from edgellm.catalog import Catalog

    c = daemon_or_none(socket)
    if c is not None:
        with c:
            rows = c.models()
    else:
        offline = offline_store(state_dir, key_file)
        rows = [{**r.as_dict(), "state": "offline"} for r in offline.list()]
    have = {r["name"] for r in rows}
    catalog = [m for m in Catalog().list() if m.name not in have]
    data = {"models": rows, "catalog": [vars(m) for m in catalog]}

    def human(d: dict[str, Any]) -> None:
        table(
            [
                [
                    r["name"],
                    r["format"],
                    r["quantization"],
                    f"{r['size'] / 2**20:.0f} MB",
                    r["state"],
                ]
                for r in d["models"]
            ],
            ["NAME", "FORMAT", "QUANT", "SIZE", "STATE"],
        )
        for m in catalog:
            click.echo(f"{m.name} (in the catalog: `edgellm models pull {m.name}`)")

    emit(data, as_json, human)


@models.command("show")
@click.argument("name")
@socket_option
@friendly
def models_show(name: str, socket: str | None) -> None:
    """Everything known about one model (a catalog model not pulled yet, too)."""
    from edgellm.catalog import Catalog
    from edgellm.errors import ModelNotFound

    with client(socket) as c:
        try:
            shown = c.model(name)
        except ModelNotFound:
            try:
                manifest = Catalog().get(name)
            except ModelNotFound:
                raise ModelNotFound(
                    f"no model named {name!r} on the device or in the catalog "
                    "(`edgellm models list` shows both)"
                ) from None
            shown = {**vars(manifest), "state": f"not pulled: `edgellm models pull {name}`"}
    click.echo(json.dumps(shown, indent=2))


def _up_to_date(name: str, manifest: Any, stored: dict[str, Any], verify: Any) -> str:
    """What ``pull`` says of a model already stored: it is the catalog's and its bytes
    authenticate (up to date), or why it is not."""
    from edgellm.errors import Conflict, IntegrityError

    same = (
        stored.get("source") == manifest.stored_source()
        if manifest.convert
        else stored.get("sha256") == manifest.sha256
    )
    if not same:
        raise Conflict(
            f"{name} is stored but is not the catalog's {name} (stored sha256 "
            f"{str(stored.get('sha256'))[:12]}…, source {stored.get('source') or '?'}); "
            f"remove it first (`edgellm models rm {name}`) to pull the catalog's"
        )
    bad = verify(name)
    if bad:
        raise IntegrityError(
            f"{name} is stored but fails verification ({bad[0]}); remove it "
            f"(`edgellm models rm {name}`) and pull it again"
        )
    return (
        f"{name} is up to date (sha256 {manifest.sha256[:12]}… as in the catalog; "
        f"its {stored.get('size', 0) / 2**20:.0f} MB in the vault authenticate)"
    )


@models.command("pull")
@click.argument("name")
@socket_option
@state_dir_option
@key_file_option
@friendly
def models_pull(
    name: str, socket: str | None, state_dir: str | None, key_file: str | None = None
) -> None:
    """Fetch a catalog model, check its sha256 and store it (building it first if its
    manifest says how, e.g. an ONNX graph from safetensors, quantized to INT8). A model
    already stored is verified instead: pulling it again says it is up to date.
    Progress shows as a bar on a terminal, as lines otherwise."""
    from edgellm import progress
    from edgellm.catalog import Catalog, prepare, send_pulled, store_pulled
    from edgellm.errors import ModelNotFound

    settings = load_settings(overrides={"state_dir": state_dir})
    manifest = Catalog(settings.catalog_dir).get(name)
    c = daemon_or_none(socket)
    offline: Any = None if c is not None else offline_store(state_dir, key_file)
    try:
        stored = c.model(name) if c is not None else offline.get(name).as_dict()
    except ModelNotFound:
        stored = None
    if stored is not None:

        def verify(model: str) -> list[str]:
            if c is not None:
                return [b["problem"] for b in c.vault_verify(model)["bad"]]
            return [problem for _, problem in offline.verify(model)]

        click.echo(_up_to_date(name, manifest, stored, verify))
        return
    click.echo(
        f"pulling {name} from {manifest.describe_source()} ({manifest.size / 2**20:.0f} MB)",
        err=True,
    )
    with progress.shown(f"{name}") as report:
        path = prepare(manifest, settings.cache_dir, report)
        if c is not None:
            with c:
                send_pulled(c, manifest, path, report)
        else:
            store_pulled(offline, manifest, path, report)
    click.echo(f"pulled {name} (sha256 {manifest.sha256[:12]}… verified)")


@models.command("add")
@click.argument("path", type=click.Path(exists=True))
@click.option("--name", help="Name to store it under (default: from the file name).")
@socket_option
@state_dir_option
@key_file_option
@friendly
def models_add(
    path: str,
    name: str | None,
    socket: str | None,
    state_dir: str | None,
    key_file: str | None = None,
) -> None:
    """Add a local model: a GGUF file, an .onnx file, or a directory holding model.onnx
    (with tokenizer.json and edgellm.json, or a sentence-transformers layout). Each is
    checked before anything is stored."""
    from edgellm.runtime.source import check_name

    where = Path(path)
    name = check_name(name or where.stem.lower().replace(" ", "-"))
    if where.is_dir() or where.suffix == ".onnx":
        from edgellm.runtime.onnx import bundle

        files = (
            bundle.from_directory(where) if where.is_dir() else {bundle.MODEL: where.read_bytes()}
        )
        data = bundle.pack(files)
        info = bundle.describe(data, name)  # refuse an invalid model before sending it
        summary = (
            f"onnx, {info['quantization']}, inputs "
            f"{', '.join(i['name'] for i in info['extra']['inputs'])}"
        )
    else:
        from edgellm.runtime.gguf_meta import read_gguf_metadata

        meta = read_gguf_metadata(path)  # refuse a non-GGUF file before sending a byte
        data = None
        summary = (
            f"{meta['architecture']}, {meta['quantization']}, context {meta['context_length']}"
        )
    from edgellm import progress

    c = daemon_or_none(socket)
    with progress.shown(name) as report:
        if c is not None:
            with c:
                c.import_model(name, path, source=f"file:{where.name}", report=report)
        else:
            store = offline_store(state_dir, key_file)
            if data is not None:
                store.add_stream(iter([data]), name, info={"source": f"file:{where.name}"})
            else:
                store.add_file(where, name, report, info={"source": f"file:{where.name}"})
    click.echo(f"added {name} ({summary})")


@models.command("quantize")
@click.argument("name")
@click.option("--to", "target", help="Name of the quantized model (default: NAME-int8).")
@click.option("--exclude", multiple=True, help="A node to keep in float (repeatable).")
@socket_option
@friendly
def models_quantize(
    name: str, target: str | None, exclude: tuple[str, ...], socket: str | None
) -> None:
    """Quantize an ONNX model to INT8 (dynamic, per channel), stored as a new model."""
    with client(socket) as c:
        m = c.quantize(name, target, list(exclude))
    click.echo(
        f"quantized {name} into {m['name']} ({m['size'] / 2**20:.1f} MB, {m['quantization']})"
    )


@models.command("rm")
@click.argument("name")
@socket_option
@state_dir_option
@key_file_option
@friendly
def models_rm(
    name: str, socket: str | None, state_dir: str | None, key_file: str | None = None
) -> None:
    """Remove a model from the device."""
    c = daemon_or_none(socket)
    if c is not None:
        with c:
            c.remove_model(name)
    else:
        offline_store(state_dir, key_file).remove(name)
    click.echo(f"removed {name}")


@models.command("load")
@click.argument("name")
@click.option("--keep-alive", help="Seconds (or 5m, 1h); negative pins it.")
@socket_option
@friendly
def models_load(name: str, keep_alive: str | None, socket: str | None) -> None:
    """Load a model now instead of on first use."""
    with client(socket) as c:
        m = c.load(name, keep_alive)
    click.echo(f"loaded {name} ({m['memory_mb']:.0f} MB, {m['slots']} slots, {m['device']})")


@models.command("unload")
@click.argument("name")
@click.option("--force", is_flag=True, help="Even if it is serving requests.")
@socket_option
@friendly
def models_unload(name: str, force: bool, socket: str | None) -> None:
    """Unload a model, freeing its memory."""
    with client(socket) as c:
        done = c.unload(name, force)["unloaded"]
    click.echo(f"unloaded {name}" if done else f"{name} was not loaded")


# --- requests ----------------------------------------------------------------------------------
@main.group()
def requests() -> None:
    """Requests in flight."""


@requests.command("list")
@socket_option
@json_option
@friendly
def requests_list(socket: str | None, as_json: bool) -> None:
    """In-flight requests."""
    with client(socket) as c:
        rows = c.requests()

    def human(rs: list[dict[str, Any]]) -> None:
        if not rs:
            click.echo("no requests in flight")
            return
        table(
            [
                [
                    r["id"],
                    r["model"],
                    r["state"],
                    r["completion_tokens"],
                    f"{r['age_seconds']}s",
                    r.get("user") or r.get("uid", ""),
                ]
                for r in rs
            ],
            ["ID", "MODEL", "STATE", "TOKENS", "AGE", "USER"],
        )

    emit(rows, as_json, human)


@requests.command("cancel")
@click.argument("request_id")
@socket_option
@friendly
def requests_cancel(request_id: str, socket: str | None) -> None:
    """Cancel a request; its slot is freed within one decode step."""
    with client(socket) as c:
        c.cancel(request_id)
    click.echo(f"cancelled {request_id}")


# --- access ----------------------------------------------------------------------------------
