"""The ``edgellm`` command: ``edgellm <noun> <verb>``.

Every command but ``serve`` is a client of the socket. ``models pull/add/rm/list``,
``data`` and ``vault`` also work with no daemon running, on the state directory
directly with the vault's key (offline mode). Exit codes: 0 success, 1 a user error
with a one-line message, 2 a usage error.
"""

from edgellm.cli import (  # noqa: F401  (they register)
    access,
    generate,
    models,
    onnx,
    service,
    tui,
    vault,
)
from edgellm.cli.base import main

__all__ = ["main"]
