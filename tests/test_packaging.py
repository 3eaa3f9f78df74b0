"""The client alone: `pip install edgellm` (no extras) is the Python client and the
`edgellm` command, with nothing to build. Proven by running them in an interpreter
where every package of the server and TUI extras fails to import, against a real
daemon; a command that needs the appliance says which extra to install."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from edgellm.cli.base import SERVER_MODULES

from conftest import Daemon

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = sorted(SERVER_MODULES | {"textual"})
# an interpreter in which the extras' packages are not there
PRELUDE = f"""
import sys
BLOCKED = {BLOCKED!r}
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NotInstalled())
"""


def _client_only(code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + code, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_the_base_install_is_the_client_and_the_extras_the_appliance() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {d.split(">")[0].split("[")[0] for d in project["dependencies"]}
    assert base == {"httpx", "pydantic", "platformdirs", "click", "rich"}  # all pure Python
    server = {d.split(">")[0] for d in project["optional-dependencies"]["server"]}
    assert "llama-cpp-python" in server and "aiohttp" in server
    assert project["optional-dependencies"]["tui"] == ["textual>=8.0"]


def test_the_client_and_the_cli_work_without_the_server_extras(daemon: Daemon) -> None:
    sock = str(daemon.socket)
    used = _client_only(
        "from edgellm.client import Client\n"
        "with Client(sys.argv[1]) as c:\n"
        "    print(c.health()['status'])\n"
        "    print(c.chat([{'role': 'user', 'content': 'Hi'}], max_tokens=3)['usage']"
        "['completion_tokens'])\n"
        "print(sorted(m for m in BLOCKED if m in sys.modules))\n",
        sock,
    )
    assert used.returncode == 0, used.stderr
    assert used.stdout.split("\n")[:3] == ["ready", "3", "[]"]
    cli = "import runpy; sys.argv = ['edgellm', *sys.argv[1:]]; runpy.run_module('edgellm')"
    status = _client_only(cli, "status", "--socket", sock)
    assert status.returncode == 0 and "ready" in status.stdout, status.stderr
    asked = _client_only(cli, "ask", "--max-tokens", "3", "--socket", sock, "Hi")
    assert asked.returncode == 0 and asked.stdout.strip(), asked.stderr
    for command, extra in [("serve", "server"), ("tui", "tui")]:
        refused = _client_only(cli, command, "--socket", sock)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert f"pip install 'edgellm[{extra}]'" in refused.stderr
    assert daemon.alive()
