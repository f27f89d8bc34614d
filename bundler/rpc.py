"""Measuring on the board: the device-side RPC server and MetaSchedule's builder and runner.

The server is ``tvm-deploy rpc``: the bundle's own harness and runtime libraries (an "RPC kit",
``bin/`` + ``lib/`` as in a bundle), so candidates are measured by exactly the runtime a bundle
ships. It can run

* on a device over SSH (``--host``): tvmbundle uploads the kit, starts the server listening on
  the device's 127.0.0.1 only, reaches it through an SSH tunnel, and stops it afterwards;
* here under qemu-user (``--emulate``): checks the whole flow without a board (timings mean nothing);
* anywhere the user started it (``--rpc HOST:PORT``), or behind a TVM RPC tracker shared by
  several boards (``--tracker HOST:PORT --key KEY``; start servers with ``tvm-deploy rpc
  --tracker HOST:PORT --key KEY``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cache, harness, runtime, toolchain
from .errors import DeployError, UserError
from .recipe import Recipe

log = logging.getLogger("tvmbundle")
DEFAULT_KEY = "tvmbundle"


def kit(recipe: Recipe) -> Path:
    """A folder with bin/tvm-deploy and lib/ for the board: what runs the RPC server."""
    tc = toolchain.resolve(recipe)
    rt = runtime.get(recipe)
    h = harness.build(tc, rt)
    key = cache.key("rpc-kit", cache.sha256_file(h.path), [cache.sha256_file(p) for p in rt.libs])

    def build(tmp: Path) -> dict[str, Any]:
        (tmp / "bin").mkdir()
        (tmp / "lib").mkdir()
        shutil.copy2(h.path, tmp / "bin" / harness.BINARY)
        for lib in rt.libs:
            shutil.copy2(lib, tmp / "lib" / lib.name)
        return {}

    return cache.get("rpc-kit", key, build).path


@dataclass(frozen=True)
class Endpoint:
    """Where MetaSchedule's runner finds a server: directly, or through a tracker."""

    host: str
    port: int
    key: str = DEFAULT_KEY
    tracker: bool = False
    where: str = ""            # for messages: "qemu-aarch64 on 127.0.0.1", "pi@10.0.0.7", ...

    def describe(self) -> str:
        """Where candidates ran, as the manifest records it: without the ephemeral local port of a
        tunnel or an emulated server, so the same tuning gives the same bundle."""
        if self.where:
            return f"RPC ({self.where})"
        return "RPC " + (f"tracker {self.host}:{self.port} key {self.key}" if self.tracker else f"{self.host}:{self.port}")


def parse_hostport(flag: str, text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{flag}: expected HOST:PORT, got {text!r}")
    return host, int(port)


def _read_port(stream, deadline: float, what: str) -> int:
    """The port from the server's first stdout line: 'listening on HOST:PORT key KEY'."""
    line = ""
    while time.monotonic() < deadline:
        line = stream.readline()
        if line:
            break
        time.sleep(0.05)
    parts = line.split()
    if len(parts) < 3 or parts[0] != "listening":
        raise UserError(f"{what}: the RPC server did not start (said {line.strip()!r})")
    return int(parts[2].rpartition(":")[2])


@contextlib.contextmanager
def local_server(recipe: Recipe, *, key: str = DEFAULT_KEY, port: int = 0, tracker: str | None = None,
                 threads: int | None = None) -> Iterator[Endpoint]:
    """The board's RPC server on this machine's 127.0.0.1: natively, or under qemu-user."""
    root = kit(recipe)
    argv = [str(root / "bin" / harness.BINARY), "rpc", "--host", "127.0.0.1", "--port", str(port), "--key", key]
    if tracker:
        argv += ["--tracker", tracker]
    if recipe.qemu:
        from .proc import which

        argv = [which(recipe.qemu, why=f"run the {recipe.name} RPC server"),
                *(["-L", recipe.ld_prefix] if recipe.ld_prefix else []), *argv]
    env = dict(os.environ, TVM_NUM_THREADS=str(threads or recipe.service.threads))
    errlog = tempfile.TemporaryFile(mode="w+")
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errlog, stdin=subprocess.DEVNULL, text=True, env=env)
    try:
        try:
            bound = _read_port(p.stdout, time.monotonic() + 120, recipe.name)
        except UserError:
            errlog.seek(0)
            raise UserError(f"{recipe.name}: the RPC server did not start: {errlog.read().strip()[-500:]}") from None
        where = f"{recipe.qemu} on this machine" if recipe.qemu else "this machine"
        yield Endpoint("127.0.0.1", bound, key, where=where)
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        errlog.close()


