"""A real systemd, booted in a Debian container, to test the service end to end.

The root filesystem is a minimal Debian 12 made by debootstrap once and cached in
``ROOTFS`` (the first run takes a few minutes); each run boots an overlay over it,
so the cache stays pristine. systemd-nspawn runs in a private mount namespace with
a tmpfs over ``/run/systemd``, which keeps its state off the host (whose PID 1 is not
systemd: other tests look for ``/run/systemd/system``). There is no machined and no
host D-Bus here, so the container is reached with ``nsenter`` into its PID 1. A
reboot inside ends nspawn with status 133; the loop starts it again on the same
overlay, as a device would boot again on the same disk.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

ROOTFS = Path("/var/cache/edgellm-tests/rootfs-bookworm")
# what the minimal Debian has, and libgomp1: llama.cpp built from source links
# OpenMP's runtime (a device that builds it has it from build-essential)
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,libpam-systemd,libgomp1"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = ("systemd-nspawn", "debootstrap", "unshare", "nsenter")


def cannot_boot() -> str | None:
    """Why this host cannot boot a container, or None."""
    if os.geteuid() != 0:
        return "booting a container needs root"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)} (tests/system-packages.sh installs them as root)"
    if not Path("/proc/self/ns/mnt").exists():
        return "no mount namespaces on this kernel"
    return None


def apt_mirror() -> str:
    """The host's own Debian mirror (the only one these machines may reach)."""
    for source in (
        Path("/etc/apt/sources.list.d/debian.sources"),
        Path("/etc/apt/sources.list"),
    ):
        if source.exists():
            m = re.search(r"(?:URIs:\s*|deb\s+)(https?://\S+/debian)\b", source.read_text())
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


def ensure_rootfs() -> Path:
    """The cached minimal Debian 12, made now if missing (atomically: a run cut short
    leaves no half-made cache)."""
    if (ROOTFS / "usr/lib/systemd/systemd").exists():
        return ROOTFS
    part = ROOTFS.with_name(ROOTFS.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(part)]
        + [apt_mirror()],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"debootstrap failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    part.rename(ROOTFS)
    return ROOTFS


class Booted:
    """One container: its overlay's directories under ``base``, nspawn restarted on
    reboot until it powers off."""

    def __init__(self, base: Path, rootfs: Path, binds: dict[Path, str]) -> None:
        self.base = base
        self.upper = base / "upper"  # what the container wrote, seen from the host
        for d in ("upper", "work", "merged"):
            (base / d).mkdir(parents=True, exist_ok=True)
        bind = " ".join(f"--bind-ro={shlex.quote(f'{h}:{c}')}" for h, c in binds.items())
        merged = shlex.quote(str(base / "merged"))
        self.script = f"""
set -e
mount -t tmpfs tmpfs /run/systemd
mount -t overlay overlay -o lowerdir={rootfs},upperdir={self.upper},workdir={base}/work {merged}
while :; do
  rc=0
  systemd-nspawn -q -D {merged} -b --register=no --keep-unit --console=pipe \\
      --private-network {bind} || rc=$?
  echo "edgellm-test: nspawn exited $rc"
  [ "$rc" -eq 133 ] || exit "$rc"
done
"""
        self.proc: subprocess.Popen[bytes] | None = None
        self.console = base / "console.log"

    def start(self) -> None:
        with self.console.open("ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "bash", "-c", self.script],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def pid1(self, timeout: float = 60) -> int:
        """The container's systemd, as the host numbers it (new after each boot)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for nspawn in _children(self.proc.pid):
                for child in _children(nspawn):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return child
            if self.proc.poll() is not None:
                raise RuntimeError(f"the container stopped: {self.console.read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"no systemd in the container: {self.console.read_text()[-2000:]}")

    def sh(
        self, command: str, user: str | None = None, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """A shell command inside, as root or as ``user`` (a login-less runuser), with a
        clean environment."""
        home = "/root" if user is None else f"/home/{user}"
        argv = ["nsenter", "-t", str(self.pid1()), "-a", "env", "-i", f"PATH={PATH}"]
        if user is not None:
            argv += ["runuser", "-u", user, "--", "env"]
        argv += [f"HOME={home}", "LANG=C.UTF-8", "bash", "-c", command]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"in the container{' as ' + user if user else ''}: {command!r} exited "
                f"{proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
            )
        return proc

    def wait_booted(self, timeout: float = 120) -> str:
        """Wait for the boot to finish; 'running', or 'degraded' with the failed units."""
        deadline = time.monotonic() + timeout
        out = ""
        # empty: PID 1 not listening yet; "offline": so early that PID 1 has not yet made
        # /run/systemd/system, by which systemctl knows it runs under systemd (sd_booted)
        while out in ("", "offline") and time.monotonic() < deadline:
            state = self.sh("systemctl is-system-running --wait", check=False, timeout=timeout)
            out = state.stdout.strip()
            time.sleep(0.2)
        if out != "running":
            failed = self.sh("systemctl --failed --no-legend", check=False).stdout
            out += f" (failed: {failed.strip()})"
        return out

    def reboot(self) -> None:
        before = self.pid1()
        self.sh("systemctl reboot", check=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if self.pid1(timeout=5) != before:
                    return
            except RuntimeError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"no new boot after reboot: {self.console.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.sh("systemctl poweroff", check=False, timeout=30)
            self.proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, RuntimeError):
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []
