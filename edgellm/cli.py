"""The ``edgellm`` command: ``edgellm <noun> <verb>``.

Every command but ``serve`` is a client of the socket. ``models pull/add/rm/list``
also work with no daemon running, on the state directory directly (offline mode).
Exit codes: 0 success, 1 a user error with a one-line message, 2 a usage error.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from edgellm.client import Client, DaemonUnavailable
from edgellm.config import load_settings
from edgellm.errors import EdgeError

socket_option = click.option("--socket", envvar="EDGELLM_SOCKET", type=click.Path(),
                             help="The daemon's socket [env EDGELLM_SOCKET].")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into one line on stderr and exit 1; never show a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgeError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(1)
        except OSError as exc:
            click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
                       err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


def _client(socket: str | None) -> Client:
    return Client(socket)


def _emit(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        human(data)


def _table(rows: list[list[Any]], headers: list[str]) -> None:
    cells = [headers] + [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgellm")
def main() -> None:
    """edgellm: a self-contained LLM appliance, served over a Unix socket."""


# --- serve -------------------------------------------------------------------------------
@main.command()
@socket_option
@click.option("--state-dir", envvar="EDGELLM_STATE_DIR", type=click.Path(),
              help="Models and state [env EDGELLM_STATE_DIR].")
@click.option("--config", "config_file", envvar="EDGELLM_CONFIG", type=click.Path(),
              help="edgellm.toml to read [env EDGELLM_CONFIG].")
@click.option("--model", "default_model", help="The default model (pulled if missing).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"],
                                               case_sensitive=False))
@click.option("--no-pull", is_flag=True, help="Do not fetch the default model if missing.")
@friendly
def serve(socket: str | None, state_dir: str | None, config_file: str | None,
          default_model: str | None, log_level: str | None, no_pull: bool) -> None:
    """Run the daemon in the foreground (Ctrl-C stops it cleanly)."""
    from edgellm.server.daemon import serve as run

    flags = {"socket": socket, "state_dir": state_dir, "default_model": default_model,
             "log_level": log_level.upper() if log_level else None}
    config = Path(config_file) if config_file else None
    settings = load_settings(config, flags)
    sys.exit(run(settings, pull_default=not no_pull,
                 reload=lambda: load_settings(config, flags)))


# --- generation ----------------------------------------------------------------------------
def _gen_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        socket_option,
        click.option("--model", "-m", help="Model to use (default: the daemon's default)."),
        click.option("--system", "-s", help="A system prompt."),
        click.option("--max-tokens", type=click.IntRange(min=1)),
        click.option("--temperature", type=click.FloatRange(0, 2)),
        click.option("--seed", type=int),
    ]):
        fn = option(fn)
    return fn


@main.command()
@click.argument("prompt")
@_gen_options
@json_option
@friendly
def ask(prompt: str, socket: str | None, model: str | None, system: str | None,
        max_tokens: int | None, temperature: float | None, seed: int | None,
        as_json: bool) -> None:
    """Ask one question; the answer streams as it is generated."""
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": prompt}]
    params = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    with _client(socket) as c:
        if as_json:
            click.echo(json.dumps(c.chat(messages, model=model, **params), indent=2))
            return
        stream = c.chat(messages, model=model, stream=True, **params)
        for piece in stream:
            click.echo(piece, nl=False)
        click.echo()
        if stream.finish_reason not in ("stop", None):
            click.echo(f"[finished: {stream.finish_reason}]", err=True)


@main.command()
@_gen_options
@friendly
def chat(socket: str | None, model: str | None, system: str | None, max_tokens: int | None,
         temperature: float | None, seed: int | None) -> None:
    """Chat interactively; Ctrl-C stops an answer, Ctrl-D (or /exit) leaves."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    params = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    with _client(socket) as c:
        c.health()  # fail early, with the clear message, if no daemon is there
        click.echo("edgellm chat — Ctrl-C stops an answer, Ctrl-D or /exit leaves.", err=True)
        while True:
            try:
                line = input(">>> ")
            except (EOFError, KeyboardInterrupt):
                click.echo()
                return
            if line.strip() in ("/exit", "/quit"):
                return
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            stream = c.chat(history, model=model, stream=True, **params)
            answer: list[str] = []
            try:
                for piece in stream:
                    answer.append(piece)
                    click.echo(piece, nl=False)
            except KeyboardInterrupt:
                stream.close()  # the daemon sees the disconnect and frees the slot
                click.echo("\n[cancelled]", err=True)
            else:
                click.echo()
            history.append({"role": "assistant", "content": "".join(answer)})


