"""Latency of a bundle: its own ``tvm-deploy bench --json``, where the bundle's board runs it.

Where the harness runs:

* natively here, when the bundle's board is this machine's CPU family (the bundle is unpacked
  into a temporary folder);
* on a device over SSH (``target``): when the bundle is the device's current release it runs
  ``PREFIX/bundles/NAME/current/bin/tvm-deploy``; otherwise the bundle is uploaded into a fresh temporary
  folder on the device, unpacked, run and removed again (nothing under PREFIX is touched);
* under qemu-user here (``emulate``), for foreign boards: it checks the flow, and the report
  marks its timings as emulated (they mean nothing).

With ``onnx_model`` (the ONNX file the bundle was built from, checked against the manifest's
``model.source_sha256``) and onnxruntime importable, the bundle's selftest inputs also run through
onnxruntime in this process, with the same warm-up, runs and thread count
(``intra_op_num_threads``).  onnxruntime always runs on *this* machine: every figure says where
it was measured, and the report says whether the two are comparable (same machine, not emulated).
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import socket
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bundler import proc
from bundler.config import cpu, values
from bundler.config import recipe as recipe_mod
from bundler.device.ssh import Remote, Target
from bundler.errors import DeployError, UserError
from bundler.package import bundle as bundle_mod
from bundler.package import layout
from bundler.package.manifest import Manifest
from bundler.package.verifier import board_for, harness_argv

MODES = ("native", "ssh", "emulated")
DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3


@dataclass(frozen=True)
class Latency:
    """One runtime's figures, in milliseconds, and where they were measured."""

    runtime: str            # "tvm" (the bundle's harness) or "onnxruntime"
    version: str
    where: str              # the machine, e.g. "this machine (build01, x86_64)" or "root@10.0.0.7 (aarch64)"
    emulated: bool          # measured under qemu-user: the figures mean nothing
    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    runs: int
    warmup: int
    threads: int


@dataclass
class BenchReport:
    bundle: str
    bundle_id: str
    name: str
    board: str
    cpu_family: str
    mode: str                       # one of MODES
    runs: int
    warmup: int
    threads: int
    tvm: Latency
    onnxruntime: Latency | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def comparable(self) -> bool:
        """Both figures exist, were measured on the same machine and not under emulation."""
        ort = self.onnxruntime
        return ort is not None and not self.tvm.emulated and self.tvm.where == ort.where

    @property
    def results(self) -> list[Latency]:
        return [self.tvm] + ([self.onnxruntime] if self.onnxruntime else [])

    def to_json(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "bundle_id": self.bundle_id, "name": self.name, "board": self.board,
                "cpu_family": self.cpu_family, "mode": self.mode, "runs": self.runs, "warmup": self.warmup,
                "threads": self.threads, "comparable": self.comparable,
                "results": [asdict(r) for r in self.results], "notes": list(self.notes)}


