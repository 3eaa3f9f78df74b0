"""The README's examples, run as written: every ``sh`` and ``python`` block, against a
real daemon listening where a fresh install puts it (the runtime directory; nothing
points the examples at it), each in a shell or interpreter of its own, in the order
the README gives them. A block that cannot run here says why, in a comment the reader
sees above it; this test holds every other block to exit 0 with no traceback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_RUN = "<!-- not run by tests/test_readme.py:"
BLOCK = re.compile(
    r"(?P<note><!-- not run by tests/test_readme\.py:(?P<why>.*?)-->\n)?"
    r"^```(?P<lang>sh|python)\n(?P<code>.*?)^```",
    re.S | re.M,
)
# the reader's machine has sudo; a root shell here may not
SHELL_PRELUDE = 'command -v sudo >/dev/null || sudo() { "$@"; }\n'


def examples() -> list[tuple[int, str, str, str | None]]:
    text = README.read_text()
    return [
        (text.count("\n", 0, m.start("code")) + 1, m["lang"], m["code"], m["why"])
        for m in BLOCK.finditer(text)
    ]


RUN = [(line, lang, code) for line, lang, code, why in examples() if why is None]


def test_every_example_runs_or_says_why_not() -> None:
    blocks = examples()
    text = README.read_text()
    assert len(blocks) == len(re.findall(r"^```(?:sh|python)\n", text, re.M))
    skipped = [(line, why) for line, _, _, why in blocks if why is not None]
    assert all(why.strip() for _, why in skipped)
    assert len(RUN) >= 11  # all but the setup, benchmarks, service and network ones
    assert text.count(NOT_RUN) == len(skipped)  # every note sits on a block


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[Any]:
    """A daemon where a fresh install puts its socket, and the environment a user's
    shell would have: the venv's commands on PATH, no EDGELLM_SOCKET."""
    root = tmp_path_factory.mktemp("readme")
    d = Daemon(root, model_file)
    runtime = root / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    d.socket = runtime / "edgellm" / "edgellm.sock"  # the default for this runtime dir
    d.extra_env["XDG_RUNTIME_DIR"] = str(runtime)
    d.start()
    env = {k: v for k, v in d.env.items() if k != "EDGELLM_SOCKET"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    work = root / "work"
    work.mkdir()
    yield env, work
    d.stop(signal.SIGTERM)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("line", "lang", "code"), RUN, ids=[f"line-{r[0]}" for r in RUN])
def test_the_example_runs_as_written(installed: Any, line: int, lang: str, code: str) -> None:
    env, work = installed
    if lang == "sh":
        command = ["bash", "-euo", "pipefail", "-c", SHELL_PRELUDE + code]
    else:
        command = [sys.executable, "-c", code]
    done = subprocess.run(
        command,
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    shown = f"README line {line}:\n{code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, shown
    assert "Traceback" not in done.stderr, shown
    if "print(" in code or "curl" in code or "edgellm ask" in code:
        assert done.stdout.strip(), shown