# --- state -----------------------------------------------------------------------------------
@main.command()
@socket_option
@json_option
@friendly
def ps(socket: str | None, as_json: bool) -> None:
    """Loaded models: memory, slots, idle timers."""
    with _client(socket) as c:
        models = c.ps()

    def human(rows: list[dict[str, Any]]) -> None:
        if not rows:
            click.echo("no models loaded")
            return
        _table([[m["name"], f"{m['memory_mb']:.0f} MB", f"{m['slots_busy']}/{m['slots']}",
                 m["queued"], m["device"],
                 "pinned" if m["pinned"] else (f"{m['expires_in_seconds']:.0f}s"
                                               if m["expires_in_seconds"] is not None else "busy")]
                for m in rows], ["NAME", "MEMORY", "SLOTS", "QUEUED", "DEVICE", "UNLOAD IN"])

    _emit(models, as_json, human)


@main.command()
@socket_option
@json_option
@friendly
def status(socket: str | None, as_json: bool) -> None:
    """Is the daemon up, and how is it doing?"""
    with _client(socket) as c:
        health, loaded = c.health(), c.ps()
    data = {**health, "loaded": loaded, "socket": str(c.socket)}

    def human(d: dict[str, Any]) -> None:
        click.echo(f"edgellm {d['version']}: {d['status']} on {d['socket']} "
                   f"(up {d['uptime_seconds']:.0f}s)")
        click.echo(f"requests: {d['active_requests']} active, {d['queue_depth']} queued")
        for name, state in d["models"].items():
            click.echo(f"  {name}: {state}")

    _emit(data, as_json, human)


# --- models ------------------------------------------------------------------------------------
@main.group()
def models() -> None:
    """The models on this device, and the catalog."""


def _offline_store(state_dir: str | None, key_file: str | None = None) -> Any:
    from edgellm.vault.open import open_vault

    settings = load_settings(overrides={"state_dir": state_dir, "vault_key_file": key_file})
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return open_vault(settings)


def _daemon_or_none(socket: str | None) -> Client | None:
    c = _client(socket)
    try:
        c.health()
        return c
    except DaemonUnavailable:
        c.close()
        return None


key_file_option = click.option("--key-file", envvar="EDGELLM_VAULT_KEY_FILE",
                               type=click.Path(dir_okay=False),
                               help="The vault key [env EDGELLM_VAULT_KEY_FILE].")
state_dir_option = click.option("--state-dir", envvar="EDGELLM_STATE_DIR", type=click.Path(),
                                help="Used when no daemon runs [env EDGELLM_STATE_DIR].")


@models.command("list")
@socket_option
@state_dir_option
@key_file_option
@json_option
@friendly
def models_list(socket: str | None, state_dir: str | None, as_json: bool,
                key_file: str | None = None) -> None:
    """Models on the device, then catalog models not pulled yet."""
    from edgellm.catalog import Catalog

    c = _daemon_or_none(socket)
    if c is not None:
        with c:
            rows = c.models()
    else:
        offline = _offline_store(state_dir, key_file)
        rows = [{**r.as_dict(), "state": "offline"} for r in offline.list()]
    have = {r["name"] for r in rows}
    catalog = [m for m in Catalog().list() if m.name not in have]
    data = {"models": rows, "catalog": [vars(m) for m in catalog]}

    def human(d: dict[str, Any]) -> None:
        _table([[r["name"], r["format"], r["quantization"], f"{r['size'] / 2**20:.0f} MB",
                 r["state"]] for r in d["models"]],
               ["NAME", "FORMAT", "QUANT", "SIZE", "STATE"])
        for m in catalog:
            click.echo(f"{m.name} (in the catalog: `edgellm models pull {m.name}`)")

    _emit(data, as_json, human)


