"""The vault's key (init, status, unlock, lock, rotate-key, verify) and the data kept
in it (data put, get, ls, rm). Through the daemon when one runs; otherwise on the
state directory directly, with the key."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from edgellm.cli.base import (
    EdgeError,
    ask_passphrase,
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
    watch_job,
)


@main.group()
def vault() -> None:
    """The encrypted store: models and data at rest, and the key that opens them."""


def _settings(state_dir: str | None, key_file: str | None) -> Any:
    return load_settings(overrides={"state_dir": state_dir, "vault_key_file": key_file})


@vault.command("init")
@click.option(
    "--passphrase",
    "use_passphrase",
    is_flag=True,
    help="Open the vault by a passphrase (asked for) instead of a key file.",
)
@state_dir_option
@key_file_option
@friendly
def vault_init(use_passphrase: bool, state_dir: str | None, key_file: str | None) -> None:
    """Create the vault (and a new random key file, 0600, if the one named is missing)."""
    from edgellm.vault.keys import from_passphrase, new_kdf_params
    from edgellm.vault.open import open_vault, vault_dir
    from edgellm.vault.store import VaultStore

    settings = _settings(state_dir, key_file)
    root = vault_dir(settings)
    if VaultStore.exists(root):  # init is for a vault that is missing: nothing to do
        click.echo(f"a vault already exists in {root}; nothing to do (`edgellm vault status`)")
        return
    if use_passphrase:
        passphrase = _new_passphrase()
        kdf = new_kdf_params()
        VaultStore.create(root, from_passphrase(passphrase, kdf), kdf)
        click.echo(f"created a vault in {root}, opened by its passphrase (scrypt N=2^17)")
        return
    existed = settings.vault_key_file.exists()
    open_vault(settings)
    click.echo(f"created a vault in {root}")
    click.echo(
        ("opened with the key in " if existed else "created a new key in ")
        + f"{settings.vault_key_file}: keep it safe, without it the vault cannot be read"
    )


def _new_passphrase() -> str:
    passphrase = ask_passphrase("new vault passphrase", new=True)
    if len(passphrase) < 8:
        raise EdgeError("the passphrase is shorter than 8 characters")
    return passphrase


@vault.command("status")
@socket_option
@state_dir_option
@key_file_option
@json_option
@friendly
def vault_status(
    socket: str | None, state_dir: str | None, key_file: str | None, as_json: bool
) -> None:
    """Locked or unlocked, the key's id and kind, and what the vault holds."""
    c = daemon_or_none(socket)
    if c is not None:
        with c:
            data = {**c.vault_status(), "via": "daemon"}
    else:
        data = _offline_status(_settings(state_dir, key_file))

    def human(d: dict[str, Any]) -> None:
        opener = "passphrase" if d["passphrase"] else "key file or credential"
        click.echo(f"vault {d['path']} (key id {d['key_id']}, opened by {opener}): {d['state']}")
        if d.get("models") is not None:
            click.echo(
                f"  {d['models']} model(s), {d['data']} data object(s), {d['bytes'] / 2**20:.0f} MB"
            )
        if d.get("reason"):
            click.echo(f"  {d['reason']}")

    emit(data, as_json, human)


def _offline_status(settings: Any) -> dict[str, Any]:
    from edgellm.vault.open import open_vault, vault_dir
    from edgellm.vault.store import VaultStore

    root = vault_dir(settings)
    if not VaultStore.exists(root):
        raise EdgeError(f"no vault in {root}: create one with `edgellm vault init`")
    store = VaultStore(root)
    meta = store.meta
    data: dict[str, Any] = {
        "path": str(root),
        "key_id": meta.key_id,
        "via": "offline",
        "passphrase": meta.kdf is not None,
    }
    models, objects = store.list(), store.list_data()
    data.update(
        models=len(models),
        data=len(objects),
        bytes=sum(m.size for m in models) + sum(o["size"] for o in objects),
    )
    try:
        open_vault(settings, create=False)
        data["state"] = "unlocked"
    except EdgeError as exc:
        data.update(state="locked", reason=exc.message)
    return data


def _need_daemon(socket: str | None, what: str) -> Any:
    c = daemon_or_none(socket)
    if c is None:
        raise EdgeError(
            f"no daemon is running: {what} is about the running daemon (offline "
            "commands open the vault with --key-file or the passphrase)"
        )
    return c


@vault.command("unlock")
@socket_option
@click.option(
    "--key-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Send this key (else the daemon tries its own key file or credential).",
)
@friendly
def vault_unlock(socket: str | None, key_file: str | None) -> None:
    """Give the running daemon its key (a passphrase vault asks for the passphrase)."""
    from edgellm.vault.keys import read_key_file

    with _need_daemon(socket, "unlock") as c:
        if c.vault_status()["passphrase"]:
            result = c.vault_unlock(passphrase=ask_passphrase())
        elif key_file:
            result = c.vault_unlock(key=read_key_file(Path(key_file)).key)
        else:
            result = c.vault_unlock()
    click.echo("the vault was already unlocked" if result["already"] else "vault unlocked")


@vault.command("lock")
@socket_option
@friendly
def vault_lock(socket: str | None) -> None:
    """Unload every model and make the daemon forget the key."""
    with _need_daemon(socket, "lock") as c:
        result = c.vault_lock()
    unloaded = ", ".join(result["unloaded"]) or "none loaded"
    click.echo(f"vault locked (unloaded: {unloaded}); `edgellm vault unlock` opens it again")


