"""What the benchmarks share: the model, daemons, timing and the ratio table."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from edgellm.catalog import Catalog, fetch
from edgellm.config import load_settings
from edgellm.vault.keys import create_key_file
from edgellm.vault.store import VaultStore

MODEL = "smollm2-135m-instruct"


def model_file() -> Path:
    return fetch(Catalog().get(MODEL), load_settings(environ={}).cache_dir)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class PeakRSS:
    """Samples a process's resident memory every 50 ms; keeps the peak (MB)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)
            except psutil.Error:
                return
            time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


class EdgeDaemon:
    """An edgellm daemon in a subprocess, on its own socket and state directory."""

    def __init__(
        self,
        names: tuple[str, ...] = (MODEL,),
        governor: dict[str, Any] | None = None,
        cgroup: Path | None = None,
        **settings: Any,
    ) -> None:
        """``governor`` becomes the ``[governor]`` table; ``cgroup`` is a cgroup
        directory the daemon moves itself into before it starts."""
        self.root = Path(tempfile.mkdtemp(prefix="edgellm-bench-"))
        self.socket = self.root / "edgellm.sock"
        key_file = self.root / "vault.key"
        store = VaultStore.create(self.root / "state" / "vault", create_key_file(key_file))
        for name in names:
            store.add_file(model_file(), name)
        config = self.root / "edgellm.toml"
        lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        if governor:
            lines += ["[governor]"] + [f"{k} = {json.dumps(v)}" for k, v in governor.items()]
        config.write_text("\n".join(lines) + "\n")
        env = {
            **os.environ,
            "EDGELLM_SOCKET": str(self.socket),
            "EDGELLM_STATE_DIR": str(self.root / "state"),
            "EDGELLM_CONFIG": str(config),
            "EDGELLM_VAULT_KEY_FILE": str(key_file),
        }
        command = [sys.executable, "-m", "edgellm", "serve", "--no-pull"]
        if cgroup is not None:
            command = [
                "sh",
                "-c",
                f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"',
                "sh",
                *command,
            ]
        self.log = self.root / "daemon.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the edgellm daemon did not start")
            time.sleep(0.1)

    def http(self, timeout: float = 600) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://edgellm",
            timeout=timeout,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(30)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = [title for _, title in columns]
    body = [[_fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")