@models.command("show")
@click.argument("name")
@socket_option
@friendly
def models_show(name: str, socket: str | None) -> None:
    """Everything known about one model."""
    with _client(socket) as c:
        click.echo(json.dumps(c.model(name), indent=2))


@models.command("pull")
@click.argument("name")
@socket_option
@state_dir_option
@key_file_option
@friendly
def models_pull(name: str, socket: str | None, state_dir: str | None,
                key_file: str | None = None) -> None:
    """Fetch a catalog model, check its sha256 and store it."""
    from edgellm.catalog import Catalog, fetch

    settings = load_settings(overrides={"state_dir": state_dir})
    manifest = Catalog(settings.catalog_dir).get(name)
    click.echo(f"fetching {name} from {manifest.describe_source()} "
               f"({manifest.size / 2**20:.0f} MB)…", err=True)
    path = fetch(manifest, settings.cache_dir)
    c = _daemon_or_none(socket)
    if c is not None:
        with c:
            c.import_model(name, path, sha256=manifest.sha256, source=manifest.describe_source())
    else:
        _offline_store(state_dir, key_file).add_file(path, name, expected_sha256=manifest.sha256,
                                           info={"source": manifest.describe_source(),
                                                 "license": manifest.license,
                                                 "quantization": manifest.quantization})
    click.echo(f"pulled {name} (sha256 {manifest.sha256[:12]}… verified)")


@models.command("add")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="Name to store it under (default: from the file name).")
@socket_option
@state_dir_option
@key_file_option
@friendly
def models_add(path: str, name: str | None, socket: str | None, state_dir: str | None,
               key_file: str | None = None) -> None:
    """Add a local GGUF file (its header is checked before anything is stored)."""
    from edgellm.runtime.gguf_meta import read_gguf_metadata
    from edgellm.runtime.source import check_name

    meta = read_gguf_metadata(path)  # refuse a non-GGUF file before sending a byte
    name = check_name(name or Path(path).stem.lower().replace(" ", "-"))
    c = _daemon_or_none(socket)
    if c is not None:
        with c:
            c.import_model(name, path, source=f"file:{Path(path).name}")
    else:
        _offline_store(state_dir, key_file).add_file(Path(path), name,
                                           info={"source": f"file:{Path(path).name}"})
    click.echo(f"added {name} ({meta['architecture']}, {meta['quantization']}, "
               f"context {meta['context_length']})")


@models.command("rm")
@click.argument("name")
@socket_option
@state_dir_option
@key_file_option
@friendly
def models_rm(name: str, socket: str | None, state_dir: str | None,
              key_file: str | None = None) -> None:
    """Remove a model from the device."""
    c = _daemon_or_none(socket)
    if c is not None:
        with c:
            c.remove_model(name)
    else:
        _offline_store(state_dir, key_file).remove(name)
    click.echo(f"removed {name}")


@models.command("load")
@click.argument("name")
@click.option("--keep-alive", help="Seconds (or 5m, 1h); negative pins it.")
@socket_option
@friendly
def models_load(name: str, keep_alive: str | None, socket: str | None) -> None:
    """Load a model now instead of on first use."""
    with _client(socket) as c:
        m = c.load(name, keep_alive)
    click.echo(f"loaded {name} ({m['memory_mb']:.0f} MB, {m['slots']} slots, {m['device']})")


@models.command("unload")
@click.argument("name")
@click.option("--force", is_flag=True, help="Even if it is serving requests.")
@socket_option
@friendly
def models_unload(name: str, force: bool, socket: str | None) -> None:
    """Unload a model, freeing its memory."""
    with _client(socket) as c:
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
    with _client(socket) as c:
        rows = c.requests()

    def human(rs: list[dict[str, Any]]) -> None:
        if not rs:
            click.echo("no requests in flight")
            return
        _table([[r["id"], r["model"], r["state"], r["completion_tokens"], f"{r['age_seconds']}s",
                 r.get("uid", "")] for r in rs], ["ID", "MODEL", "STATE", "TOKENS", "AGE", "UID"])

    _emit(rows, as_json, human)


