"""Who is on the other end of a Unix-socket connection, as the kernel says (SO_PEERCRED),
and the executable that process runs."""

from __future__ import annotations

import os
import socket
import struct
import weakref
from typing import Any

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket | None) -> dict[str, Any]:
    if sock is None or sock.family != socket.AF_UNIX:
        return {}
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    except OSError:
        return {}
    pid, uid, gid = _CRED.unpack(raw)
    return {"pid": pid, "uid": uid, "gid": gid, "exe": executable(pid)}


def executable(pid: int | None) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe") if pid else ""
    except OSError:
        return ""


# a connection's peer, as the kernel recorded it when the peer connected, and the
# executable it was running then: looked up once per connection, not per request
_peers: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def connection_peer(transport: Any) -> dict[str, Any]:
    """The peer of an asyncio transport (empty when there is none or it is not Unix)."""
    if transport is None:
        return {}
    creds = _peers.get(transport)
    if creds is None:
        creds = _peers[transport] = peer_credentials(transport.get_extra_info("socket"))
    return creds
