"""Test devices with a real systemd: Debian 12 roots booted by systemd-nspawn, reached over SSH on loopback.

One minimal Debian 12 root is built once per machine with debootstrap
(``python -m tests.devices build-root``; CI runs it before pytest) and cached at
``ROOT_DIR`` (``TVMBUNDLE_TEST_ROOT`` overrides it).  It is built in a temporary
folder beside it and renamed into place when complete, so an interrupted build
leaves nothing that looks finished; a stamp file carries ``ROOT_VERSION``.

Each device boots that root with ``--volatile=overlay`` (so many devices share it and
write nothing to it), shares the host's network namespace, and runs its sshd on
``127.0.0.N:PORT`` only (a bound ``sshd_config.d`` file; PORT a free one).  Logins: ``root``, ``pi``
(passwordless sudo through a sudoers.d rule) and ``nosudo`` (no sudo); their
authorized keys are the test session's key, bound read-only into the device.

Several devices share the host's network, so each device's service must listen on
its own loopback address: a drop-in (``tvmbundle@.service.d/10-test-listen.conf`` for every
bundle's instance, ``tvmbundle.service.d/`` for the single-service layout of tvmbundle 0.1)
gives the unit's ExecStart ``--listen 127.0.0.N:PORT``, and the SSH sessions get
``TVM_DEPLOY_LISTEN`` so ``tvm-deploy probe`` asks the same address.  Everything
else (the unit, ``DynamicUser``, the hardening, ``systemctl``) is the real thing.
A device made with ``own_listen=True`` has neither: its bundles are built to listen on its
address (``make --listen``), each on a port of its own, as several bundles of one device are.

A device made with ``persistent=True`` boots a copy of the root of its own instead of the volatile
overlay, so what it wrote survives it: ``kill()`` cuts its power (SIGKILL to its init, which kills
every process of its PID namespace at once: sessions, an upload's receiver, the service) and
``start()`` boots it again with its disk as the cut left it.

Each nspawn runs in its own cgroup (see shared/README.md), is stopped with SIGTERM
and its cgroups and ``/run/systemd/nspawn/propagate/NAME`` are removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pytest

from tests.sshd import client_key, free_port

ROOT_VERSION = "1"
ROOT_DIR = Path(os.environ.get("TVMBUNDLE_TEST_ROOT", "/var/cache/tvmbundle-test/bookworm-root"))
STAMP = ".tvmbundle-test-root"
PACKAGES = "systemd,systemd-sysv,openssh-server,dbus,sudo,libnss-myhostname"
USERS = ("root", "pi", "nosudo")
CGROUP_HIERARCHIES = ("systemd", "unified")


def mirror() -> str:
    """The Debian mirror this machine uses (the ``URIs:`` of its deb822 sources, not the snapshot comment)."""
    src = Path("/etc/apt/sources.list.d/debian.sources")
    if src.is_file():
        for line in src.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


def root_ready(root: Path = ROOT_DIR) -> bool:
    stamp = root / STAMP
    return stamp.is_file() and stamp.read_text().strip() == ROOT_VERSION


def build_root(root: Path = ROOT_DIR, log=print) -> Path:
    """Build the device root once per machine (about 70 s and 260 MB); a finished root is reused."""
    if root_ready(root):
        return root
    if os.geteuid() != 0:
        raise RuntimeError("building the device root needs root (debootstrap)")
    for tool, package in (("debootstrap", "debootstrap"), ("systemd-nspawn", "systemd-container")):
        if not shutil.which(tool):
            # --no-install-recommends: systemd-container recommends libnss-mymachines, which edits nsswitch.conf
            subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "systemd-container",
                            "debootstrap"], check=True)
            break
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
    try:
        log(f"debootstrap bookworm into {tmp} (once per machine) ...")
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(tmp),
                        mirror()], check=True, stdout=subprocess.DEVNULL)
        _configure_root(tmp)
        (tmp / STAMP).write_text(ROOT_VERSION + "\n")
        old = None
        if root.exists():          # an outdated root: move it aside, then swap in the new one
            old = root.with_name(root.name + f".old-{os.getpid()}")
            root.rename(old)
        tmp.rename(root)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"device root ready: {root}")
    return root


def _configure_root(root: Path) -> None:
    def chroot(*argv: str) -> None:
        subprocess.run(["chroot", str(root), *argv], check=True)

    for user in ("pi", "nosudo"):
        chroot("useradd", "-m", "-s", "/bin/bash", user)
        chroot("usermod", "-p", "*", user)          # a new user is locked until it has a (impossible) password
    (root / "etc/sudoers.d/pi").write_text("pi ALL=(ALL) NOPASSWD: ALL\n")
    (root / "etc/sudoers.d/pi").chmod(0o440)
    with contextlib.suppress(FileNotFoundError):
        (root / "etc/hostname").unlink()
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    # The per-device config is bound over this file at boot; the key folder per test session.
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config.d/test.conf").write_text("# bound at boot by tests/devices.py\n")
    (root / "etc/ssh/test_keys").mkdir(exist_ok=True)
    # Nothing the tests do not need: no getty on the (piped) console, no timers waking the device.
    for unit in ("getty@tty1.service", "console-getty.service", "apt-daily.timer", "apt-daily-upgrade.timer",
                 "e2scrub_all.timer", "fstrim.timer", "systemd-tmpfiles-clean.timer"):
        subprocess.run(["systemctl", f"--root={root}", "mask", unit], capture_output=True, check=False)


def skip_reason() -> str | None:
    """Why nspawn devices cannot run here, or None."""
    if os.geteuid() != 0:
        return "nspawn devices need root"
    if not shutil.which("systemd-nspawn"):
        return "needs systemd-nspawn (apt-get install --no-install-recommends systemd-container)"
    if not root_ready():
        return f"the device root is not built ({ROOT_DIR}); run: python -m tests.devices build-root"
    return None


@dataclass
class Device:
    """One booted device: ``127.0.0.<index + 100>``, its sshd and its service on free ports there."""

    index: int
    base: Path                    # host folder with this device's config (not inside the device)
    key: Path
    known_hosts: Path
    root: Path = ROOT_DIR
    port: int = 0
    service_port: int = 0
    own_listen: bool = False      # no listen drop-ins: the bundles' own addresses (several bundles)
    persistent: bool = False      # a root of its own on disk, kept across kill() and start()
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"tvmb-dev{self.index}-{os.getpid()}"

    @property
    def host(self) -> str:
        return f"127.0.0.{self.index + 100}"

    prefix_default = "/opt/tvmbundle"

    @property
    def service_url(self) -> str:
        return f"http://{self.host}:{self.service_port}"

    def target(self, user: str = "pi", **kw):
        from bundler.device.ssh import Target

        args = {"host": self.host, "user": user, "port": self.port, "identity": self.key,
                "known_hosts": self.known_hosts, "prefix": self.prefix_default, "connect_timeout": 5.0}
        args.update(kw)
        return Target(**args)

    # --- files inside the running device (through its init's root) ------------------------------
    def leader(self) -> int:
        """The PID (on the host) of the device's systemd."""
        assert self.proc is not None
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        if not kids:
            raise RuntimeError(f"{self.name}: no init process")
        return int(kids[0])

    def path(self, inside: str) -> Path:
        return Path(f"/proc/{self.leader()}/root") / inside.lstrip("/")

    def sh(self, script: str, user: str = "root", check: bool = False) -> subprocess.CompletedProcess:
        """Run a shell command on the device as ``user`` (through its own systemd-run-free nsenter)."""
        argv = ["nsenter", "-t", str(self.leader()), "-m", "-u", "-i", "-p", "--", "/usr/sbin/runuser", "-u", user,
                "--", "/bin/sh", "-c", script]
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=120)

    def home(self, user: str) -> str:
        return "/root" if user == "root" else f"/home/{user}"

    def exists(self, inside: str) -> bool:
        return os.path.lexists(self.path(inside))

    def mount_tmpfs(self, inside: str, size: str) -> None:
        """A size-limited tmpfs at ``inside``, in the device's own mount namespace (a full disk)."""
        self.sh(f"mkdir -p {inside} && mount -t tmpfs -o size={size},mode=0755 tmpfs {inside} && "
                f"chown pi:pi {inside}", check=True)

    def current_id(self, prefix: str | None = None, name: str | None = None) -> str | None:
        """Bundle ``name``'s current release (default: the device's only bundle; with none, the
        single-service layout's)."""
        prefix = prefix or self.prefix_default
        if name is None:
            bundles = self.path(prefix + "/bundles")
            names = sorted(p.name for p in bundles.iterdir()) if bundles.is_dir() else []
            if len(names) > 1:
                raise AssertionError(f"{self.name} has bundles {names}: say which")
            name = names[0] if names else None
        link = self.path(f"{prefix}/bundles/{name}/current" if name else f"{prefix}/current")
        return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None

    def systemctl(self, *args: str) -> int:
        return self.sh("systemctl " + " ".join(args)).returncode

    # --- lifecycle -------------------------------------------------------------------------------
    def configure(self) -> None:
        self.port = self.port or free_port(self.host)
        self.service_port = self.service_port or free_port(self.host)
        self.base.mkdir(parents=True, exist_ok=True)
        keys = self.base / "keys"
        keys.mkdir(exist_ok=True)
        pub = Path(str(self.key) + ".pub").read_text()
        for user in USERS:
            (keys / user).write_text(pub)
            (keys / user).chmod(0o644)
        keys.chmod(0o755)
        (self.base / "sshd.conf").write_text("\n".join([
            f"ListenAddress {self.host}:{self.port}", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "AuthenticationMethods publickey", "PermitRootLogin prohibit-password",
            "AuthorizedKeysFile /etc/ssh/test_keys/%u",
            *([] if self.own_listen else [f"SetEnv TVM_DEPLOY_LISTEN={self.host}:{self.service_port}"]),
            "MaxStartups 100", "LogLevel ERROR", ""]))
        self.serve_from(self.prefix_default)
        self.trust()
        if self.persistent and self.root == ROOT_DIR:
            own = self.base / "root"
            subprocess.run(["cp", "-a", str(ROOT_DIR), str(own)], check=True)   # about 260 MB, a few seconds
            own.chmod(0o755)    # the built root is a mkdtemp (0700): no user could log in to a copy of it
            self.root = own

    def serve_from(self, prefix: str) -> None:
        """Point the listen drop-ins at the releases under ``prefix`` (rewritten in place: they are bound)."""
        for conf, current in (("listen.conf", f"{prefix}/bundles/%i/current"), ("listen-legacy.conf", f"{prefix}/current")):
            text = ("# tests/devices.py: devices share the host's network, so each listens on its own address\n"
                    f"[Service]\nExecStart=\nExecStart={current}/bin/tvm-deploy serve "
                    f"--listen {self.host}:{self.service_port} --threads 1\n")
            with open(self.base / conf, "a+") as f:
                f.seek(0)
                f.truncate()
                f.write(text)

    def trust(self) -> None:
        """One known_hosts line per address: all devices share the root's host key."""
        kind, b64 = (self.root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2]
        name = f"[{self.host}]:{self.port}"
        lines = [l for l in (self.known_hosts.read_text().splitlines() if self.known_hosts.exists() else [])
                 if not l.startswith(name + " ")]
        lines.append(f"{name} {kind} {b64}")
        self.known_hosts.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 180.0) -> Device:   # several booting at once on 2 loaded cores
        # nspawn once gave up on a boot by itself (CI on two loaded cores, the 20th device of a
        # fleet, nothing in its output but its exit): such a boot is tried once more. A boot that
        # times out is not: it would only time out again.
        code = self._boot(timeout)
        if code not in (None, "timeout"):
            code = self._boot(timeout)
        if code is None:
            return self
        tail = (self.base / "console.log").read_text(errors="replace")[-3000:]
        why = f"nspawn exited with {code}" if code != "timeout" else f"did not boot to sshd within {timeout:g} s"
        raise RuntimeError(f"device {self.name}: {why}: {tail}")

    def _boot(self, timeout: float):
        """None once sshd answers; else (the device stopped) nspawn's exit code, or "timeout"."""
        self.cleanup_cgroups()
        argv = ["systemd-nspawn", "-q", "-D", str(self.root), "-b", "--register=no", "--keep-unit",
                "--console=pipe", "-M", self.name, f"--hostname={self.name}",
                *([] if self.persistent else ["--volatile=overlay"]),
                f"--bind-ro={self.base / 'sshd.conf'}:/etc/ssh/sshd_config.d/test.conf",
                f"--bind-ro={self.base / 'keys'}:/etc/ssh/test_keys",
                *([] if self.own_listen else [
                    f"--bind-ro={self.base / 'listen.conf'}:/etc/systemd/system/tvmbundle@.service.d/10-test-listen.conf",
                    f"--bind-ro={self.base / 'listen-legacy.conf'}:/etc/systemd/system/tvmbundle.service.d/"
                    "10-test-listen.conf"])]
        # Its own cgroup in each hierarchy, or the devices' services share one and `systemctl stop` misbehaves.
        cg = " ".join(f"mkdir -p /sys/fs/cgroup/{h}/nspawn-{self.name} && echo $$ > "
                      f"/sys/fs/cgroup/{h}/nspawn-{self.name}/cgroup.procs &&"
                      for h in CGROUP_HIERARCHIES if Path(f"/sys/fs/cgroup/{h}").is_dir())
        with open(self.base / "console.log", "ab") as log:
            self.proc = subprocess.Popen(["/bin/sh", "-c", f'{cg} exec "$@"', "nspawn", *argv],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                return code
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return None
            except OSError:
                time.sleep(0.2)
        self.stop()
        return "timeout"

    def kill(self) -> None:
        """Cut the power: SIGKILL to the device's init ends its whole PID namespace at once, with no
        shutdown (a namespace's init cannot catch it; the host's kernel delivers it)."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.leader(), signal.SIGKILL)
            self.proc.wait(timeout=30)           # nspawn follows its init
        self.proc = None
        self.cleanup_cgroups()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)          # a clean shutdown, about 1.5 s
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        self.cleanup_cgroups()

    def cleanup_cgroups(self) -> None:
        for h in CGROUP_HIERARCHIES:
            cg = Path(f"/sys/fs/cgroup/{h}/nspawn-{self.name}")
            if cg.is_dir():
                # children first (the device's own systemd made a tree below it)
                for sub in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):
                        sub.rmdir()
                with contextlib.suppress(OSError):
                    cg.rmdir()
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.name}", ignore_errors=True)


class Devices:
    """Boots devices and always stops them (a context manager; the pytest fixtures use it)."""

    def __init__(self, base: Path, first_index: int = 0):
        self.base = base
        self.key = client_key(base / "client")
        self.known_hosts = base / "client" / "known_hosts"
        self.devices: list[Device] = []
        self.first_index = first_index

    def add(self, n: int = 1, own_listen: bool = False, persistent: bool = False) -> list[Device]:
        new = []
        for _ in range(n):
            i = self.first_index + len(self.devices)
            d = Device(i, self.base / f"device{i}", self.key, self.known_hosts, own_listen=own_listen,
                       persistent=persistent)
            d.configure()
            self.devices.append(d)
            new.append(d)
        for d in new:
            d.start()
        return new

    def close(self) -> None:
        for d in self.devices:
            d.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_INDEX = [0]


def next_index(n: int) -> int:
    """Consecutive devices get new addresses (127.0.0.100 to .249, then again from .100)."""
    if _INDEX[0] + n > 150:
        _INDEX[0] = 0
    i = _INDEX[0]
    _INDEX[0] += n
    return i


# --- pytest fixtures (import them into a test module) ------------------------------------------

@pytest.fixture(scope="session")
def device_root(tmp_path_factory) -> Path:
    """The built root, once it was seen to boot here; skips (saying why) when it cannot."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        with Devices(tmp_path_factory.mktemp("boot-check"), first_index=next_index(1)) as ds:
            ds.add(1)
    except (RuntimeError, OSError) as e:
        pytest.skip(f"systemd-nspawn cannot boot a device here: {str(e)[:400]}")
    return ROOT_DIR


@pytest.fixture
def devices(device_root, tmp_path):
    """Boot devices with ``devices.add(n)``; all are stopped after the test."""
    with Devices(tmp_path / "devices", first_index=next_index(4)) as ds:
        yield ds


def main(argv: list[str]) -> int:
    if argv[:1] == ["build-root"]:
        build_root()
        return 0
    print("usage: python -m tests.devices build-root", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
