"""Access grants and tokens, and the audit log."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from edgellm.cli.base import (
    EdgeError,
    client,
    daemon_or_none,
    emit,
    friendly,
    json_option,
    key_file_option,
    main,
    offline_store,
    socket_option,
    state_dir_option,
    table,
)


@main.group()
def access() -> None:
    """Who may use the appliance: roles granted to users, groups and tokens."""


subject_arg = click.argument("subject")
role_arg = click.argument(
    "role",
    type=click.Choice(["admin", "operator", "auditor", "client", "data-reader", "data-writer"]),
)
model_option = click.option(
    "--model", "-m", default=None, help="For client grants: the model (default: * for all)."
)
data_option = click.option(
    "--data",
    default=None,
    help="For data grants: a data name, or a prefix ending in / or * (default: * for all).",
)


def _scope(model: str | None, data: str | None) -> str:
    if model and data:
        raise EdgeError("give --model (client grants) or --data (data grants), not both")
    return model or data or "*"


@access.command("grant")
@subject_arg
@role_arg
@model_option
@data_option
@socket_option
@friendly
def access_grant(
    subject: str, role: str, model: str | None, data: str | None, socket: str | None
) -> None:
    """Grant ROLE to SUBJECT (user:NAME, group:NAME, uid:N or token:NAME)."""
    with client(socket) as c:
        g = c.grant(subject, role, _scope(model, data))
    click.echo(
        f"granted {g['role']} to {g['subject']}"
        + (f" on {g['scope']}" if g["role"] in ("client", "data-reader", "data-writer") else "")
    )


@access.command("revoke")
@subject_arg
@role_arg
@model_option
@data_option
@socket_option
@friendly
def access_revoke(
    subject: str, role: str, model: str | None, data: str | None, socket: str | None
) -> None:
    """Take a grant back."""
    with client(socket) as c:
        c.revoke(subject, role, _scope(model, data))
    click.echo(f"revoked {role} from {subject}")


@access.command("list")
@socket_option
@json_option
@friendly
def access_list(socket: str | None, as_json: bool) -> None:
    """Every grant (root and the daemon's own user are admins without one)."""
    with client(socket) as c:
        rows = c.grants()
    emit(
        rows,
        as_json,
        lambda rs: (
            table([[r["subject"], r["role"], r["scope"]] for r in rs], ["SUBJECT", "ROLE", "SCOPE"])
            if rs
            else click.echo("no grants (only root and the daemon's user can do anything)")
        ),
    )


@access.command("whoami")
@socket_option
@json_option
@friendly
def access_whoami(socket: str | None, as_json: bool) -> None:
    """Who the daemon sees you as, and what you hold."""
    with client(socket) as c:
        me = c.whoami()

    def human(d: dict[str, Any]) -> None:
        click.echo(
            f"{d['user'] or 'uid ' + str(d['uid'])} (uid {d['uid']}, pid {d['pid']}), "
            f"groups: {', '.join(d['groups']) or '-'}"
        )
        roles = d["roles"]
        click.echo(
            "roles: "
            + (", ".join(f"{r} ({', '.join(m)})" for r, m in roles.items()) if roles else "none")
        )

    emit(me, as_json, human)


@access.command("token")
@click.argument("name")
@click.option("--expires", help="Stop working after this long (e.g. 30d, 12h); default never.")
@click.option(
    "--value-from-stdin",
    is_flag=True,
    help="Take the token's value from stdin (the same token on every device of a fleet).",
)
@socket_option
@friendly
def access_token(
    name: str, expires: str | None, value_from_stdin: bool, socket: str | None
) -> None:
    """Create a bearer token NAME (shown once; replaces one of that name); grant roles
    to token:NAME."""
    value = sys.stdin.readline().strip() if value_from_stdin else None
    with client(socket) as c:
        t = c.create_token(name, expires, value)
    click.echo(t["token"])
    click.echo(f"grant it roles as {t['subject']}; send it as 'Authorization: Bearer …'", err=True)


@access.command("tokens")
@socket_option
@json_option
@friendly
def access_tokens(socket: str | None, as_json: bool) -> None:
    """The bearer tokens: names, when made, when they expire (never the tokens)."""
    with client(socket) as c:
        tokens = c.tokens()

    def stamp(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) if t else "-"

    emit(
        tokens,
        as_json,
        lambda rows: table(
            [
                [r["name"], stamp(r["created"]), stamp(r["expires"]) if r["expires"] else "never"]
                for r in rows
            ],
            ["NAME", "CREATED (UTC)", "EXPIRES (UTC)"],
        ),
    )


@access.command("revoke-token")
@click.argument("name")
@socket_option
@friendly
def access_revoke_token(name: str, socket: str | None) -> None:
    """Revoke the bearer token NAME: it stops working at once."""
    with client(socket) as c:
        c.revoke_token(name)
    click.echo(f"revoked token {name}")


# --- audit ------------------------------------------------------------------------------------
@main.group()
def audit() -> None:
    """The tamper-evident record of who did what (never prompts or outputs)."""


def _print_audit_lines(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        click.echo(_audit_line(row))


def _audit_line(r: dict[str, Any]) -> str:
    tokens = (
        f" tokens={r['prompt_tokens']}+{r['completion_tokens']}"
        if r.get("completion_tokens") is not None
        else ""
    )
    extra = f" status={r['status']}" if r.get("status") is not None else ""
    finish = f" finish={r['finish_reason']}" if r.get("finish_reason") else ""
    if r.get("tools_offered") is not None:
        finish += f" tools={r['tools_offered']} called={r.get('tools_called') or '-'}"
    return (
        f"{r['seq']:>6} {r['time']} {r['decision']:<7} {r['action'] or '-':<18} "
        f"{r['resource'] or '-'} user={r['user'] or '-'} uid={r['uid']} pid={r['pid']}"
        f"{extra}{tokens}{finish}"
    )


@audit.command("tail")
@click.option("-n", "count", default=20, show_default=True, help="How many rows.")
@socket_option
@json_option
@friendly
def audit_tail(count: int, socket: str | None, as_json: bool) -> None:
    """The newest rows."""
    with client(socket) as c:
        rows = list(reversed(c.audit(limit=count, order="newest")))
    emit(rows, as_json, _print_audit_lines)


@audit.command("search")
@click.option("--since", help="UTC ISO time, e.g. 2026-11-22T00:00:00Z.")
@click.option("--until")
@click.option("--user")
@click.option("--action", help="e.g. models.use, models.load, access.manage.")
@click.option("--decision", type=click.Choice(["allow", "deny", "outcome"]))
@click.option("--model", "-m")
@click.option("-n", "count", type=click.IntRange(min=1), help="Only the newest N matching rows.")
@socket_option
@json_option
@friendly
def audit_search(
    since: str | None,
    until: str | None,
    user: str | None,
    action: str | None,
    decision: str | None,
    model: str | None,
    count: int | None,
    socket: str | None,
    as_json: bool,
) -> None:
    """Rows matching every filter given, oldest first."""
    filters = {
        "since": since,
        "until": until,
        "user": user,
        "action": action,
        "decision": decision,
        "model": model,
    }
    with client(socket) as c:
        if count is None:
            rows = c.audit(**filters)
        else:
            rows = list(reversed(c.audit(**filters, limit=count, order="newest")))
    emit(rows, as_json, _print_audit_lines)


@audit.command("export")
@socket_option
@friendly
def audit_export(socket: str | None) -> None:
    """Every row as JSON lines, oldest first (MACs included, for offline checking)."""
    with client(socket) as c:
        for row in c.audit():
            click.echo(json.dumps(row, separators=(",", ":")))


@audit.command("verify")
@socket_option
@state_dir_option
@key_file_option
@click.option(
    "--offline",
    is_flag=True,
    help="Read the state directory here, with the key, even if a daemon runs.",
)
@friendly
def audit_verify(
    socket: str | None, state_dir: str | None, key_file: str | None, offline: bool
) -> None:
    """Check the whole HMAC chain and the signed head; name the first row that was
    tampered with, or the rows deleted from the end. Through the daemon when one runs;
    otherwise (or with --offline) on a state directory, a copied one too, with its key."""
    c = None if offline else daemon_or_none(socket)
    if c is not None:
        with c:
            result = c.audit_verify()
    else:
        result = offline_store(state_dir, key_file, create=False, upgrade=False).audit.verify()
    if not result["ok"]:
        where = f" at row {result['first_bad']}" if result["first_bad"] else ""
        raise EdgeError(f"audit chain broken{where}: {result['problem']}")
    cp = result.get("checkpoint")
    click.echo(
        f"audit chain intact: {result['rows']} rows"
        + (
            f" after a signed checkpoint at row {cp['seq']} ({cp['pruned']} rows pruned "
            f"by retention)"
            if cp
            else ""
        )
    )


@audit.command("prune")
@click.option(
    "--older-than",
    "days",
    type=click.IntRange(min=0),
    help="Delete rows older than this many days.",
)
@click.option("--keep-rows", type=click.IntRange(min=0), help="Keep only the newest N rows.")
@socket_option
@friendly
def audit_prune(days: int | None, keep_rows: int | None, socket: str | None) -> None:
    """Retention by hand (the daemon also prunes hourly by audit_keep_days/_rows); a
    signed checkpoint keeps what remains verifiable."""
    if days is None and keep_rows is None:
        raise click.UsageError("give --older-than DAYS and/or --keep-rows N")
    with client(socket) as c:
        result = c.audit_prune(older_than_days=days, keep_rows=keep_rows)
    click.echo(f"pruned {result['pruned']} row(s)")