@requests.command("cancel")
@click.argument("request_id")
@socket_option
@friendly
def requests_cancel(request_id: str, socket: str | None) -> None:
    """Cancel a request; its slot is freed within one decode step."""
    with _client(socket) as c:
        c.cancel(request_id)
    click.echo(f"cancelled {request_id}")


# --- access ----------------------------------------------------------------------------------
@main.group()
def access() -> None:
    """Who may use the appliance: roles granted to users, groups and tokens."""


subject_arg = click.argument("subject")
role_arg = click.argument("role", type=click.Choice(["admin", "operator", "auditor", "client"]))
model_option = click.option("--model", default="*", show_default=True,
                            help="For client grants: the model (or * for all).")


@access.command("grant")
@subject_arg
@role_arg
@model_option
@socket_option
@friendly
def access_grant(subject: str, role: str, model: str, socket: str | None) -> None:
    """Grant ROLE to SUBJECT (user:NAME, group:NAME, uid:N or token:NAME)."""
    with _client(socket) as c:
        g = c.grant(subject, role, model)
    click.echo(f"granted {g['role']} to {g['subject']}"
               + (f" on {g['model']}" if g["role"] == "client" else ""))


@access.command("revoke")
@subject_arg
@role_arg
@model_option
@socket_option
@friendly
def access_revoke(subject: str, role: str, model: str, socket: str | None) -> None:
    """Take a grant back."""
    with _client(socket) as c:
        c.revoke(subject, role, model)
    click.echo(f"revoked {role} from {subject}")


@access.command("list")
@socket_option
@json_option
@friendly
def access_list(socket: str | None, as_json: bool) -> None:
    """Every grant (root and the daemon's own user are admins without one)."""
    with _client(socket) as c:
        rows = c.grants()
    _emit(rows, as_json, lambda rs: _table([[r["subject"], r["role"], r["model"]] for r in rs],
                                            ["SUBJECT", "ROLE", "MODEL"]) if rs
          else click.echo("no grants (only root and the daemon's user can do anything)"))


@access.command("whoami")
@socket_option
@json_option
@friendly
def access_whoami(socket: str | None, as_json: bool) -> None:
    """Who the daemon sees you as, and what you hold."""
    with _client(socket) as c:
        me = c.whoami()

    def human(d: dict[str, Any]) -> None:
        click.echo(f"{d['user'] or 'uid ' + str(d['uid'])} (uid {d['uid']}, pid {d['pid']}), "
                   f"groups: {', '.join(d['groups']) or '-'}")
        roles = d["roles"]
        click.echo("roles: " + (", ".join(f"{r} ({', '.join(m)})" for r, m in roles.items())
                                if roles else "none"))

    _emit(me, as_json, human)


@access.command("token")
@click.argument("name")
@socket_option
@friendly
def access_token(name: str, socket: str | None) -> None:
    """Create a bearer token NAME (shown once); grant roles to token:NAME."""
    with _client(socket) as c:
        t = c.create_token(name)
    click.echo(t["token"])
    click.echo(f"grant it roles as {t['subject']}; send it as 'Authorization: Bearer …'",
               err=True)


# --- audit ------------------------------------------------------------------------------------
@main.group()
def audit() -> None:
    """The tamper-evident record of who did what (never prompts or outputs)."""


def _audit_line(r: dict[str, Any]) -> str:
    tokens = (f" tokens={r['prompt_tokens']}+{r['completion_tokens']}"
              if r.get("completion_tokens") is not None else "")
    extra = f" status={r['status']}" if r.get("status") is not None else ""
    finish = f" finish={r['finish_reason']}" if r.get("finish_reason") else ""
    return (f"{r['seq']:>6} {r['time']} {r['decision']:<7} {r['action'] or '-':<18} "
            f"{r['resource'] or '-'} user={r['user'] or '-'} uid={r['uid']} pid={r['pid']}"
            f"{extra}{tokens}{finish}")


@audit.command("tail")
@click.option("-n", "count", default=20, show_default=True, help="How many rows.")
@socket_option
@json_option
@friendly
def audit_tail(count: int, socket: str | None, as_json: bool) -> None:
    """The newest rows."""
    with _client(socket) as c:
        rows = list(reversed(c.audit(limit=count, order="newest")))
    _emit(rows, as_json, lambda rs: [click.echo(_audit_line(r)) for r in rs])


