"""`edgellm service install | uninstall | status`: deploy the appliance under systemd.

An install is a list of steps, each described in words, so `--dry-run` prints exactly
what a real run does. `--root DIR` installs into another root (an image being built,
or a test), as systemd's own tools do; then nothing is started.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgellm import progress
from edgellm.errors import ServiceError

UNIT_DIR = "etc/systemd/system"
FILES = {  # template in systemd/ → where it goes
    "edgellm.service": f"{UNIT_DIR}/edgellm.service",
    "edgellm.socket": f"{UNIT_DIR}/edgellm.socket",
    "edgellm.sysusers": "etc/sysusers.d/edgellm.conf",
    "edgellm.tmpfiles": "etc/tmpfiles.d/edgellm.conf",
}
KEY_FILE = "etc/edgellm/vault.key"
KEY_CRED = "etc/edgellm/vault-key.cred"
CONFIG = "etc/edgellm/edgellm.toml"
STATE = "var/lib/edgellm"
DEFAULT_CONFIG = """\
# edgellm's settings under systemd; the unit sets the socket and the state directory.
# Every key is documented in the README (Configuration). Apply with
# `systemctl reload edgellm` (what cannot change live is named in the journal).
keep_alive = "10m"
max_queue = 16
n_parallel = 4
# preload = ["smollm2-135m-instruct"]   # loaded and pinned before the service is ready
"""


def each(*calls: Callable[[], object]) -> Callable[[], None]:
    """One step made of several calls, made in order."""

    def run() -> None:
        for call in calls:
            call()

    return run


@dataclass
class Step:
    what: str
    do: Callable[[], object]


def _templates() -> Path:
    packaged = Path(str(resources.files("edgellm"))) / "_systemd"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "systemd"


def _run(*cmd: str, stdin: bytes | None = None) -> None:
    proc = subprocess.run(cmd, input=stdin, capture_output=True)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise ServiceError(f"{' '.join(cmd[:2])} failed: {err[-1] if err else proc.returncode}")


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def default_exec() -> Path | None:
    """The edgellm command of this environment, if the sandbox lets the service run it
    (ProtectHome= and PrivateTmp= hide /home, /root and /tmp)."""
    exe = Path(sys.executable).parent / "edgellm"
    hidden = ("/home/", "/root/", "/tmp/", "/var/tmp/")
    return exe if exe.exists() and not str(exe).startswith(hidden) else None


def install_steps(
    root: Path,
    exec_path: Path | None,
    prefix: Path,
    key_file: Path | None,
    gpu: bool,
    model: str,
    tcp: str | None = None,
) -> list[Step]:
    live = root == Path("/")
    steps: list[Step] = []
    edgellm = exec_path or default_exec()
    if edgellm is None:
        venv = prefix / "venv"
        source = Path(__file__).resolve().parent.parent
        # the appliance: the server and the TUI beside the client
        spec = (str(source) if (source / "pyproject.toml").exists() else "edgellm") + "[server,tui]"
        edgellm = venv / "bin" / "edgellm"
        steps.append(
            Step(
                f"create {venv} and install edgellm from {spec} into it",
                each(
                    lambda: _run(sys.executable, "-m", "venv", str(root / venv.relative_to("/"))),
                    lambda: _run(
                        str(root / venv.relative_to("/") / "bin" / "pip"), "install", "-q", spec
                    ),
                ),
            )
        )
    templates = _templates()
    for name, target in FILES.items():
        text = (templates / name).read_text().replace("@EDGELLM@", str(edgellm))
        steps.append(Step(f"write /{target}", _writer(root / target, text, 0o644)))
    if gpu:
        steps.append(
            Step(
                f"write /{UNIT_DIR}/edgellm.service.d/gpu.conf (GPU devices)",
                _writer(
                    root / UNIT_DIR / "edgellm.service.d/gpu.conf",
                    (templates / "gpu.conf").read_text(),
                    0o644,
                ),
            )
        )
    if tcp is not None:  # systemd binds it; the service keeps PrivateNetwork=yes
        socket_unit = (templates / "edgellm-tcp.socket").read_text().replace("@ADDRESS@", tcp)
        steps += [
            Step(
                f"write /{UNIT_DIR}/edgellm-tcp.socket (TCP on {tcp})",
                _writer(root / UNIT_DIR / "edgellm-tcp.socket", socket_unit, 0o644),
            ),
            Step(
                f"write /{UNIT_DIR}/edgellm.service.d/tcp.conf (the service takes it)",
                _writer(
                    root / UNIT_DIR / "edgellm.service.d/tcp.conf",
                    (templates / "tcp.conf").read_text(),
                    0o644,
                ),
            ),
        ]
    steps.append(
        Step(
            "create the user edgellm and the group edgellm-clients (systemd-sysusers)",
            lambda: _run(
                "systemd-sysusers", f"--root={root}", str(root / FILES["edgellm.sysusers"])
            ),
        )
    )
    steps.append(
        Step(
            "create /etc/edgellm and /var/lib/edgellm (systemd-tmpfiles)",
            lambda: _run(
                "systemd-tmpfiles",
                f"--root={root}",
                "--create",
                str(root / FILES["edgellm.tmpfiles"]),
            ),
        )
    )
    if not (root / CONFIG).exists():
        steps.append(
            Step(
                f"write a default /{CONFIG} (root:edgellm 0640)",
                each(
                    lambda: _writer(root / CONFIG, DEFAULT_CONFIG, 0o640)(),
                    lambda: os.chown(root / CONFIG, 0, _ids(root, "edgellm")[1]),
                ),
            )
        )
    key_steps, vault_key = _key_steps(root, key_file, live)
    steps += key_steps
    steps.append(
        Step(
            f"fetch {model} into the vault in /{STATE} (encrypted) and hand it to the edgellm user",
            lambda: _pull(root, model, vault_key()),
        )
    )
    if live and systemd_running():
        steps.append(
            Step(
                "systemctl daemon-reload; enable and start edgellm.socket; enable edgellm.service",
                each(
                    lambda: _run("systemctl", "daemon-reload"),
                    lambda: _run("systemctl", "enable", "--now", "edgellm.socket"),
                    lambda: _run("systemctl", "enable", "edgellm.service"),
                ),
            )
        )
    return steps


def _key_steps(
    root: Path, key_file: Path | None, live: bool
) -> tuple[list[Step], Callable[[], bytes]]:
    """The steps that put the vault key in place, and how to get the key itself
    (the installer creates the vault with it)."""
    if (root / KEY_FILE).exists():
        return [Step("keep the existing vault key", lambda: None)], lambda: (
            root / KEY_FILE
        ).read_bytes()
    if (root / KEY_CRED).exists():

        def unseal() -> bytes:
            proc = subprocess.run(
                ["systemd-creds", "decrypt", "--name=vault-key", str(root / KEY_CRED), "-"],
                capture_output=True,
            )
            if proc.returncode != 0:
                raise ServiceError("cannot unseal the existing vault key with systemd-creds")
            return proc.stdout

        return [Step("keep the existing vault key", lambda: None)], unseal
    if key_file is not None:
        mode = stat.S_IMODE(key_file.stat().st_mode)
        if mode & 0o077:
            raise ServiceError(
                f"{key_file} is readable by others (mode {mode:o}); chmod 600 it first"
            )
        key, source = key_file.read_bytes(), "the key from " + str(key_file)
    else:
        key, source = os.urandom(32), "a new random 256-bit vault key"
    if live and shutil.which("systemd-creds"):
        return [
            Step(
                f"seal {source} with systemd-creds (TPM2 where present) into /{KEY_CRED}"
                " (0600, root only)",
                each(
                    lambda: _run(
                        "systemd-creds",
                        "encrypt",
                        "--name=vault-key",
                        "-",
                        str(root / KEY_CRED),
                        stdin=key,
                    ),
                    # sealed or not, the service's user (group edgellm on /etc/edgellm)
                    # gets no file holding the key: PID 1 reads it for the service
                    lambda: os.chmod(root / KEY_CRED, 0o600),
                ),
            )
        ], lambda: key
    dropin = root / UNIT_DIR / "edgellm.service.d/credential.conf"
    return [
        Step(
            f"write {source} to /{KEY_FILE} (mode 0600, root only)",
            _writer(root / KEY_FILE, key, 0o600),
        ),
        Step(
            f"write /{dropin.relative_to(root)}: LoadCredential= from that file",
            _writer(
                dropin,
                "[Service]\nLoadCredentialEncrypted=\n"
                "LoadCredential=vault-key:/etc/edgellm/vault.key\n",
                0o644,
            ),
        ),
    ], lambda: key


def _writer(path: Path, content: str | bytes, mode: int) -> Callable[[], None]:
    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        os.chmod(path, mode)

    return write


def _pull(root: Path, model: str, key: bytes) -> None:
    from edgellm.catalog import Catalog, fetch, store_pulled
    from edgellm.config import load_settings
    from edgellm.errors import ModelNotFound
    from edgellm.vault.keys import MasterKey
    from edgellm.vault.store import VaultStore

    master = MasterKey(key, "installer")
    vault = root / STATE / "vault"
    store = (
        VaultStore(vault, master) if VaultStore.exists(vault) else VaultStore.create(vault, master)
    )
    manifest = Catalog().get(model)
    try:
        store.get(model)
    except ModelNotFound:
        with progress.shown(f"pulling {model}") as report:
            path = fetch(manifest, load_settings(environ={}).cache_dir, report)
            store_pulled(store, manifest, path, report)
    uid, gid = _ids(root, "edgellm")
    for dirpath, _, files in os.walk(root / STATE):
        os.chown(dirpath, uid, gid)
        for f in files:
            os.chown(os.path.join(dirpath, f), uid, gid)


def _ids(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise ServiceError(f"user {user} was not created in {root}/etc/passwd")


TCP_UNIT = f"{UNIT_DIR}/edgellm-tcp.socket"


def uninstall_steps(root: Path, purge: bool) -> list[Step]:
    live = root == Path("/")
    steps: list[Step] = []
    installed = (root / FILES["edgellm.service"]).exists()
    if live and systemd_running() and installed:
        steps.append(
            Step(
                "stop and disable edgellm.service and its sockets",
                lambda: _run(
                    "systemctl",
                    "disable",
                    "--now",
                    "edgellm.service",
                    "edgellm.socket",
                    *(["edgellm-tcp.socket"] if (root / TCP_UNIT).exists() else []),
                ),
            )
        )
    targets = [*FILES.values(), TCP_UNIT, f"{UNIT_DIR}/edgellm.service.d"]
    for target in targets:
        if (root / target).exists():
            steps.append(Step(f"remove /{target}", _remover(root / target)))
    if live and systemd_running() and installed:
        steps.append(Step("systemctl daemon-reload", lambda: _run("systemctl", "daemon-reload")))
    steps += _account_removals(root)
    if purge:
        for target in (STATE, "var/cache/edgellm", "etc/edgellm"):
            if (root / target).exists():
                steps.append(
                    Step(f"remove /{target} (models, vault key, settings)", _remover(root / target))
                )
    else:
        steps.append(Step(f"keep /{STATE} and /etc/edgellm (--purge removes them)", lambda: None))
    return steps


def _account_removals(root: Path) -> list[Step]:
    """The service's user and its clients' group go with the units (a reinstall makes
    them again and hands the kept state to the new user)."""
    where = [] if root == Path("/") else ["--root", str(root)]
    steps = []
    if _has(root / "etc/passwd", "edgellm"):
        steps.append(Step("remove the user edgellm", lambda: _run("userdel", *where, "edgellm")))
    for group in ("edgellm", "edgellm-clients"):

        def remove(group: str = group) -> None:
            if _has(root / "etc/group", group):  # userdel may have taken edgellm already
                _run("groupdel", *where, group)

        if _has(root / "etc/group", group):
            steps.append(Step(f"remove the group {group}", remove))
    return steps


def _has(table: Path, name: str) -> bool:
    return table.exists() and any(
        line.split(":", 1)[0] == name for line in table.read_text().splitlines()
    )


def _remover(path: Path) -> Callable[[], None]:
    return lambda: shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_steps(steps: list[Step], dry_run: bool, echo: Callable[[str], None]) -> None:
    for step in steps:
        echo(("would " if dry_run else "") + step.what)
        if not dry_run:
            step.do()
