"""What every command shares: the group, error handling, options and output."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click
import httpx

from edgellm.client import Client, DaemonUnavailable
from edgellm.config import load_settings
from edgellm.errors import EdgeError

socket_option = click.option(
    "--socket",
    envvar="EDGELLM_SOCKET",
    # no access check here: the service's socket is root:edgellm-clients 0660, and the
    # daemon, handed it as fd 3, need not be able to open it; a client refused is told
    # so by the connect, by name
    type=click.Path(readable=False),
    help="The daemon's socket [env EDGELLM_SOCKET].",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def one_line(exc: EdgeError) -> str:
    """An error as the CLI shows it: its message, and when to try again if the daemon
    said (Retry-After)."""
    if exc.retry_after is None:
        return exc.message
    return f"{exc.message.rstrip('.')} (retry in {exc.retry_after:g}s)"


# what the extras bring (pyproject.toml): a command that needs one names it
SERVER_MODULES = {
    "llama_cpp",
    "aiohttp",
    "prometheus_client",
    "psutil",
    "cryptography",
    "sqlite_utils",
    "onnxruntime",
    "onnx",
    "tokenizers",
    "safetensors",
    "numpy",
    "jsonschema",
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    root = (exc.name or "").split(".")[0]
    return "server" if root in SERVER_MODULES else "tui" if root == "textual" else None


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into one line on stderr and exit 1; never show a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgeError as exc:
            click.echo(f"error: {one_line(exc)}", err=True)
            sys.exit(1)
        except OSError as exc:
            click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
            sys.exit(1)
        except httpx.HTTPError as exc:  # a daemon that stopped answering mid-way
            click.echo(
                f"error: the daemon did not answer ({type(exc).__name__}: "
                f"{exc or 'no reply'}); see `edgellm status` and its log",
                err=True,
            )
            sys.exit(1)
        except ModuleNotFoundError as exc:  # a client-only install, asked for the appliance
            extra = missing_extra(exc)
            if extra is None:
                raise
            click.echo(
                f"error: this needs edgellm's {extra} part (Python package {exc.name!r} is "
                f"not installed); install it with: pip install 'edgellm[{extra}]'",
                err=True,
            )
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


def chosen_socket(socket: str | None) -> str | None:
    """The socket to use, or None where a URL is to be used instead: --url (or
    EDGELLM_URL) wins over EDGELLM_SOCKET, but not over a --socket on the command line."""
    ctx = click.get_current_context(silent=True)
    if not os.environ.get("EDGELLM_URL") or ctx is None:
        return socket
    explicit = ctx.get_parameter_source("socket") == click.core.ParameterSource.COMMANDLINE
    return socket if explicit else None


def client(socket: str | None) -> Client:
    return Client(chosen_socket(socket))


def emit(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        human(data)


def table(rows: list[list[Any]], headers: list[str]) -> None:
    cells = [headers] + [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgellm")
@click.option(
    "--url",
    envvar="EDGELLM_URL",
    help="Reach the daemon at http(s)://HOST:PORT instead of its socket [env EDGELLM_URL].",
)
@click.option(
    "--token", envvar="EDGELLM_TOKEN", help="The bearer token to send [env EDGELLM_TOKEN]."
)
@click.option(
    "--ca-file",
    envvar="EDGELLM_CA_FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="A CA certificate (PEM) that verifies an https daemon [env EDGELLM_CA_FILE].",
)
@click.option(
    "--cert-file",
    envvar="EDGELLM_CERT_FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="A client certificate (PEM) for a daemon that asks for one [env EDGELLM_CERT_FILE].",
)
@click.option(
    "--cert-key-file",
    "client_key_file",
    envvar="EDGELLM_CERT_KEY_FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="The client certificate's key, if not in its file [env EDGELLM_CERT_KEY_FILE].",
)
def main(
    url: str | None,
    token: str | None,
    ca_file: str | None,
    cert_file: str | None,
    client_key_file: str | None,
) -> None:
    """edgellm: a self-contained LLM appliance, served over a Unix socket (and, opted
    into, over TCP with TLS and tokens)."""
    # every client this command makes (the TUI's too) reaches the daemon this way
    given = (
        ("URL", url),
        ("TOKEN", token),
        ("CA_FILE", ca_file),
        ("CERT_FILE", cert_file),
        ("CERT_KEY_FILE", client_key_file),
    )
    for name, value in given:
        if value:
            os.environ[f"EDGELLM_{name}"] = value


def ask_passphrase(prompt: str = "vault passphrase", new: bool = False) -> str:
    """From the terminal, or one line of stdin when it is not a terminal."""
    return click.prompt(
        prompt, hide_input=True, err=True, confirmation_prompt=new and sys.stdin.isatty()
    )


def offline_store(
    state_dir: str | None, key_file: str | None = None, create: bool = True, upgrade: bool = True
) -> Any:
    """The vault opened here, with no daemon: by its key file, or by its passphrase
    (asked for). ``create=False, upgrade=False`` reads a vault as it is (an auditor's
    copy): none is created, and an older one is not migrated."""
    from edgellm.errors import NoKey
    from edgellm.vault.open import open_vault

    settings = load_settings(overrides={"state_dir": state_dir, "vault_key_file": key_file})
    if create:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        return open_vault(settings, create=create, upgrade=upgrade)
    except NoKey as exc:
        if "passphrase" not in exc.message:
            raise
        return open_vault(settings, create=create, upgrade=upgrade, passphrase=ask_passphrase())


def daemon_or_none(socket: str | None) -> Client | None:
    c = client(socket)
    try:
        c.health()
        return c
    except DaemonUnavailable:
        c.close()
        return None


key_file_option = click.option(
    "--key-file",
    envvar="EDGELLM_VAULT_KEY_FILE",
    type=click.Path(dir_okay=False),
    help="The vault key [env EDGELLM_VAULT_KEY_FILE].",
)
state_dir_option = click.option(
    "--state-dir",
    envvar="EDGELLM_STATE_DIR",
    type=click.Path(),
    help="Used when no daemon runs [env EDGELLM_STATE_DIR].",
)


def watch_job(c: Client, kind: str, report: Any, call: Callable[[], Any]) -> Any:
    """``call()`` (one request that does long work in the daemon), its progress
    mirrored from the daemon's job list meanwhile (when the caller may read it)."""
    import threading

    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:  # raised again on this thread
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    with c.like(timeout=10) as watcher:
        while worker.is_alive():
            try:
                for job in watcher.jobs():
                    if job["kind"] == kind:
                        report(job["phase"], job["completed"], job["total"])
            except EdgeError:  # not ours to see: the work goes on unwatched
                worker.join()
            worker.join(0.25)
    if "error" in result:
        raise result["error"]
    return result["value"]
