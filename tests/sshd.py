"""Test devices: real sshd processes on loopback addresses, each with its own host key,
config, authorized key and install root.

Every test runs on devices with a real systemd (tests/devices.py); this module gives them
``free_port`` and ``client_key``. The plain sshd devices (``Fleet``) remain for scripts/bench-rollout
alone: it starts 50 devices at once to measure what a rollout costs the controller, which nspawn
devices (a booted systemd each) would make a measurement of two loaded cores instead. Each device's
login has its own HOME inside the device root, so the deploy's agent cache (~/.cache/tvmbundle) never
lands in the machine's own home.

Each sshd runs as PID 1 of its own PID namespace (``unshare --pid --fork --kill-child``),
so killing the namespace kills the device for real: its sessions, uploads and the
service it runs all die at once.

TEST DOUBLE: no systemd runs as PID 1 on this machine, so every device has a
``systemctl`` script first on its PATH. It implements daemon-reload/enable (no-ops),
start/stop/restart/is-active by running the installed unit's real ExecStart in the
background with a pidfile. The service process itself is the real ``tvm-deploy serve``.
Several devices share this machine's network, so each device's service listens on its
own loopback address (TVM_DEPLOY_LISTEN); the double drops the unit's --listen for that.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bundler.device.ssh import Target

SYSTEMCTL_DOUBLE = r"""#!/bin/sh
# TEST DOUBLE for systemctl (see tests/sshd.py): no systemd runs as PID 1 on the test machine.
set -u
units="$TVMB_UNIT_DIR"; state="$TVMB_STATE"; mkdir -p "$state"
cmd="${1:-}"; unit="${2:-tvmbundle.service}"
pidfile="$state/$unit.pid"
stop() {
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile"); kill "$pid" 2>/dev/null; i=0
  while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  kill -9 "$pid" 2>/dev/null; rm -f "$pidfile"
}
start() {
  line=$(sed -n 's/^ExecStart=//p' "$units/$unit" | sed 's/ --listen [^ ]*//')
  [ -n "$line" ] || { echo "Unit $unit not found." >&2; exit 5; }
  setsid sh -c "exec $line" >>"$state/$unit.log" 2>&1 </dev/null &
  echo $! > "$pidfile"
}
case "$cmd" in
  daemon-reload|enable|disable) exit 0 ;;
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  is-active) if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo active; else echo inactive; exit 3; fi ;;
  *) echo "systemctl test double: '$cmd' is not implemented" >&2; exit 1 ;;
esac
"""


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def client_key(folder: Path) -> Path:
    key = folder / "id_ed25519"
    if not key.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@dataclass
class Device:
    index: int                  # the device is 127.0.0.<index + 10>
    root: Path
    key: Path                   # the client's private key
    known_hosts: Path
    host: str = ""
    port: int = 0
    service_port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def prefix(self) -> Path:
        return self.root / "opt" / "tvmbundle"

    @property
    def unit_dir(self) -> Path:
        return self.root / "units"

    @property
    def service_url(self) -> str:
        return f"http://{self.host}:{self.service_port}"

    def target(self, **kw) -> Target:
        args = dict(host=self.host, user="root", port=self.port, identity=self.key, known_hosts=self.known_hosts,
                    prefix=str(self.prefix), unit_dir=str(self.unit_dir), connect_timeout=5.0)
        args.update(kw)
        return Target(**args)

    def setup(self) -> Device:
        self.host = f"127.0.0.{self.index + 10}"
        self.port = self.port or free_port(self.host)          # a restarted device keeps its address
        self.service_port = self.service_port or free_port(self.host)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "bin").mkdir(exist_ok=True)
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.unit_dir.mkdir(exist_ok=True)
        double = self.root / "bin" / "systemctl"
        double.write_text(SYSTEMCTL_DOUBLE)
        double.chmod(0o755)
        hostkey = self.root / "ssh_host_ed25519_key"
        if not hostkey.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True)
        (self.root / "authorized_keys").write_text(Path(str(self.key) + ".pub").read_text())
        # HOME inside the device: the deploy keeps its agent in ~/.cache/tvmbundle, never the machine's own.
        (self.root / "home").mkdir(exist_ok=True)
        env = {"HOME": str(self.root / "home"),
               "PATH": f"{self.root / 'bin'}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
               "TVMB_UNIT_DIR": str(self.unit_dir), "TVMB_STATE": str(self.root / "state"),
               "TVM_DEPLOY_LISTEN": f"{self.host}:{self.service_port}"}
        (self.root / "sshd_config").write_text("\n".join([
            "PidFile none", "UsePAM no", "PermitRootLogin prohibit-password", "AuthenticationMethods publickey",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "StrictModes no",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}", "Subsystem sftp internal-sftp",
            "SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()),
            "MaxStartups 100", "LogLevel ERROR", ""]))
        self.trust()
        return self

    def host_pubkey(self) -> str:
        return (self.root / "ssh_host_ed25519_key.pub").read_text().split()[:2]

    def trust(self) -> None:
        """Record this device's host key in the client's known_hosts (replacing an older entry)."""
        kind, b64 = self.host_pubkey()
        name = f"[{self.host}]:{self.port}"
        lines = [l for l in (self.known_hosts.read_text().splitlines() if self.known_hosts.exists() else [])
                 if not l.startswith(name + " ")]
        lines.append(f"{name} {kind} {b64}")
        self.known_hosts.write_text("\n".join(lines) + "\n")

    def start(self) -> Device:
        os.makedirs("/run/sshd", exist_ok=True)
        log = open(self.root / "sshd.log", "ab")
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e",
             "-p", str(self.port), "-o", f"ListenAddress={self.host}", "-f", str(self.root / "sshd_config"),
             "-h", str(self.root / "ssh_host_ed25519_key")],
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return self
            except OSError:
                time.sleep(0.05)
            if self.proc.poll() is not None:
                break
        raise RuntimeError(f"sshd for {self.host}:{self.port} did not start: "
                           f"{(self.root / 'sshd.log').read_text()[-2000:]}")

    def systemctl(self, *args: str) -> int:
        """Run the device's systemctl over SSH (inside its PID namespace, like the deploy does)."""
        from bundler.device.ssh import Remote

        with Remote(self.target()) as r:
            return r.run(["systemctl", *args], "test", check=False).code

    def kill(self) -> None:
        """Kill the device for real: its sshd is PID 1 of a namespace, so everything in it dies."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill()


class Fleet:
    """Starts devices and always stops them (use as a context manager or pytest fixture)."""

    def __init__(self, base: Path):
        self.base = base
        self.key = client_key(base / "client")
        self.known_hosts = base / "client" / "known_hosts"
        self.devices: list[Device] = []

    def add(self, n: int = 1) -> list[Device]:
        new = []
        for _ in range(n):
            i = len(self.devices)
            d = Device(i, self.base / f"device{i}", self.key, self.known_hosts).setup().start()
            self.devices.append(d)
            new.append(d)
        return new

    def close(self) -> None:
        for d in self.devices:
            d.stop()
            subprocess.run(["umount", "-l", str(d.prefix)], capture_output=True)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