def bench(bundle: Path | str, *, target: Target | None = None, runs: int = DEFAULT_RUNS,
          warmup: int = DEFAULT_WARMUP, threads: int | None = None, onnx_model: Path | str | None = None,
          emulate: bool = False, step_timeout: float = 60.0) -> BenchReport:
    """Run the bundle's ``tvm-deploy bench`` (here, on ``target`` over SSH, or under qemu-user with
    ``emulate``) and, with ``onnx_model``, onnxruntime here on the same inputs.

    ``threads`` defaults to the bundle's ``service.threads`` (what the service runs with and the
    model was compiled for).  Raises a UserError for anything the caller can fix."""
    bundle = Path(bundle)
    if not isinstance(runs, int) or runs < 1:
        raise UserError(f"--runs: {runs!r} is not allowed; expected a whole number of 1 or more")
    if not isinstance(warmup, int) or warmup < 0:
        raise UserError(f"--warmup: {warmup!r} is not allowed; expected a whole number of 0 or more")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UserError(f"--threads: {threads!r} is not allowed; expected a whole number of 1 or more")
    if target is not None and emulate:
        raise UserError("give only one of --host (run on the device) and --emulate (run here under qemu-user)")
    if not bundle.is_file():
        raise UserError(f"{bundle}: no such bundle file; expected a bundle .tar.gz written by `tvmbundle make`")
    if not tarfile.is_tarfile(bundle):
        raise UserError(f"{bundle}: not a bundle (not a tar archive); expected a bundle .tar.gz written by "
                        f"`tvmbundle make`")
    model = Path(onnx_model) if onnx_model is not None else None
    if model is not None and not model.is_file():
        raise UserError(f"--model: {model}: no such file; expected the ONNX model the bundle was built from")

    with tempfile.TemporaryDirectory(prefix="tvmbundle-bench-") as tmp:
        top = bundle_mod.extract(bundle, Path(tmp))
        manifest = bundle_mod.load_manifest(top, str(bundle))
        board = manifest.board
        family = board.cpu_family
        n_threads = threads or manifest.service.threads
        if model is not None:
            _check_source(model, manifest)
        here = recipe_mod.host_cpu_family()
        notes: list[str] = []
        args = ["--threads", str(n_threads), "bench", "--warmup", str(warmup), "--repeat", str(runs), "--json"]
        if target is not None:
            mode = "ssh"
            figures, where, how = _on_device(bundle, top, manifest, target, args, runs, step_timeout)
            notes.append(how)
        elif family == here:
            mode = "native"
            if emulate:
                notes.append(f"--emulate ignored: the board is {family}, this machine's CPU family; it ran natively")
            figures = _run_local([str(top / "bin" / "tvm-deploy"), *args], runs)
            where = this_machine()
        elif emulate:
            mode = "emulated"
            facts = board_for(manifest, None)
            figures = _run_local(harness_argv(top, facts, *args), runs)
            where = f"this machine ({socket.gethostname()}, {here}) under {facts.qemu}"
            notes.append(f"emulated: the {family} harness ran under {facts.qemu} here; its timings mean nothing")
        else:
            raise UserError(f"{bundle.name}: the bundle is for {board.name} ({family}) and this "
                            f"machine is {here}, so it cannot run here natively; give --host USER@HOST[:PORT] "
                            f"to run it on the device over SSH, or --emulate to check the flow under qemu-user "
                            f"(timings then mean nothing)")
        tvm = _latency("tvm", _tvm_version(manifest), where, mode == "emulated", figures, runs, warmup, n_threads)
        report = BenchReport(str(bundle), manifest.bundle_id, manifest.name, board.name, family, mode, runs, warmup, tvm.threads, tvm, notes=notes)
        if model is None:
            report.notes.append("no onnxruntime figures: give --model (the ONNX file the bundle was built from)")
        else:
            report.onnxruntime = _onnxruntime(model, top, manifest, runs, warmup, tvm.threads, report.notes)
            if report.onnxruntime is not None and not report.comparable:
                report.notes.append("not comparable: onnxruntime ran on this machine, the bundle "
                                    + ("under emulation" if mode == "emulated" else f"on {where}"))
    return report


def require_native(board: str | recipe_mod.Recipe) -> recipe_mod.Recipe:
    """``make --bench`` runs the benchmark here: refuse, before building, a board of another CPU family."""
    r = board if isinstance(board, recipe_mod.Recipe) else recipe_mod.load(board)
    here = recipe_mod.host_cpu_family()
    if r.machine.cpu_family != here:
        raise UserError(f"--bench: {r.name}'s CPU family is {r.machine.cpu_family} and this machine's is {here}; "
                        f"make --bench runs the benchmark here, so only for {here} boards",
                        hint="make the bundle, then: tvmbundle bench dist/<bundle>.tar.gz --host USER@HOST "
                             "--model MODEL.onnx")
    return r


def this_machine() -> str:
    return f"this machine ({socket.gethostname()}, {recipe_mod.host_cpu_family()})"


# --- the harness ----------------------------------------------------------------------------