@vault.command("rotate-key")
@click.option(
    "--passphrase",
    "use_passphrase",
    is_flag=True,
    help="Move to a new passphrase (asked for) instead of a new random key file.",
)
@socket_option
@state_dir_option
@key_file_option
@friendly
def vault_rotate(
    use_passphrase: bool, socket: str | None, state_dir: str | None, key_file: str | None
) -> None:
    """Rewrap every data key under a new master key, atomically (payloads untouched).

    By default a new random key replaces the key file; the old key stops working."""
    from edgellm import progress
    from edgellm.vault.keys import from_passphrase, new_kdf_params
    from edgellm.vault.open import rotate_to_new_key_file

    passphrase = _new_passphrase() if use_passphrase else None
    c = daemon_or_none(socket)
    with progress.shown("rotate") as report:
        if c is not None:
            with c:
                result = watch_job(
                    c, "vault.rotate", report, lambda: c.vault_rotate(passphrase=passphrase)
                )
            count, key_id = result["rotated"], result["key_id"]
        else:
            store = offline_store(state_dir, key_file)
            if passphrase is not None:
                kdf = new_kdf_params()
                report("derive the key from the passphrase")
                count = store.rotate_key(from_passphrase(passphrase, kdf), kdf, report)
            else:
                key = _settings(state_dir, key_file).vault_key_file
                count = rotate_to_new_key_file(store, key, report)
            key_id = store.meta.key_id
    click.echo(
        f"rotated: {count} object(s) rewrapped under key {key_id}"
        + (
            "; the vault now opens by the new passphrase"
            if passphrase
            else "; the key file now holds the new key"
        )
    )


@vault.command("verify")
@socket_option
@state_dir_option
@key_file_option
@friendly
def vault_verify(socket: str | None, state_dir: str | None, key_file: str | None) -> None:
    """Authenticate every segment of every object; name each bad one."""
    c = daemon_or_none(socket)
    if c is not None:
        with c:
            bad = [(b["name"], b["problem"]) for b in c.vault_verify()["bad"]]
            total = len(c.models()) + len(c.data())
    else:
        store = offline_store(state_dir, key_file)
        bad = store.verify()
        total = len(store.list()) + len(store.list_data())
    for name, problem in bad:
        click.echo(f"{name}: {problem}")
    if bad:
        raise EdgeError(f"{len(bad)} object(s) failed verification")
    click.echo(f"all {total} object(s) verified")


# --- data ------------------------------------------------------------------------------------
@main.group()
def data() -> None:
    """Files kept in the vault: documents, prompt sets, adapters, secrets."""


@data.command("put")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--no-replace", is_flag=True, help="Refuse if NAME exists.")
@socket_option
@state_dir_option
@key_file_option
@friendly
def data_put(
    name: str,
    path: str,
    no_replace: bool,
    socket: str | None,
    state_dir: str | None,
    key_file: str | None,
) -> None:
    """Encrypt the file at PATH into the vault as NAME (e.g. docs/manual.pdf)."""
    from edgellm import progress

    c = daemon_or_none(socket)
    with progress.shown(name) as report:
        if c is not None:
            with c:
                info = c.data_put(name, path, replace=not no_replace, report=report)
        else:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                chunks = iter(lambda: f.read(1 << 20), b"")
                info = offline_store(state_dir, key_file).put_data(
                    progress.counted(chunks, report, "store in the vault", size),
                    name,
                    replace=not no_replace,
                    source=f"file:{Path(path).name}",
                )
    click.echo(f"stored {info['name']} ({info['size']} bytes, sha256 {info['sha256'][:12]}…)")


@data.command("get")
@click.argument("name")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Write it here (0600) instead of to standard output.",
)
@socket_option
@state_dir_option
@key_file_option
@friendly
def data_get(
    name: str, out: str | None, socket: str | None, state_dir: str | None, key_file: str | None
) -> None:
    """Decrypt NAME (authenticated whole before a byte is written)."""
    c = daemon_or_none(socket)
    if c is not None:
        with c:
            _write(c.data_get(name), out)
    else:
        store = offline_store(state_dir, key_file)
        with store.open(name, "data") as path, open(path, "rb") as f:
            _write(iter(lambda: f.read(1 << 20), b""), out)


def _write(chunks: Any, out: str | None) -> None:
    if out is None:
        for chunk in chunks:
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return
    target = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@data.command("ls")
@click.argument("prefix", default="")
@socket_option
@state_dir_option
@key_file_option
@json_option
@friendly
def data_ls(
    prefix: str, socket: str | None, state_dir: str | None, key_file: str | None, as_json: bool
) -> None:
    """Data objects (those you may read), optionally under PREFIX."""
    from edgellm.vault.open import vault_dir
    from edgellm.vault.store import VaultStore

    c = daemon_or_none(socket)
    if c is not None:
        with c:
            rows = c.data(prefix)
    else:  # names and sizes are catalog metadata: no key needed to list them
        root = vault_dir(_settings(state_dir, key_file))
        if not VaultStore.exists(root):
            raise EdgeError(f"no vault in {root}: create one with `edgellm vault init`")
        rows = VaultStore(root).list_data(prefix)
    emit(
        rows,
        as_json,
        lambda rs: (
            table(
                [[r["name"], r["size"], r["added"], r["sha256"][:12]] for r in rs],
                ["NAME", "BYTES", "ADDED", "SHA256"],
            )
            if rs
            else click.echo("no data objects")
        ),
    )


@data.command("rm")
@click.argument("name")
@socket_option
@state_dir_option
@key_file_option
@friendly
def data_rm(name: str, socket: str | None, state_dir: str | None, key_file: str | None) -> None:
    """Remove NAME from the vault."""
    c = daemon_or_none(socket)
    if c is not None:
        with c:
            c.data_remove(name)
    else:
        offline_store(state_dir, key_file).remove_data(name)
    click.echo(f"removed {name}")
