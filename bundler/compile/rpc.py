"""Measuring on the board: the device-side RPC server and MetaSchedule's builder and runner.

The server is ``tvm-deploy rpc``: the bundle's own harness and runtime libraries (an "RPC kit",
``bin/`` + ``lib/`` as in a bundle), so candidates are measured by exactly the runtime a bundle
ships. It can run

* on a device over SSH (``--host``, :mod:`bundler.device.rpcserver`);
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
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler import cache
from bundler.build import harness, runtime, toolchain
from bundler.config.recipe import Recipe
from bundler.errors import UserError, last_line
from bundler.proc import which

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


# --- MetaSchedule's builder and runner --------------------------------------------------------

def cross_export(cxx: str, options: list[str], mod) -> str:
    """MetaSchedule builder export for a foreign board: link the candidate into a shared library
    with the board's compiler, since the board has no linker of its own."""
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler(cxx, options=options))
    return path


def cross_export_for(tc) -> Callable:
    options = [f"--sysroot={tc.sysroot}"] if tc.sysroot else []
    return functools.partial(cross_export, str(tc.cxx), [*options, *tc.ldflags])


def connect(endpoint: Endpoint, timeout: int = 60):
    """A session with the server (one of the tracker's, behind a tracker)."""
    from tvm import rpc as tvm_rpc

    try:
        if endpoint.tracker:
            return tvm_rpc.connect_tracker(endpoint.host, endpoint.port).request(endpoint.key, session_timeout=timeout)
        return tvm_rpc.connect(endpoint.host, endpoint.port, key=endpoint.key, session_timeout=timeout)
    except Exception as e:  # noqa: BLE001 -- TVM's RPC errors: said with where it tried
        last = last_line(e)
        raise UserError(f"cannot reach the RPC server ({endpoint.describe()}): {last}") from None


def _connect_direct(host: str, port: int, key: str, timeout: int, _config: Any):
    """MetaSchedule f_create_session for a server reached without a tracker."""
    from tvm import rpc

    return rpc.connect(host, port, key=key, session_timeout=timeout)


def measure_setup(recipe: Recipe, endpoint: Endpoint | None, *, timeout: int = 60) -> tuple[Any, Any, str]:
    """(builder, runner, description) for measuring candidates for ``recipe``: local when
    ``endpoint`` is None (a native board), else built with the board's compiler and run over RPC.

    The builder (a :class:`bundler.compile.tuning.CandidateBuilder`) builds on every core of this
    machine; behind a tracker the runner measures on every server registered under the key at once.
    The runners' worker processes ignore Ctrl-C: tuning stops them itself, keeping what was measured.
    """
    from tvm.s_tir import meta_schedule as ms

    from bundler.compile import candidates, tuning

    # Each run starts with the kernel's weights and output flushed from the caches (its input, the
    # first argument, stays: in a model the kernel before has just written it). That is how a
    # kernel runs inside a model, whose weights do not all fit in the caches. Timed hot, tile
    # choices that re-read the weights look faster than they run: on ResNet-18 (AVX-512, 2
    # threads) knobs chosen hot summed to 11% less kernel time and made the model 4% slower;
    # flushed, the default kernels sum to 8.9 ms against 9.3 ms for the whole model. One call per
    # repetition, since a second call would find them cached again.
    evaluator = ms.runner.EvaluatorConfig(number=1, repeat=15, min_repeat_ms=0, enable_cpu_cache_flush=True)
    workers = max(1, os.cpu_count() or 1)
    if endpoint is None:
        if recipe.foreign:
            raise UserError(f"{recipe.name} is not this machine's architecture: its candidates must run on the "
                            "board over TVM's RPC",
                            hint="give --host USER@DEVICE (tvmbundle starts the RPC server there over SSH), "
                                 "--rpc HOST:PORT or --tracker HOST:PORT --key KEY, or --emulate to check the "
                                 "flow under qemu-user")
        builder = tuning.CandidateBuilder(workers=workers, timeout=120)
        runner = ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=timeout,
                                       initializer=tuning.ignore_sigint(recipe.service.threads))
        return builder, runner, "local"
    tc = toolchain.resolve(recipe)
    options = [f"--sysroot={tc.sysroot}"] if tc.sysroot else []
    builder = tuning.CandidateBuilder(workers=workers, timeout=120, f_export=functools.partial(
        candidates.cross_export, str(tc.cxx), [*options, *tc.ldflags]))
    if endpoint.tracker:
        config = ms.runner.RPCConfig(tracker_host=endpoint.host, tracker_port=endpoint.port,
                                     tracker_key=endpoint.key, session_timeout_sec=timeout)
        runner = ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator,
                                     max_workers=_tracker_servers(endpoint), initializer=tuning.ignore_sigint())
    else:
        # RPCRunner insists on tracker fields even when sessions are made another way.
        config = ms.runner.RPCConfig(tracker_host="direct", tracker_port=endpoint.port, tracker_key=endpoint.key,
                                     session_timeout_sec=timeout)
        runner = ms.runner.RPCRunner(
            rpc_config=config, evaluator_config=evaluator, max_workers=1, initializer=tuning.ignore_sigint(),
            f_create_session=functools.partial(_connect_direct, endpoint.host, endpoint.port, endpoint.key, timeout))
    return builder, runner, endpoint.describe()


def _tracker_servers(endpoint: Endpoint) -> int:
    """How many servers the tracker has under the key (at least 1): measured on at once."""
    from tvm import rpc as tvm_rpc

    try:
        summary = tvm_rpc.connect_tracker(endpoint.host, endpoint.port).summary()
    except Exception as e:  # noqa: BLE001 -- the runner reports an unreachable tracker itself
        log.debug("tracker %s:%d: %s", endpoint.host, endpoint.port, e)
        return 1
    queue = summary.get("queue_info", {}).get(endpoint.key, {})
    servers = sum(1 for s in summary.get("server_info", []) if str(s.get("key", "")).split(":")[-1] == endpoint.key)
    return max(1, servers, int(queue.get("free", 0) or 0))