def _parse(stdout: str, origin: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                break
            if isinstance(data, dict) and "p50_ms" in data:
                return data
    raise UserError(f"{origin}: `tvm-deploy bench --json` printed no result: "
                    + (" | ".join(stdout.strip().splitlines()[-3:]) or "(nothing)"))


def _run_local(argv: Sequence[str], runs: int) -> dict[str, Any]:
    res = proc.run(argv, what="run the bundle's benchmark", timeout=max(600.0, runs * 60.0))
    return _parse(res.stdout, "here")


def _on_device(bundle: Path, top: Path, manifest: Manifest, target: Target, args: list[str],
               runs: int, step_timeout: float) -> tuple[dict[str, Any], str, str]:
    """Run the bench on the device: its current release when that is this bundle, else an upload
    into a temporary folder that is removed afterwards.  Returns (figures, where, how)."""

    board = manifest.board
    prefix = (target.prefix or manifest.install.prefix).rstrip("/")
    problem = values.install_prefix(prefix)
    if problem:
        raise UserError(f"--prefix: {problem}")
    bid = manifest.bundle_id
    current = layout.current(prefix, manifest.name)
    bench_timeout = max(step_timeout, 600.0, runs * 60.0)
    q = shlex.quote
    with Remote(target, step_timeout=step_timeout) as r:
        facts = dict(line.partition("=")[::2] for line in r.sh(
            f'echo "arch=$(uname -m)"; echo "current=$(readlink {q(current)} 2>/dev/null)"',
            "preflight").out.splitlines())
        arch = facts.get("arch", "").strip()
        if cpu.from_uname(arch) != board.cpu_family:
            raise DeployError(target.name, "preflight", f"the device is {arch}, the bundle is for "
                                                        f"{board.cpu_family} ({board.name}); nothing was run")
        where = f"{target.name} ({arch})"
        if facts.get("current", "").strip().rsplit("/", 1)[-1] == bid:
            exe = f"{current}/bin/tvm-deploy"
            return _remote_bench(r, exe, args, bench_timeout), where, \
                f"ran the device's current release ({current}, {bid[:12]})"
        tmp = r.sh('mktemp -d "${TMPDIR:-/tmp}/tvmbundle-bench.XXXXXX"', "upload").out.strip()
        if not tmp.startswith("/"):
            raise DeployError(target.name, "upload", f"mktemp gave no folder ({tmp!r})")
        try:
            r.put(bundle, f"{tmp}/bundle.tar.gz", "upload",
                  timeout=max(step_timeout, bundle.stat().st_size / 1e6))
            r.sh(f"cd {q(tmp)} && tar xzf bundle.tar.gz && rm -f bundle.tar.gz", "upload", timeout=120)
            figures = _remote_bench(r, f"{tmp}/{top.name}/bin/tvm-deploy", args, bench_timeout)
        finally:
            transport = r.conn.client.get_transport() if r.conn is not None else None
            if transport is not None and transport.is_active():
                r.sh(f"rm -rf {q(tmp)}", "cleanup", check=False)
        return figures, where, (f"{bid[:12]} is not the device's current release: it was uploaded to a "
                                f"temporary folder there, run and removed")


def _remote_bench(r: Remote, exe: str, args: list[str], timeout: float) -> dict[str, Any]:
    res = r.run([exe, *args], "bench", timeout=timeout, check=False)
    if res.code != 0:
        raise DeployError(r.target.name, "bench", f"`tvm-deploy bench` exited {res.code}: "
                          + " | ".join((res.err or res.out).strip().splitlines()[-3:]))
    return _parse(res.out, r.target.name)


def _tvm_version(manifest: Manifest) -> str:
    return f"apache-tvm {manifest.runtime.get('apache-tvm', '?')}"


def _latency(runtime: str, version: str, where: str, emulated: bool, figures: Mapping[str, Any], runs: int,
             warmup: int, threads: int) -> Latency:
    try:
        values = {k: float(figures[k]) for k in ("p50_ms", "p90_ms", "mean_ms", "min_ms", "max_ms")}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: `tvm-deploy bench --json` gave an incomplete result ({e}): {dict(figures)}") \
            from None
    reported = int(figures.get("threads", -1) or -1)
    return Latency(runtime, version, where, emulated, runs=int(figures.get("repeat", runs)),
                   warmup=int(figures.get("warmup", warmup)), threads=reported if reported > 0 else threads,
                   **values)


def summarize(ms: Sequence[float]) -> dict[str, float]:
    """mean/p50/p90/min/max of ``ms``, percentiles picked as the harness picks them (nearest rank)."""
    s = sorted(ms)
    n = len(s)

    def pct(p: float) -> float:
        return s[min(n - 1, max(0, math.ceil(p * n) - 1))]

    return {"p50_ms": pct(0.5), "p90_ms": pct(0.9), "mean_ms": sum(s) / n, "min_ms": s[0], "max_ms": s[-1]}


# --- onnxruntime ----------------------------------------------------------------------------

def _check_source(model: Path, manifest: Manifest) -> None:
    want = manifest.model.source_sha256
    h = hashlib.sha256()
    with open(model, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if want and h.hexdigest() != want:
        src = manifest.model.source
        raise UserError(f"--model: {model} is not the model this bundle was built from (its sha256 "
                        f"{h.hexdigest()[:12]} differs from the manifest's {want[:12]}, of {src}); "
                        f"give the same ONNX file")


def _onnxruntime(model: Path, top: Path, manifest: Manifest, runs: int, warmup: int, threads: int,
                 notes: list[str]) -> Latency | None:
    try:
        import onnxruntime as ort
    except ImportError:
        notes.append("no onnxruntime figures: onnxruntime is not installed here (pip install onnxruntime)")
        return None
    import numpy as np

    specs = manifest.model.inputs
    files = manifest.selftest.inputs
    arrays = [np.load(top / rel) for rel in files]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        wanted = [s.name for s in specs]
        if len(arrays) != len(names):
            raise UserError(f"--model: {model.name} takes {len(names)} input(s) ({', '.join(names)}), the bundle's "
                            f"selftest has {len(arrays)}")
        keys = wanted if sorted(wanted) == sorted(names) else names
        feed = dict(zip(keys, arrays))
        for _ in range(warmup):
            sess.run(None, feed)
        ms = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feed)
            ms.append((time.perf_counter() - t0) * 1000.0)
    except UserError:
        raise
    except Exception as e:           # onnxruntime raises its own exception types for bad models
        raise UserError(f"--model: onnxruntime could not run {model.name} on the bundle's selftest inputs: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return Latency("onnxruntime", f"onnxruntime {ort.__version__}", this_machine(), False, runs=runs,
                   warmup=warmup, threads=threads,
                   **{k: round(v, 4) for k, v in summarize(ms).items()})

