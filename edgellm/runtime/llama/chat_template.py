"""Chat templates rendered in a child process, bounded in time, memory and output.

A GGUF model carries its chat template (Jinja) and every chat request renders it.
The sandbox keeps a template from reaching the system, but not from looping for
ever or building a string of gigabytes: a model file is code from whoever made it.
So the template runs in a small worker process (``python -m
edgellm.runtime.llama.chat_template``) with an address-space limit; the engine waits for it
at most ``timeout`` seconds, and a worker that overruns is killed and replaced. A
template that fails either way fails that request with a 400, and the model serves
on. One JSON line each way per render: a few hundred microseconds.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import select
import subprocess
import sys
import threading
from datetime import datetime
from typing import Any

from edgellm.errors import InvalidRequest

log = logging.getLogger("edgellm.engine")
WORKER_MEMORY = 1 << 30  # address space of the worker (Python itself takes ~100 MB)
STARTUP_TIMEOUT = 60.0


class TemplateRenderer:
    """One worker for one model's template; called from that model's engine thread."""

    def __init__(
        self, template: str, bos: str, eos: str, timeout: float = 2.0, max_output: int = 1 << 20
    ) -> None:
        self.template, self.bos, self.eos = template, bos, eos
        self.timeout, self.max_output = timeout, max_output
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm.runtime.llama.chat_template"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONNOUSERSITE": "1"},
        )
        assert proc.stdin is not None
        setup = {
            "template": self.template,
            "bos": self.bos,
            "eos": self.eos,
            "max_output": self.max_output,
        }
        proc.stdin.write(json.dumps(setup).encode() + b"\n")
        proc.stdin.flush()
        assert proc.stdout is not None
        # starting Python and compiling the template is not the template's time: wait
        # for it apart, generously (a slow board takes a second or more)
        ready, _, _ = select.select([proc.stdout], [], [], STARTUP_TIMEOUT)
        line = proc.stdout.readline() if ready else b""
        reply = json.loads(line) if line else {"error": "its worker did not start"}
        if "error" in reply:
            proc.kill()
            proc.wait()
            raise InvalidRequest(
                f"the model's chat template cannot be used: {reply['error']}", param="model"
            )
        if not reply.get("memory_capped"):
            log.warning(
                'event=template_memory_uncapped note="setrlimit is not allowed here; '
                'chat templates are bounded in time and output only"'
            )
        return proc

    def start(self) -> None:
        """Start the worker now (at model load), so the first request does not wait."""
        with self._lock:
            if self._proc is None:
                self._proc = self._start()

    def render(self, messages: list[dict[str, Any]], **extra: Any) -> str:
        """The prompt text, or InvalidRequest naming what went wrong."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps({"messages": messages, **extra}).encode() + b"\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self._kill()
                raise InvalidRequest(
                    "the model's chat template could not be run (its worker exited)",
                    param="messages",
                ) from None
            ready, _, _ = select.select([proc.stdout], [], [], self.timeout)
            line = proc.stdout.readline() if ready else b""
            if not line:
                overran = not ready
                self._kill()
                if overran:
                    raise InvalidRequest(
                        f"the model's chat template took longer than {self.timeout:g}s to "
                        "render these messages; it was stopped",
                        param="messages",
                    )
                raise InvalidRequest(
                    "the model's chat template ran out of memory (over "
                    f"{WORKER_MEMORY >> 20} MB) rendering these messages",
                    param="messages",
                )
        reply = json.loads(line)
        if "error" in reply:
            raise InvalidRequest(
                f"the chat template rejected the messages: {reply['error']}", param="messages"
            )
        return str(reply["prompt"])

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._kill()


# --- the worker -------------------------------------------------------------------------
def _environment() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        # operators that multiply sizes are checked before they run
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, int) and abs(right) > 1024:
                raise ValueError("exponent too large")
            if operator == "*" and isinstance(left, int | float) and hasattr(right, "__len__"):
                left, right = right, left
            if (
                operator == "*"
                and hasattr(left, "__len__")
                and isinstance(right, int)
                and len(left) * right > LIMIT[0]
            ):
                raise ValueError("a repeated string or list larger than the output limit")
            return super().call_binop(context, operator, left, right)

    return Bounded(trim_blocks=True, lstrip_blocks=True)


LIMIT = [1 << 20]


def _worker() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
        capped = True
    except (OSError, ValueError):  # a sandbox that forbids it: time and output still hold
        capped = False
    setup = json.loads(sys.stdin.readline())
    LIMIT[0] = setup["max_output"]
    out = sys.stdout
    try:
        template = _environment().from_string(setup["template"])
    except Exception as exc:
        out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]}) + "\n")
        return
    out.write(json.dumps({"ready": True, "memory_capped": capped}) + "\n")
    out.flush()

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    def strftime_now(fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
        return datetime.now().strftime(fmt)

    for line in sys.stdin:
        request = json.loads(line)
        try:
            parts, size = [], 0
            for piece in template.generate(
                bos_token=setup["bos"],
                eos_token=setup["eos"],
                add_generation_prompt=True,
                raise_exception=raise_exception,
                strftime_now=strftime_now,
                **request,
            ):
                size += len(piece)
                if size > LIMIT[0]:
                    raise ValueError(f"its output is longer than {LIMIT[0]} characters")
                parts.append(piece)
            reply: dict[str, Any] = {"prompt": "".join(parts)}
        except MemoryError:
            reply = {"error": f"it ran out of memory (over {WORKER_MEMORY >> 20} MB)"}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    _worker()