@contextlib.contextmanager
def ssh_server(recipe: Recipe, target, *, key: str = DEFAULT_KEY, remote_port: int = 9090,
               threads: int | None = None) -> Iterator[Endpoint]:
    """Start the RPC server on a device over SSH (listening on its 127.0.0.1 only), tunnel to it,
    and stop it and remove its files afterwards."""
    from .ssh import Remote

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
                    f"cd {d} && tar xzf kit.tar.gz && rm kit.tar.gz && "
                    f"(TVM_NUM_THREADS={n} nohup bin/{harness.BINARY} rpc --host 127.0.0.1 --port {remote_port} "
                    f"--port-end {remote_port + 100} --key {key} > rpc.out 2> rpc.log < /dev/null & echo $!)",
                    "start the RPC server").out.strip()
                pid = started.splitlines()[-1]
                port = 0
                for _ in range(100):
                    out = r.sh(f"cat {d}/rpc.out", "wait for the RPC server", check=False).out
                    if out.startswith("listening"):
                        port = int(out.split()[2].rpartition(":")[2])
                        break
                    time.sleep(0.1)
                if not port:
                    err = r.sh(f"cat {d}/rpc.log", "read the RPC server's log", check=False).out.strip()
                    raise DeployError(target.name, "start the RPC server", err[-300:] or "it did not start")
                with _tunnel(r, port) as local_port:
                    yield Endpoint("127.0.0.1", local_port, key, where=f"{target.name} via SSH")
            finally:
                if pid.isdigit():
                    r.sh(f"kill {pid}", "stop the RPC server", check=False)
                r.sh(f"rm -rf {d}", "remove the RPC server", check=False)


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


# --- MetaSchedule's builder and runner --------------------------------------------------------

def _connect_direct(host: str, port: int, key: str, timeout: int, _config: Any):
    """MetaSchedule f_create_session for a server reached without a tracker."""
    from tvm import rpc

    return rpc.connect(host, port, key=key, session_timeout=timeout)


def measure_setup(recipe: Recipe, endpoint: Endpoint | None, *, timeout: int = 60) -> tuple[Any, Any, str]:
    """(builder, runner, description) for measuring candidates for ``recipe``: local when
    ``endpoint`` is None (a native board), else built with the board's compiler and run over RPC."""
    from tvm.s_tir import meta_schedule as ms

    from .tuning import cross_export_for

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False)
    if endpoint is None:
        if recipe.foreign:
            raise UserError(f"{recipe.name} is not this machine's architecture: its candidates must run on the "
                            "board over TVM's RPC",
                            hint="give --host USER@DEVICE (tvmbundle starts the RPC server there over SSH), "
                                 "--rpc HOST:PORT or --tracker HOST:PORT --key KEY, or --emulate to check the "
                                 "flow under qemu-user")
        builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=120)
        runner = ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=timeout)
        return builder, runner, "local"
    tc = toolchain.resolve(recipe)
    builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=120, f_export=cross_export_for(tc))
    if endpoint.tracker:
        config = ms.runner.RPCConfig(tracker_host=endpoint.host, tracker_port=endpoint.port,
                                     tracker_key=endpoint.key, session_timeout_sec=timeout)
        runner = ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1)
    else:
        # RPCRunner insists on tracker fields even when sessions are made another way.
        config = ms.runner.RPCConfig(tracker_host="direct", tracker_port=endpoint.port, tracker_key=endpoint.key,
                                     session_timeout_sec=timeout)
        runner = ms.runner.RPCRunner(
            rpc_config=config, evaluator_config=evaluator, max_workers=1,
            f_create_session=functools.partial(_connect_direct, endpoint.host, endpoint.port, endpoint.key, timeout))
    return builder, runner, endpoint.describe()
