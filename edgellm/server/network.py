"""The opt-in network listener: TCP sockets, TLS, and who a network caller is.

On the Unix socket the kernel says who is calling (SO_PEERCRED). On TCP nothing
does, so every request must carry a bearer token (``Authorization: Bearer edg_…``,
as the openai SDK sends its API key) or, under mutual TLS, a client certificate
signed by the configured CA; its common name is the subject ``cert:NAME`` (beside
a certificate, a token that is not valid adds nothing). Neither: 401. An address
that keeps failing (``auth_failures_per_minute``) is answered 429 with Retry-After
until its minute is over, without its tokens being looked at, so guessing is slow;
each failure is audited.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import time
from collections import deque
from typing import Any

from edgellm.config import Settings, listen_address
from edgellm.errors import ConfigError, TooManyRequests, Unauthorized
from edgellm.vault.access import AccessPolicy, Principal

log = logging.getLogger("edgellm.server")
WINDOW = 60.0  # seconds over which failures are counted


def bind_tcp(address: str) -> socket.socket:
    host, port = listen_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def activated_address(sock: socket.socket, settings: Settings) -> str:
    """A TCP socket systemd passed in, as tcp://HOST:PORT; ConfigError if it is off
    loopback and would serve without TLS (the same rule as ``listen``)."""
    host, port = sock.getsockname()[:2]
    address = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
    plaintext = settings.tls_cert_file is None and not settings.allow_plaintext_network
    if plaintext and not ipaddress.ip_address(host).is_loopback:
        raise ConfigError(
            f"systemd passed a TCP socket on {address}, reachable from the network, "
            "and without TLS its tokens and prompts would cross it in the clear: set "
            "tls_cert_file and tls_key_file, or allow_plaintext_network = true"
        )
    return address


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context from its certificate and key files (None: plaintext);
    with ``tls_client_ca_file``, clients must present a certificate that CA signed."""
    if settings.tls_cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_certificate(context, settings)
    if settings.tls_client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(settings.tls_client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"tls_client_ca_file {settings.tls_client_ca_file} cannot be read as PEM "
                f"certificates: {exc}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def load_certificate(context: ssl.SSLContext, settings: Settings) -> None:
    """(Re)load the certificate and key: new connections get them, open ones keep theirs."""
    try:
        context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"the TLS certificate {settings.tls_cert_file} and key {settings.tls_key_file} "
            f"cannot be loaded: {exc}"
        ) from None


def is_network(transport: Any) -> bool:
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)


def certificate_name(transport: Any) -> str | None:
    """The common name of the client's verified certificate (mutual TLS), if any."""
    cert = transport.get_extra_info("peercert") if transport is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class NetworkDoor:
    """Makes a network caller's principal, or refuses it (401, or 429 while its
    address is over the failure limit)."""

    def __init__(self, failures_per_minute: int) -> None:
        self.failures_per_minute = failures_per_minute
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._failures.setdefault(address, deque())
        while times and times[0] <= now - WINDOW:
            times.popleft()
        return times

    def check_address(self, address: str) -> None:
        times = self._recent(address, time.monotonic())
        if len(times) >= self.failures_per_minute:
            wait = max(1.0, times[0] + WINDOW - time.monotonic())
            raise TooManyRequests(
                f"{len(times)} failed authentications from {address} within a minute; "
                f"try again in {wait:.0f}s with a valid token",
                param="Authorization",
                retry_after=wait,
            )

    def failed(self, address: str) -> None:
        self._recent(address, time.monotonic()).append(time.monotonic())
        if len(self._failures) > 10_000:  # a scan from many addresses: forget the idle
            for key in [k for k, v in self._failures.items() if not v]:
                del self._failures[key]

    def principal(
        self, transport: Any, token: str | None, policy: AccessPolicy | None
    ) -> Principal:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        self.check_address(address)
        principal = Principal(uid=None, address=address, cert=certificate_name(transport))
        if policy is None:
            raise Unauthorized("this daemon has no access policy to check network callers")
        if token is not None:
            name, expired = policy.find_token(token)
            if principal.cert is not None and (name is None or expired):
                # the certificate says who it is: an unknown token adds nothing, as on
                # the socket (the openai SDK always sends some api_key)
                return principal
            if name is None or expired:
                self.failed(address)
                why = "has expired" if expired else "is not valid (unknown or revoked)"
                raise Unauthorized(
                    f"the bearer token {why}; ask the appliance's operator for one "
                    "(edgellm access token NAME)",
                    param="Authorization",
                )
            principal.token = name
        elif principal.cert is None:
            self.failed(address)
            raise Unauthorized(
                "this listener needs a bearer token: send Authorization: Bearer edg_… "
                "(the openai SDK's api_key); the operator makes one with "
                "`edgellm access token NAME`",
                param="Authorization",
            )
        return principal
