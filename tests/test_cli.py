"""The edgellm command against a real daemon, and without one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODEL, Daemon, wait_for


def test_ask_streams_an_answer(daemon: Daemon) -> None:
    r = daemon.cli("ask", "Why is the sky blue?", "--max-tokens", "12", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    with daemon.client() as c:
        plain = c.chat(
            [{"role": "user", "content": "Why is the sky blue?"}], max_tokens=12, temperature=0
        )
    assert r.stdout.strip() == plain["choices"][0]["message"]["content"].strip()
    assert "[finished: length]" in r.stderr


def test_ask_json_and_system_prompt(daemon: Daemon) -> None:
    r = daemon.cli(
        "ask",
        "Hi",
        "--json",
        "--max-tokens",
        "3",
        "--temperature",
        "0",
        "--system",
        "Answer briefly.",
    )
    body = json.loads(r.stdout)
    assert body["usage"]["completion_tokens"] == 3 and body["object"] == "chat.completion"


def test_ps_status_and_models(daemon: Daemon) -> None:
    daemon.cli("ask", "Hi", "--max-tokens", "1")
    ps = json.loads(daemon.cli("ps", "--json").stdout)
    assert ps[0]["name"] == MODEL
    assert MODEL in daemon.cli("ps").stdout
    status = daemon.cli("status")
    assert status.returncode == 0 and "ready" in status.stdout
    listed = json.loads(daemon.cli("models", "list", "--json").stdout)
    assert [m["name"] for m in listed["models"]] == [MODEL]
    shown = json.loads(daemon.cli("models", "show", MODEL).stdout)
    assert shown["sha256"].startswith("b179c952")
    assert json.loads(daemon.cli("requests", "list", "--json").stdout) == []


def test_models_add_load_unload_rm(daemon: Daemon, model_file: Path, tmp_path: Path) -> None:
    added = daemon.cli("models", "add", str(model_file), "--name", "cli-copy")
    assert added.returncode == 0 and "added cli-copy (llama, Q4_1" in added.stdout
    loaded = daemon.cli("models", "load", "cli-copy", "--keep-alive", "1m")
    assert loaded.returncode == 0 and "loaded cli-copy" in loaded.stdout
    assert "unloaded cli-copy" in daemon.cli("models", "unload", "cli-copy").stdout
    assert daemon.cli("models", "rm", "cli-copy").returncode == 0
    junk = tmp_path / "notes.gguf"
    junk.write_text("shopping list")
    refused = daemon.cli("models", "add", str(junk))
    assert refused.returncode == 1 and "notes.gguf is not a valid GGUF file" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_user_errors_exit_1_with_one_line(daemon: Daemon) -> None:
    r = daemon.cli("ask", "Hi", "--model", "nope")
    assert r.returncode == 1 and r.stderr.strip() == "error: model 'nope' not found"
    r = daemon.cli("requests", "cancel", "req-missing")
    assert r.returncode == 1 and "req-missing" in r.stderr
    assert daemon.cli("ask").returncode == 2  # usage error


def test_no_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    env = {**os.environ, "EDGELLM_SOCKET": str(tmp_path / "none.sock")}
    for args in (["ask", "hi"], ["ps"], ["status"], ["chat"], ["models", "load", MODEL]):
        r = subprocess.run(
            [sys.executable, "-m", "edgellm", *args],
            env=env,
            input="",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1, args
        assert "no edgellm daemon is running" in r.stderr and "edgellm serve" in r.stderr
        assert "Traceback" not in r.stderr


def test_bad_config_stops_serve_with_its_name(tmp_path: Path) -> None:
    cfg = tmp_path / "edgellm.toml"
    cfg.write_text("max_qeue = 3\n")
    r = subprocess.run(
        [sys.executable, "-m", "edgellm", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert f"unknown setting 'max_qeue' (from {cfg})" in r.stderr


def test_models_offline_when_no_daemon(tmp_path: Path, model_file: Path) -> None:
    env = {
        **os.environ,
        "EDGELLM_SOCKET": str(tmp_path / "none.sock"),
        "EDGELLM_STATE_DIR": str(tmp_path / "state"),
        "EDGELLM_VAULT_KEY_FILE": str(tmp_path / "vault.key"),
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgellm", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert cli("models", "pull", MODEL).returncode == 0
    assert cli("models", "add", str(model_file), "--name", "copy").returncode == 0
    listed = json.loads(cli("models", "list", "--json").stdout)
    assert sorted(m["name"] for m in listed["models"]) == ["copy", MODEL]
    assert cli("models", "rm", "copy").returncode == 0
    # the first offline use created the vault and its key, and the model is encrypted
    assert (tmp_path / "vault.key").stat().st_mode & 0o777 == 0o600
    objects = list((tmp_path / "state" / "vault" / "objects").iterdir())
    assert len(objects) == 1 and model_file.read_bytes()[:65536] not in objects[0].read_bytes()
    missing = cli("models", "pull", "no-such-model")
    assert missing.returncode == 1
    assert "no model named 'no-such-model' in the catalog" in missing.stderr


@pytest.mark.timeout(120)
def test_interactive_chat_keeps_history_and_ctrl_c_cancels(daemon: Daemon) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgellm", "chat", "--max-tokens", "2000", "--temperature", "0"],
        env=daemon.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin and proc.stdout
    proc.stdin.write("Tell me a very long story about a dragon.\n")
    proc.stdin.flush()
    with daemon.client() as c:
        wait_for(lambda: any(r["completion_tokens"] > 3 for r in c.requests()), timeout=30)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: stop this answer, stay in the chat
        wait_for(lambda: not c.requests(), timeout=10)  # the cancelled answer left its slot
    proc.stdin.write("/exit\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "[cancelled]" in err and "Traceback" not in err


def test_ask_verbose_prints_the_figures(daemon: Daemon) -> None:
    r = daemon.cli("ask", "Name a colour.", "--max-tokens", "8", "--seed", "1", "--verbose")
    assert r.returncode == 0, r.stderr
    figures = dict(line.split(":", 1) for line in r.stderr.splitlines() if line.count(":") == 1)
    assert int(figures["generated tokens"]) == 8
    assert int(figures["prompt tokens"]) > 5
    assert figures["first token after"].strip().endswith(" ms")
    assert figures["generation rate"].strip().endswith(" tokens/s")


def test_chat_commands_steer_it_and_an_unknown_one_is_never_sent(
    daemon: Daemon, tmp_path: Path
) -> None:
    saved = tmp_path / "talk.json"
    script = "\n".join(
        [
            "/help",
            "/set temperature 0",
            "/set max_tokens 6",
            "/set bogus 1",
            "/set top_k many",
            "/system You answer in one word.",
            "/model no-such-model",
            "/describe the weather",  # a typo of a command: refused, not a prompt
            "Name a colour.",
            "/stats",
            "/set",
            f"/save {saved}",
            "/clear",
            "/save " + str(tmp_path / "empty.json"),
            "/bye",
            "this line is never read",
        ]
    )
    with daemon.client() as c:
        before = len(c.audit(action="models.use", decision="allow", limit=10000))
    r = daemon.cli("chat", input=script + "\n")
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "/set NAME VALUE" in err and "/save FILE" in err and "/exit" in err  # /help
    assert "temperature = 0.0" in err and "max_tokens = 6" in err
    assert "error: no option 'bogus' to set" in err
    assert "error: top_k takes a number (int), not 'many'" in err
    assert "error: model 'no-such-model' not found" in err
    assert "error: unknown command /describe; /help lists them" in err
    assert "generated tokens:  6" in err  # /stats, after the one answer
    assert "  temperature: 0.0" in err  # /set alone lists them
    assert "Traceback" not in err
    talk = json.loads(saved.read_text())
    assert [m["role"] for m in talk["messages"]] == ["system", "user", "assistant"]
    assert talk["messages"][0]["content"] == "You answer in one word."
    assert talk["options"] == {"temperature": 0.0, "max_tokens": 6}
    cleared = json.loads((tmp_path / "empty.json").read_text())
    assert [m["role"] for m in cleared["messages"]] == ["system"]  # /clear keeps it
    with daemon.client() as c:  # exactly one turn reached the model
        assert len(c.audit(action="models.use", decision="allow", limit=10000)) == before + 1


def test_a_refused_turn_leaves_the_chat_as_it_was(daemon: Daemon) -> None:
    script = "/set temperature 5\nHello\n/set temperature default\n/set max_tokens 3\nHi\n/stats\n"
    r = daemon.cli("chat", input=script)
    assert r.returncode == 0, r.stderr
    assert "error: invalid value for 'temperature'" in r.stderr  # the daemon's 400
    assert "generated tokens:  3" in r.stderr  # the next turn went through


def test_small_consistencies(daemon: Daemon) -> None:
    # embed names the kind a GGUF model is
    r = daemon.cli("embed", "-m", MODEL, "hello")
    assert r.returncode == 1
    assert f"{MODEL} is a GGUF model, which generates text" in r.stderr
    assert "embedding model" in r.stderr
    # a URL in EDGELLM_SOCKET is named as such, not taken for a path
    env = {**daemon.env, "EDGELLM_SOCKET": "http://device:8080"}
    wrong = subprocess.run(
        [sys.executable, "-m", "edgellm", "status"], env=env, capture_output=True, text=True
    )
    assert wrong.returncode == 1
    assert "is the path of a Unix socket, not a URL ('http://device:8080')" in wrong.stderr
    assert "--url or EDGELLM_URL" in wrong.stderr
    # audit search -n: the newest N matching rows
    daemon.cli("ask", "Hi", "--max-tokens", "1")
    rows = daemon.cli("audit", "search", "--action", "models.use", "-n", "2", "--json")
    assert rows.returncode == 0, rows.stderr
    found = json.loads(rows.stdout)
    assert len(found) == 2 and found[0]["seq"] < found[1]["seq"]
    everything = json.loads(
        daemon.cli("audit", "search", "--action", "models.use", "--json").stdout
    )
    assert [r["seq"] for r in found] == [r["seq"] for r in everything][-2:]
    # the socket the commands use, for curl
    assert daemon.cli("socket").stdout.strip() == str(daemon.socket)
