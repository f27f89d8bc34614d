"""TVM's RPC server on a device over SSH, for tuning on the board (``tvmbundle tune --host``).

tvmbundle uploads the RPC kit (:func:`bundler.compile.rpc.kit`), starts ``tvm-deploy rpc``
listening on the device's 127.0.0.1 only, reaches it through an SSH tunnel, and stops it and
removes its files afterwards. Every value in the remote command is quoted: the key and the
folder come from the user and the device.
"""

from __future__ import annotations

import contextlib
import socket
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from shlex import quote as q

from bundler.build import harness
from bundler.compile.rpc import DEFAULT_KEY, Endpoint, kit
from bundler.config.recipe import Recipe
from bundler.device.ssh import Remote
from bundler.errors import DeployError


@contextlib.contextmanager
def ssh_server(recipe: Recipe, target, *, key: str = DEFAULT_KEY, remote_port: int = 9090,
               threads: int | None = None) -> Iterator[Endpoint]:
    """Start the RPC server on a device over SSH (listening on its 127.0.0.1 only), tunnel to it,
    and stop it and remove its files afterwards."""
    root = kit(recipe)
    with tempfile.TemporaryDirectory(prefix="tvmbundle-rpc-") as tmp:
        tarball = Path(tmp) / "kit.tar.gz"
        with tarfile.open(tarball, "w:gz") as tar:
            tar.add(root / "bin", arcname="bin")
            tar.add(root / "lib", arcname="lib")
        with Remote(target) as r:
            d = r.sh("mktemp -d /tmp/tvmbundle-rpc.XXXXXX", "make a folder for the RPC server").out.strip()
            pid = ""
            try:
                r.put(tarball, f"{d}/kit.tar.gz", "upload the RPC server")
                n = str(threads or recipe.service.threads)
                started = r.sh(
                    f"cd {q(d)} && tar xzf kit.tar.gz && rm kit.tar.gz && "
                    f"(TVM_NUM_THREADS={q(n)} nohup bin/{harness.BINARY} rpc --host 127.0.0.1 "
                    f"--port {int(remote_port)} --port-end {int(remote_port) + 100} --key {q(key)} "
                    "> rpc.out 2> rpc.log < /dev/null & echo $!)",
                    "start the RPC server").out.strip()
                pid = started.splitlines()[-1]
                port = 0
                for _ in range(100):
                    out = r.sh(f"cat {q(d + '/rpc.out')}", "wait for the RPC server", check=False).out
                    if out.startswith("listening"):
                        port = int(out.split()[2].rpartition(":")[2])
                        break
                    time.sleep(0.1)
                if not port:
                    err = r.sh(f"cat {q(d + '/rpc.log')}", "read the RPC server's log", check=False).out.strip()
                    raise DeployError(target.name, "start the RPC server", err[-300:] or "it did not start")
                with _tunnel(r, port) as local_port:
                    yield Endpoint("127.0.0.1", local_port, key, where=f"{target.name} via SSH")
            finally:
                if pid.isdigit():
                    r.sh(f"kill {int(pid)}", "stop the RPC server", check=False)
                r.sh(f"rm -rf {q(d)}", "remove the RPC server", check=False)


@contextlib.contextmanager
def _tunnel(remote, remote_port: int) -> Iterator[int]:
    """A local port on 127.0.0.1 forwarded through the SSH connection to the device's 127.0.0.1:PORT."""
    transport = remote.conn.client.get_transport()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    stop = threading.Event()

    def pump(a, b) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                b.close()
            with contextlib.suppress(OSError):
                a.close()

    def accept() -> None:
        while not stop.is_set():
            try:
                client, addr = listener.accept()
            except (socket.timeout, OSError):
                continue
            chan = transport.open_channel("direct-tcpip", ("127.0.0.1", remote_port), addr)
            threading.Thread(target=pump, args=(client, chan), daemon=True).start()
            threading.Thread(target=pump, args=(chan, client), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        t.join(2)
        listener.close()