@audit.command("search")
@click.option("--since", help="UTC ISO time, e.g. 2026-11-22T00:00:00Z.")
@click.option("--until")
@click.option("--user")
@click.option("--action", help="e.g. models.use, models.load, access.manage.")
@click.option("--decision", type=click.Choice(["allow", "deny", "outcome"]))
@click.option("--model")
@socket_option
@json_option
@friendly
def audit_search(since: str | None, until: str | None, user: str | None, action: str | None,
                 decision: str | None, model: str | None, socket: str | None,
                 as_json: bool) -> None:
    """Rows matching every filter given."""
    with _client(socket) as c:
        rows = c.audit(since=since, until=until, user=user, action=action, decision=decision,
                       model=model)
    _emit(rows, as_json, lambda rs: [click.echo(_audit_line(r)) for r in rs])


@audit.command("export")
@socket_option
@friendly
def audit_export(socket: str | None) -> None:
    """Every row as JSON lines, oldest first (MACs included, for offline checking)."""
    with _client(socket) as c:
        for row in c.audit():
            click.echo(json.dumps(row, separators=(",", ":")))


@audit.command("verify")
@socket_option
@friendly
def audit_verify(socket: str | None) -> None:
    """Check the whole HMAC chain; name the first row that was tampered with."""
    with _client(socket) as c:
        result = c.audit_verify()
    if not result["ok"]:
        raise EdgeError(f"audit chain broken at row {result['first_bad']}: {result['problem']}")
    click.echo(f"audit chain intact: {result['rows']} rows")


# --- vault ---------------------------------------------------------------------------------------
@main.group()
def vault() -> None:
    """The encrypted store: models at rest, and the key that opens them."""




def _vault_settings(state_dir: str | None, key_file: str | None) -> Any:
    return load_settings(overrides={"state_dir": state_dir, "vault_key_file": key_file})


@vault.command("init")
@state_dir_option
@key_file_option
@friendly
def vault_init(state_dir: str | None, key_file: str | None) -> None:
    """Create the vault (and a new random key file, 0600, if the one named is missing)."""
    from edgellm.vault.open import open_vault, vault_dir
    from edgellm.vault.store import VaultStore

    settings = _vault_settings(state_dir, key_file)
    if VaultStore.exists(vault_dir(settings)):
        raise EdgeError(f"a vault already exists in {vault_dir(settings)}")
    existed = settings.vault_key_file.exists()
    open_vault(settings)
    click.echo(f"created a vault in {vault_dir(settings)}")
    click.echo(("opened with the key in " if existed else "created a new key in ")
               + f"{settings.vault_key_file}: keep it safe, without it the vault cannot be read")


@vault.command("status")
@state_dir_option
@key_file_option
@json_option
@friendly
def vault_status(state_dir: str | None, key_file: str | None, as_json: bool) -> None:
    """Where the vault is, whether the key opens it, and what it holds."""
    from edgellm.vault.keys import VaultMeta
    from edgellm.vault.open import open_vault, vault_dir
    from edgellm.vault.store import VaultStore

    settings = _vault_settings(state_dir, key_file)
    root = vault_dir(settings)
    if not VaultStore.exists(root):
        raise EdgeError(f"no vault in {root}: create one with `edgellm vault init`")
    meta = VaultMeta.load(root / "vault.json")
    data: dict[str, Any] = {"path": str(root), "key_id": meta.key_id,
                            "passphrase": meta.kdf is not None}
    try:
        store = open_vault(settings, create=False)
        models = store.list()
        data.update(state="unlocked", key=str(settings.vault_key_file), models=len(models),
                    bytes=sum(m.size for m in models))
    except EdgeError as exc:
        data.update(state="locked", reason=exc.message)

    def human(d: dict[str, Any]) -> None:
        click.echo(f"vault {d['path']} (key id {d['key_id']}): {d['state']}")
        if d["state"] == "unlocked":
            click.echo(f"  {d['models']} model(s), {d['bytes'] / 2**20:.0f} MB, key {d['key']}")
        else:
            click.echo(f"  {d['reason']}")

    _emit(data, as_json, human)


