"""The daemon's side of systemd: socket activation, sd_notify, and the watchdog.

The notify protocol is a datagram of newline-separated ``KEY=VALUE`` lines sent to
``$NOTIFY_SOCKET`` (a path, or an abstract name when it starts with ``@``); with no
``NOTIFY_SOCKET`` every call is a no-op. Socket activation hands the listening
socket over as fd 3 when ``$LISTEN_PID`` is our pid and ``$LISTEN_FDS`` is 1.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from edgellm.runtime.controls import RuntimeControls

log = logging.getLogger("edgellm.systemd")

SD_LISTEN_FDS_START = 3


def listen_sockets(
    environ: dict[str, str] | None = None,
) -> tuple[socket.socket | None, list[socket.socket]]:
    """The sockets systemd passed us: the Unix socket (or None) and any TCP ones (an
    edgellm-tcp.socket beside edgellm.socket; they reach a service that has no network
    of its own, PrivateNetwork=yes). Consumes the variables, as
    sd_listen_fds(unset_environment=1) does, so children do not inherit them."""
    env = os.environ if environ is None else environ
    try:
        pid, count = int(env.get("LISTEN_PID", "0")), int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return None, []
    if pid != os.getpid() or count < 1:
        return None, []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    unix, tcp = None, []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        if sock.type != socket.SOCK_STREAM:
            raise OSError(f"the socket systemd passed as fd {fd} is not a stream socket")
        if sock.family == socket.AF_UNIX and unix is None:
            unix = sock
        elif sock.family in (socket.AF_INET, socket.AF_INET6):
            tcp.append(sock)
        else:
            raise OSError(
                f"the socket systemd passed as fd {fd} is neither TCP nor the one Unix socket"
            )
    return unix, tcp


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as exc:  # systemd gone (shutdown): nothing to tell
            log.debug("event=notify_failed error=%s", exc)
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading settings")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=draining requests and stopping")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2e6


class Watchdog:
    """Pings only while every busy engine makes progress: a hung llama.cpp call stops
    the pings, and systemd restarts the service after WatchdogSec."""

    def __init__(self, runtime: RuntimeControls, stall_after: float) -> None:
        self.runtime = runtime
        self.stall_after = stall_after
        self.stalled: list[str] = []

    def healthy(self) -> bool:
        self.stalled = self.runtime.stalled_models(self.stall_after)
        return not self.stalled
