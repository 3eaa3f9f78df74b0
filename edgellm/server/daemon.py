"""Running the daemon: take or bind the socket, serve, tell systemd, reload on SIGHUP,
and drain cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from edgellm import progress
from edgellm.catalog import Catalog, fetch, store_pulled
from edgellm.config import Settings, default_socket_path
from edgellm.errors import EdgeError, ModelNotFound
from edgellm.runtime.manager import Runtime
from edgellm.runtime.source import ModelStore
from edgellm.server.app import build_app
from edgellm.server.context import State
from edgellm.server.limits import PrincipalLimits
from edgellm.server.listener import (
    BadHttpLines,
    ConnectionGuard,
    GuardedSockSite,
    quiet_exhaustion,
    raise_file_limit,
)
from edgellm.server.network import activated_address, bind_tcp, load_certificate, tls_context
from edgellm.server.systemd import Notifier, Watchdog, listen_sockets, watchdog_interval
from edgellm.server.unix import bind_unix_socket, remove_socket
from edgellm.vault.store import VaultStore

log = logging.getLogger("edgellm.daemon")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(BadHttpLines())


def open_store(settings: Settings) -> VaultStore:
    from edgellm.vault.open import open_vault

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return open_vault(settings, allow_locked=True)


def ensure_default_model(settings: Settings, store: ModelStore) -> None:
    """Fetch the default model from the catalog if the store does not have it yet."""
    name = settings.default_model
    try:
        store.get(name)
        return
    except ModelNotFound:
        if getattr(store, "locked", False):
            log.warning('event=pull_skipped model=%s reason="the vault is locked"', name)
            return
    manifest = Catalog(settings.catalog_dir).get(name)
    log.info(
        "event=pull model=%s source=%s size_mb=%d",
        name,
        manifest.describe_source(),
        manifest.size // 2**20,
    )
    with first_pull_progress(name) as report:
        store_pulled(store, manifest, fetch(manifest, settings.cache_dir, report), report)


def first_pull_progress(name: str) -> Any:
    """A bar when ``serve`` runs on a terminal (the first run's 98 MB wait), else log
    lines (a service's journal)."""
    if sys.stderr.isatty():
        return progress.shown(f"pulling {name}")
    return contextlib.nullcontext(progress.LineReport(f"pulling {name}", emit=log.info))


# settings a SIGHUP cannot change: they name things the running daemon holds
RESTART_ONLY = (
    "socket",
    "socket_mode",
    "state_dir",
    "cache_dir",
    "catalog_dir",
    "max_body_bytes",
    "max_connections",
    "max_connections_per_peer",
    "header_timeout",
    "idle_timeout",
    "listen",
    "tls_client_ca_file",
    "allow_plaintext_network",
)


def serve(
    settings: Settings, *, pull_default: bool = True, reload: Callable[[], Settings] | None = None
) -> int:
    setup_logging(settings.log_level)
    store = open_store(settings)
    if pull_default:
        ensure_default_model(settings, store)
    return asyncio.run(_serve(settings, store, reload))


async def _serve(
    settings: Settings, store: VaultStore, reload: Callable[[], Settings] | None
) -> int:
    loop = asyncio.get_running_loop()
    notifier = Notifier()
    activated, activated_tcp = listen_sockets()
    if activated is not None:
        sock, inode = activated, None  # systemd owns the socket file
        log.info("event=socket_activation socket=%s", sock.getsockname())
    else:
        sock = bind_unix_socket(settings.socket, settings.socket_mode)
        inode = os.lstat(settings.socket).st_ino
    network = [(address, bind_tcp(address)) for address in settings.listen]
    network += [(activated_address(s, settings), s) for s in activated_tcp]
    runtime = Runtime(settings, store)
    state = State(settings=settings, runtime=runtime, store=store)
    state.governor = start_governor(state)
    raise_file_limit(settings.max_connections + 256)
    quiet_exhaustion(loop)
    runner = web.AppRunner(
        build_app(state),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=settings.shutdown_grace + 5,
        keepalive_timeout=settings.idle_timeout,
    )
    await runner.setup()
    # pinned models load before we accept: connections wait in the listen backlog
    for name in settings.preload:
        if getattr(store, "locked", False):
            log.warning('event=preload_skipped model=%s reason="the vault is locked"', name)
            continue
        await loop.run_in_executor(None, runtime.load, name, -1.0)

    def guard(server: web.Server) -> ConnectionGuard:
        return ConnectionGuard(
            server,
            settings.max_connections,
            settings.max_connections_per_peer,
            settings.header_timeout,
        )

    sites = [GuardedSockSite(runner, sock, guard)]
    state.tls = tls_context(settings)
    for address, tcp in network:
        sites.append(GuardedSockSite(runner, tcp, guard, state.tls, settings.header_timeout))
        log.info("event=listening address=%s tls=%s", address, state.tls is not None)
    for site in sites:
        await site.start()

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: _reload(state, reload, notifier))
    log.info(
        "event=ready socket=%s state_dir=%s pid=%d",
        settings.socket,
        settings.state_dir,
        os.getpid(),
    )
    notifier.ready(_status_line(state))
    _banner(settings)
    tasks = [
        asyncio.create_task(_report_status(state, notifier)),
        asyncio.create_task(_audit_retention(state)),
    ]
    interval = watchdog_interval()
    if interval and notifier.enabled:
        tasks.append(
            asyncio.create_task(_feed_watchdog(Watchdog(runtime, 2 * interval), notifier, interval))
        )
    await stop.wait()

    notifier.stopping()
    log.info(
        "event=draining grace_seconds=%.1f active=%d",
        state.settings.shutdown_grace,
        runtime.active_count(),
    )
    state.draining = True
    for task in tasks:
        task.cancel()
    for site in sites:
        await site.stop()  # no new connections; open ones finish their requests
    if state.governor is not None:
        state.governor.stop()
    await loop.run_in_executor(None, runtime.close, state.settings.shutdown_grace)
    await runner.cleanup()
    await state.settle_records()
    if inode is not None:
        remove_socket(Path(settings.socket), inode)
    notifier.close()
    log.info("event=stopped")
    return 0


def start_governor(state: State) -> Any:
    """The governor on its own thread, on the real sensors or a replayed trace
    (``EDGELLM_GOVERNOR_TRACE`` or ``governor.trace``); None when it is off."""
    from edgellm.governor.governor import Governor
    from edgellm.governor.sensors import SystemSensors
    from edgellm.governor.trace import TraceSensors

    settings = state.settings.governor
    if not settings.enabled:
        log.warning('event=governor_off note="nothing watches memory or heat"')
        return None
    trace = os.environ.get("EDGELLM_GOVERNOR_TRACE") or settings.trace
    sensors = TraceSensors(Path(trace)) if trace else SystemSensors()

    def record(**fields: Any) -> None:
        if state.audit is not None:
            state.audit.append(user="edgellm-governor", **fields)

    governor = Governor(settings, state.runtime, sensors, record=record)
    governor.poll()  # a level before the first request
    governor.start()
    log.info(
        "event=governor_started source=%s poll_seconds=%.2f level=%s",
        f"trace {trace}" if trace else "sensors",
        settings.poll_interval,
        governor.snapshot()["level"],
    )
    return governor


def _status_line(state: State) -> str:
    loaded = state.runtime.loaded()
    busy = sum(m.slots_busy for m in loaded)
    health = "draining" if state.draining else "ready"
    return (
        f"{health}; {len(loaded)} model(s) loaded, {busy} busy slot(s), "
        f"{state.runtime.queue_depth()} queued"
    )


async def _report_status(state: State, notifier: Notifier, every: float = 5.0) -> None:
    last = ""
    while True:
        await asyncio.sleep(every)
        line = _status_line(state)
        if line != last:
            notifier.status(line)
            last = line


async def _audit_retention(state: State, every: float = 3600.0) -> None:
    """Prune the audit log by age and size now and hourly (while unlocked)."""
    loop = asyncio.get_running_loop()
    while True:
        s, audit = state.settings, state.audit
        if audit is not None:
            try:
                await loop.run_in_executor(
                    None, audit.apply_retention, s.audit_keep_days, s.audit_keep_rows
                )
            except EdgeError as exc:
                log.error("event=audit_prune_failed error=%s", exc.message)
        await asyncio.sleep(every)


async def _feed_watchdog(watchdog: Watchdog, notifier: Notifier, interval: float) -> None:
    while True:
        if watchdog.healthy():
            notifier.watchdog()
        else:
            log.error("event=watchdog_withheld stalled=%s", ",".join(watchdog.stalled))
            notifier.status(f"stalled: {', '.join(watchdog.stalled)} made no progress")
        await asyncio.sleep(interval)


def _reload(state: State, reload: Callable[[], Settings], notifier: Notifier) -> None:
    """SIGHUP: read the settings again and apply what can change while running."""
    notifier.reloading()
    try:
        new = reload()
    except EdgeError as exc:
        log.error("event=reload_failed error=%s", exc.message)
        notifier.send("READY=1", f"STATUS=reload failed, old settings kept: {exc.message}")
        return
    old = state.settings
    changed = [k for k in Settings.model_fields if getattr(old, k) != getattr(new, k)]
    needs_restart = [k for k in changed if k in RESTART_ONLY]
    for key in needs_restart:
        setattr(new, key, getattr(old, key))
    state.settings = state.runtime.settings = new
    state.limits = PrincipalLimits(new.limits, state.access)
    state.door.failures_per_minute = new.auth_failures_per_minute
    if state.tls is not None:  # a renewed certificate, for new connections
        try:
            load_certificate(state.tls, new)
            log.info("event=tls_certificate_reloaded file=%s", new.tls_cert_file)
        except EdgeError as exc:
            log.error("event=tls_reload_failed error=%s", exc.message)
    if state.governor is not None:  # new thresholds, at the next poll
        state.governor.settings = new.governor
        state.governor.policy.hold = new.governor.hold
    logging.getLogger().setLevel(new.log_level)
    applied = [k for k in changed if k not in RESTART_ONLY]
    log.info(
        "event=reload applied=%s needs_restart=%s",
        ",".join(applied) or "-",
        ",".join(needs_restart) or "-",
    )
    notifier.send(
        "READY=1",
        "STATUS="
        + (
            f"reloaded; {', '.join(needs_restart)} change(s) need a restart"
            if needs_restart
            else f"reloaded; {_status_line(state)}"
        ),
    )


def _banner(settings: Settings) -> None:
    if not sys.stdout.isatty():
        return
    sock = settings.socket
    exe = shutil.which("edgellm") or str(Path(sys.executable).parent / "edgellm")
    flag = (
        ""
        if os.environ.get("EDGELLM_SOCKET") == str(sock) or sock == default_socket_path()
        else f" --socket {sock}"
    )
    print(
        f"\nedgellm is serving {settings.default_model} on {sock}\n"
        f'Try:\n  {exe} ask{flag} "Why is the sky blue?"\n'
        f"  curl --unix-socket {sock} http://localhost/v1/chat/completions \\\n"
        f"    -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"messages":[{{"role":"user","content":"Hello!"}}]}}\'\n'
        f"Ctrl-C stops it.\n",
        flush=True,
    )
