"""Installing the systemd service."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from edgellm.cli.base import (
    Client,
    EdgeError,
    emit,
    friendly,
    json_option,
    main,
)


# --- service ---------------------------------------------------------------------------------
@main.group()
def service() -> None:
    """Install edgellm as a hardened, socket-activated systemd service."""


root_option = click.option(
    "--root",
    type=click.Path(file_okay=False),
    default="/",
    help="Install into another root (an image); nothing is started.",
)
dry_run_option = click.option("--dry-run", is_flag=True, help="Print the steps only.")


def _need_root(dry_run: bool) -> None:
    if not dry_run and os.geteuid() != 0:
        raise EdgeError("this needs root: run it with sudo (or add --dry-run to see the steps)")


@service.command("install")
@root_option
@click.option(
    "--exec",
    "exec_path",
    type=click.Path(dir_okay=False),
    help="The edgellm command the unit runs (default: this one, if the sandbox "
    "can reach it; else a new venv under --prefix).",
)
@click.option("--prefix", default="/opt/edgellm", show_default=True, type=click.Path())
@click.option(
    "--key-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Import this vault key (0600) instead of creating one.",
)
@click.option("--gpu", is_flag=True, help="Let the service reach /dev/nvidia* and /dev/dri.")
@click.option(
    "--tcp",
    metavar="ADDRESS",
    help="Also serve on TCP (e.g. 0.0.0.0:8443) through edgellm-tcp.socket; callers need "
    "tokens, and an address off loopback needs TLS in edgellm.toml.",
)
@click.option(
    "--model",
    default="smollm2-135m-instruct",
    show_default=True,
    help="Catalog model to fetch for the service.",
)
@dry_run_option
@friendly
def service_install(
    root: str,
    exec_path: str | None,
    prefix: str,
    key_file: str | None,
    gpu: bool,
    tcp: str | None,
    model: str,
    dry_run: bool,
) -> None:
    """Units, user and groups, directories, vault key, default settings and model."""
    from edgellm.service import install_steps, run_steps, systemd_running

    _need_root(dry_run)
    steps = install_steps(
        Path(root),
        Path(exec_path) if exec_path else None,
        Path(prefix),
        Path(key_file) if key_file else None,
        gpu,
        model,
        tcp,
    )
    run_steps(steps, dry_run, click.echo)
    if dry_run:
        return
    if root != "/" or not systemd_running():
        click.echo(
            "systemd is not running here; once it is: systemctl daemon-reload && "
            "systemctl enable --now edgellm.socket edgellm.service"
            + (" edgellm-tcp.socket" if tcp else "")
        )
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
    data: dict[str, Any] = {
        "systemd": systemd_running(),
        "socket": str(sock),
        "socket_exists": sock.exists(),
    }
    for unit in ("edgellm.socket", "edgellm.service"):
        for what in ("is-active", "is-enabled"):
            out = (
                subprocess.run(["systemctl", what, unit], capture_output=True, text=True)
                if data["systemd"]
                else None
            )
            data[f"{unit} {what}"] = out.stdout.strip() if out else "systemd not running"
    try:
        with Client(sock, timeout=5) as c:
            data["health"] = c.health()["status"]
    except EdgeError as exc:
        data["health"] = exc.message

    def human(d: dict[str, Any]) -> None:
        for key, value in d.items():
            click.echo(f"{key}: {value}")

    emit(data, as_json, human)
