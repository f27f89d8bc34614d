"""Talking to one device over SSH with fabric: checked host keys and a deadline on every step.

fabric accepts any host key unless told otherwise, so the connection loads the
known_hosts file and installs paramiko's RejectPolicy before it connects
(accepting an *unknown* key is an explicit option; a *changed* key is always
refused).  A transfer to a host that vanished blocks in paramiko forever, so
each remote step runs under a watchdog that closes the transport at its
deadline and turns the hang into a DeployError naming the step.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import paramiko
from fabric import Connection

from bundler.errors import DeployError, UserError

_SPEC = re.compile(r"^(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>\d+))?$")


@dataclass(frozen=True)
class Target:
    """One device and how to reach it."""

    host: str
    user: str = "root"
    port: int = 22
    identity: Path | None = None
    known_hosts: Path | None = None          # default ~/.ssh/known_hosts
    accept_new_host_key: bool = False
    prefix: str | None = None                # install root; default: the bundle's
    sudo: bool | None = None                 # True: the steps that need root run through `sudo -n`
    unit_dir: str = "/etc/systemd/system"
    connect_timeout: float = 10.0

    @classmethod
    def parse(cls, spec: str, **kw) -> Target:
        m = _SPEC.match(spec.strip())
        if not m:
            raise UserError(f"--host: {spec!r} is not allowed; expected USER@HOST[:PORT], e.g. pi@10.0.0.7")
        port = int(m["port"]) if m["port"] else 22
        if not 0 < port < 65536:
            raise UserError(f"--host: port {port} is not allowed; expected 1 to 65535")
        return cls(host=m["host"].strip("[]"), user=m["user"] or "root", port=port, **kw)

    @property
    def name(self) -> str:
        return f"{self.user}@{self.host}" + (f":{self.port}" if self.port != 22 else "")

    def with_(self, **kw) -> Target:
        return replace(self, **kw)


class _AcceptNew(paramiko.MissingHostKeyPolicy):
    """Trust a host seen for the first time and record it; a changed key never reaches here
    (paramiko raises BadHostKeyException for it before asking the policy)."""

    def __init__(self, path: Path):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Remote:
    """An open connection to one device; every call names its step for errors."""

    target: Target
    step_timeout: float = 60.0
    conn: Connection | None = field(default=None, repr=False)
    sudo: bool = False
    # Round trips made, by kind ("sh" for commands, "put" for file transfers): deploys report them.
    calls: dict[str, int] = field(default_factory=lambda: {"sh": 0, "put": 0})

    # --- connecting -------------------------------------------------------------------------
    def open(self) -> Remote:
        t = self.target
        known = t.known_hosts or Path.home() / ".ssh" / "known_hosts"
        kwargs: dict = {"banner_timeout": t.connect_timeout,
                        "auth_timeout": t.connect_timeout}
        if t.identity:
            if not Path(t.identity).is_file():
                raise UserError(f"--identity: {t.identity}: no such key file")
            kwargs["key_filename"] = str(t.identity)
            kwargs["look_for_keys"] = False
        conn = Connection(t.host, user=t.user, port=t.port, connect_kwargs=kwargs, connect_timeout=t.connect_timeout)
        # fabric's client starts with AutoAddPolicy and the user's files: replace it with one
        # that trusts exactly the known_hosts file we were given.
        client = conn.client = paramiko.SSHClient()
        if known.is_file():
            try:
                client.load_host_keys(str(known))
            except (OSError, paramiko.SSHException) as e:
                raise UserError(f"--known-hosts: {known}: unreadable ({e})") from None
        client.set_missing_host_key_policy(_AcceptNew(known) if t.accept_new_host_key else paramiko.RejectPolicy())
        try:
            conn.open()
        except paramiko.BadHostKeyException as e:
            raise DeployError(t.name, "connect", f"the host key CHANGED (now {e.key.get_name()} "
                                                 f"{e.key.get_fingerprint().hex()}); refusing to connect",
                              hint=f"if the device was reinstalled, remove its old key: "
                                   f"ssh-keygen -f {known} -R '{_known_name(t)}'") from None
        except paramiko.SSHException as e:
            if "not found in known_hosts" in str(e):
                raise DeployError(t.name, "connect", f"unknown host key (not in {known}); refusing to connect",
                                  hint="check the key and add it (ssh-keyscan -p PORT HOST >> known_hosts), "
                                       "or pass --accept-new-host-key") from None
            if isinstance(e, paramiko.AuthenticationException):
                raise DeployError(t.name, "connect", f"authentication failed for user {t.user!r}",
                                  hint="check --identity and the device's authorized_keys") from None
            raise DeployError(t.name, "connect", str(e) or type(e).__name__) from None
        except (socket.timeout, TimeoutError):
            raise DeployError(t.name, "connect", f"no answer within {t.connect_timeout:g} s") from None
        except OSError as e:
            raise DeployError(t.name, "connect", e.strerror or str(e)) from None
        self.conn = conn
        return self

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()

    def __enter__(self) -> Remote:
        return self.open() if self.conn is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- deadlines --------------------------------------------------------------------------
    @contextlib.contextmanager
    def deadline(self, step: str, seconds: float | None = None) -> Iterator[None]:
        """Run the body with a watchdog that cuts the connection when ``seconds`` pass."""
        seconds = seconds or self.step_timeout
        fired = threading.Event()

        def cut() -> None:
            fired.set()
            transport = self.conn.client.get_transport() if self.conn else None
            if transport is not None:
                transport.close()

        timer = threading.Timer(seconds, cut)
        timer.daemon = True
        timer.start()
        try:
            yield
        except DeployError:
            raise
        except Exception as e:
            if fired.is_set():
                raise DeployError(self.target.name, step, f"timed out after {seconds:g} s; "
                                                          "the connection was closed") from None
            raise DeployError(self.target.name, step, _describe(e)) from None
        finally:
            timer.cancel()
        if fired.is_set():
            raise DeployError(self.target.name, step, f"timed out after {seconds:g} s; the connection was closed")

    # --- commands and files -------------------------------------------------------------------
    def run(self, argv: Sequence[str], step: str, *, timeout: float | None = None, check: bool = True,
            sudo: bool | None = None, stdin: str | None = None) -> Result:
        cmd = shlex.join(argv)
        if sudo if sudo is not None else self.sudo:
            cmd = "sudo -n " + cmd
        return self.sh(cmd, step, timeout=timeout, check=check, stdin=stdin)

    def sh(self, script: str, step: str, *, timeout: float | None = None, check: bool = True,
           stdin: str | None = None) -> Result:
        """Run a POSIX shell snippet (built with shlex.quote, never from user text)."""
        assert self.conn is not None
        import io

        self.calls["sh"] += 1
        with self.deadline(step, timeout):
            r = self.conn.run(script, hide=True, warn=True, in_stream=io.StringIO(stdin) if stdin is not None else False,
                              timeout=timeout or self.step_timeout)
        res = Result(r.exited, r.stdout, r.stderr)
        if check and res.code != 0:
            tail = (res.err or res.out).strip().splitlines()[-5:]
            raise DeployError(self.target.name, step, f"`{script[:120]}` exited {res.code}: " + " | ".join(tail))
        return res

    def put(self, local: Path, remote: str, step: str, *, timeout: float | None = None,
            callback=None) -> None:
        assert self.conn is not None
        self.calls["put"] += 1
        with self.deadline(step, timeout):
            sftp = self.conn.sftp()
            try:
                sftp.put(str(local), remote, callback=callback, confirm=True)
            except OSError as e:
                # SFTP reports a full disk only as "Failure": say what it most likely is.
                msg = str(e) or type(e).__name__
                if msg.strip().lower() == "failure":
                    msg = "the device refused the write (SFTP 'Failure': usually a full disk)"
                elif "size mismatch in put" in msg:
                    got = msg.split("!")[-1].split("!=")[0].strip()
                    msg = f"the device stored {got} of {local.stat().st_size} bytes (usually a full disk)"
                raise DeployError(self.target.name, step, f"{local.name}: {msg}") from None

    def write_text(self, text: str, remote: str, step: str) -> None:
        assert self.conn is not None
        import io

        self.calls["put"] += 1
        with self.deadline(step):
            self.conn.sftp().putfo(io.BytesIO(text.encode()), remote)


def _known_name(t: Target) -> str:
    return t.host if t.port == 22 else f"[{t.host}]:{t.port}"


def _describe(e: Exception) -> str:
    if isinstance(e, (EOFError, paramiko.SSHException, socket.error)):
        return f"connection lost ({type(e).__name__}: {e})" if str(e) else f"connection lost ({type(e).__name__})"
    return f"{type(e).__name__}: {e}"


def default_known_hosts() -> Path:
    return Path(os.environ.get("HOME", str(Path.home()))) / ".ssh" / "known_hosts"