@vault.command("verify")
@state_dir_option
@key_file_option
@friendly
def vault_verify(state_dir: str | None, key_file: str | None) -> None:
    """Authenticate every segment of every object; name each bad one."""
    from edgellm.vault.open import open_vault

    store = open_vault(_vault_settings(state_dir, key_file), create=False)
    bad = store.verify()
    for name, problem in bad:
        click.echo(f"{name}: {problem}")
    if bad:
        raise EdgeError(f"{len(bad)} object(s) failed verification")
    click.echo(f"all {len(store.list())} object(s) verified")


# --- service ---------------------------------------------------------------------------------
@main.group()
def service() -> None:
    """Install edgellm as a hardened, socket-activated systemd service."""


root_option = click.option("--root", type=click.Path(file_okay=False), default="/",
                           help="Install into another root (an image); nothing is started.")
dry_run_option = click.option("--dry-run", is_flag=True, help="Print the steps only.")


def _need_root(dry_run: bool) -> None:
    if not dry_run and os.geteuid() != 0:
        raise EdgeError("this needs root: run it with sudo (or add --dry-run to see the steps)")


@service.command("install")
@root_option
@click.option("--exec", "exec_path", type=click.Path(dir_okay=False),
              help="The edgellm command the unit runs (default: this one, if the sandbox "
                   "can reach it; else a new venv under --prefix).")
@click.option("--prefix", default="/opt/edgellm", show_default=True, type=click.Path())
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False),
              help="Import this vault key (0600) instead of creating one.")
@click.option("--gpu", is_flag=True, help="Let the service reach /dev/nvidia* and /dev/dri.")
@click.option("--model", default="smollm2-135m-instruct", show_default=True,
              help="Catalog model to fetch for the service.")
@dry_run_option
@friendly
def service_install(root: str, exec_path: str | None, prefix: str, key_file: str | None,
                    gpu: bool, model: str, dry_run: bool) -> None:
    """Units, user and groups, directories, vault key, default settings and model."""
    from edgellm.service import install_steps, run_steps, systemd_running

    _need_root(dry_run)
    steps = install_steps(Path(root), Path(exec_path) if exec_path else None, Path(prefix),
                          Path(key_file) if key_file else None, gpu, model)
    run_steps(steps, dry_run, click.echo)
    if dry_run:
        return
    if root != "/" or not systemd_running():
        click.echo("systemd is not running here; once it is: systemctl daemon-reload && "
                   "systemctl enable --now edgellm.socket edgellm.service")
    click.echo("clients must be in the edgellm-clients group: usermod -aG edgellm-clients USER")


@service.command("uninstall")
@root_option
@click.option("--purge", is_flag=True, help="Also remove models, the vault key and settings.")
@dry_run_option
@friendly
def service_uninstall(root: str, purge: bool, dry_run: bool) -> None:
    """Stop and remove the service (the vault and models stay unless --purge)."""
    from edgellm.service import run_steps, uninstall_steps

    _need_root(dry_run)
    run_steps(uninstall_steps(Path(root), purge), dry_run, click.echo)


@service.command("status")
@json_option
@friendly
def service_status(as_json: bool) -> None:
    """Unit states, the socket, and the daemon's health."""
    import subprocess

    from edgellm.service import systemd_running

    sock = Path("/run/edgellm/edgellm.sock")
    data: dict[str, Any] = {"systemd": systemd_running(), "socket": str(sock),
                            "socket_exists": sock.exists()}
    for unit in ("edgellm.socket", "edgellm.service"):
        for what in ("is-active", "is-enabled"):
            out = subprocess.run(["systemctl", what, unit], capture_output=True, text=True) \
                if data["systemd"] else None
            data[f"{unit} {what}"] = out.stdout.strip() if out else "systemd not running"
    try:
        with Client(sock, timeout=5) as c:
            data["health"] = c.health()["status"]
    except EdgeError as exc:
        data["health"] = exc.message

    def human(d: dict[str, Any]) -> None:
        for key, value in d.items():
            click.echo(f"{key}: {value}")

    _emit(data, as_json, human)


if __name__ == "__main__":
    main()
