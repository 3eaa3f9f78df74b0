"""Creating the listening Unix socket: stale files replaced, a live daemon respected."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from edgellm.errors import AlreadyRunning, Conflict


def bind_unix_socket(path: Path, mode: int = 0o660) -> socket.socket:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise Conflict(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # left by a daemon that died
        except OSError as exc:
            raise Conflict(
                f"cannot tell whether {path} is in use ({exc}); remove it by hand"
            ) from None
        else:
            raise AlreadyRunning(
                f"another edgellm daemon is already serving on {path}; stop it first, "
                "or give this one another --socket"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # never visible with looser permissions than asked
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def remove_socket(path: Path, inode: int) -> None:
    """Remove the socket file only if it is still ours: another daemon may have taken it."""
    with contextlib.suppress(FileNotFoundError):
        if os.lstat(path).st_ino == inode:
            path.unlink()
