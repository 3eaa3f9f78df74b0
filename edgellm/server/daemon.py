"""Running the daemon: bind the socket, serve, and drain cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from aiohttp import web

from edgellm.catalog import Catalog, fetch
from edgellm.config import Settings, default_socket_path
from edgellm.errors import ModelNotFound
from edgellm.runtime.manager import Runtime
from edgellm.runtime.store import DirectoryStore
from edgellm.server.app import build_app
from edgellm.server.context import State
from edgellm.server.unix import bind_unix_socket, remove_socket

log = logging.getLogger("edgellm.daemon")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def open_store(settings: Settings) -> DirectoryStore:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return DirectoryStore(settings.state_dir / "models")


def ensure_default_model(settings: Settings, store: DirectoryStore) -> None:
    """Fetch the default model from the catalog if the store does not have it yet."""
    name = settings.default_model
    try:
        store.get(name)
        return
    except ModelNotFound:
        pass
    manifest = Catalog(settings.catalog_dir).get(name)
    log.info("event=pull model=%s source=%s size_mb=%d", name, manifest.describe_source(),
             manifest.size // 2**20)
    path = fetch(manifest, settings.cache_dir)
    store.add_file(path, name, expected_sha256=manifest.sha256,
                   info={"source": manifest.describe_source(), "license": manifest.license,
                         "quantization": manifest.quantization})


def serve(settings: Settings, *, pull_default: bool = True) -> int:
    setup_logging(settings.log_level)
    store = open_store(settings)
    if pull_default:
        ensure_default_model(settings, store)
    return asyncio.run(_serve(settings, store))


async def _serve(settings: Settings, store: DirectoryStore) -> int:
    loop = asyncio.get_running_loop()
    sock = bind_unix_socket(settings.socket, settings.socket_mode)
    inode = os.lstat(settings.socket).st_ino
    runtime = Runtime(settings, store)
    state = State(settings=settings, runtime=runtime, store=store)
    runner = web.AppRunner(build_app(state), handler_cancellation=True, access_log=None,
                           shutdown_timeout=settings.shutdown_grace + 5)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("event=ready socket=%s state_dir=%s pid=%d", settings.socket, settings.state_dir,
             os.getpid())
    _banner(settings)
    await stop.wait()

    log.info("event=draining grace_seconds=%.1f active=%d", settings.shutdown_grace,
             runtime.active_count())
    state.draining = True
    await site.stop()  # no new connections; open ones finish their requests
    await loop.run_in_executor(None, runtime.close, settings.shutdown_grace)
    await runner.cleanup()
    remove_socket(Path(settings.socket), inode)
    log.info("event=stopped")
    return 0


def _banner(settings: Settings) -> None:
    if not sys.stdout.isatty():
        return
    sock = settings.socket
    exe = shutil.which("edgellm") or str(Path(sys.executable).parent / "edgellm")
    flag = "" if os.environ.get("EDGELLM_SOCKET") == str(sock) or sock == default_socket_path() \
        else f" --socket {sock}"
    print(f"\nedgellm is serving {settings.default_model} on {sock}\n"
          f"Try:\n  {exe} ask{flag} \"Why is the sky blue?\"\n"
          f"  curl --unix-socket {sock} http://localhost/v1/chat/completions \\\n"
          f"    -H 'Content-Type: application/json' \\\n"
          f"    -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'\n"
          f"Ctrl-C stops it.\n", flush=True)
