"""The typed Python API: what the CLI, image builders and scripts call."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundler import cache
from bundler.build import harness, runtime, toolchain
from bundler.compile import model as model_mod
from bundler.compile import prepared as prepared_mod
from bundler.compile import rpc, tuning, verdict
from bundler.compile.pipeline import board_target
from bundler.config import recipe as recipe_mod
from bundler.config import values
from bundler.errors import UserError, one_of
from bundler.package import bundle as bundle_mod
from bundler.package import signing
from bundler.package.debian import build_deb
from bundler.package.manifest import FORMAT, MANIFEST, Manifest
from bundler.package.verifier import Report, verify
from bundler.progress import Progress, StepRecord


@dataclass(frozen=True)
class MakeResult:
    bundle: Path
    bundle_id: str
    manifest: Manifest
    steps: list[StepRecord] = field(default_factory=list)
    verified: Report | None = None
    overlay: Path | None = None      # --format overlay: the overlay tarball (its tree beside it); deb: the .deb

    @property
    def rebuilt(self) -> list[str]:
        """The build steps that did real work (empty on a warm make)."""
        return [s.name for s in self.steps if not s.cached and s.name.split(" ")[0] in _BUILD_STEPS]


CHECK_GRACE = 30.0      # s past tune's time limit the whole-model check may start a compile or a round
_BUILD_STEPS = {"prepare", "get", "build", "compile", "compute", "package"}


def load_recipe(board: str | recipe_mod.Recipe) -> recipe_mod.Recipe:
    return board if isinstance(board, recipe_mod.Recipe) else recipe_mod.load(board)


def bundle_name(model_path: Path) -> str:
    """The model file's name without a final ``.onnx``: ``mobile_v2.0_cls.onnx`` and
    ``mobile_v2.0_rec.onnx`` must not get the same bundle name. Characters a unit name or a
    path on the device could misread become ``-``."""
    name = model_path.name
    stem = name[: -len(".onnx")] if name.lower().endswith(".onnx") else name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "model"


def make(board: str | recipe_mod.Recipe, model: Path | str, *,
         input_shapes: Mapping[str, Sequence[int]] | None = None,
         out_dir: Path | str = "dist", fmt: str = "tar", run_verify: bool = True,
         progress: Progress | None = None, runtime_source: str | None = None,
         allow_runtime_mismatch: bool | None = None, tuned: bool | Path | str = True,
         reverify: bool = False, sign: Path | str | None = None, listen: str | None = None) -> MakeResult:
    """Build a verified bundle of ``model`` for ``board``; returns where it was written.

    ``listen`` (HOST:PORT) overrides the recipe's service.listen: each bundle a device runs needs
    an address of its own.

    ``tuned``: True applies the database `tvmbundle tune` wrote for this model, board target and
    TVM version, when there is one; a folder applies that database; False compiles untuned.

    ``runtime_source`` overrides the recipe's runtime.source ("wheel", "git" or a TVM tree's path);
    ``allow_runtime_mismatch`` its runtime.allow_version_mismatch.

    A bundle verified before for this board (same bytes, qemu and sysroot) is not verified
    again unless ``reverify``. ``sign`` (a private OpenSSH key) signs the bundle's manifest; verify
    then checks the signature against ``KEY.pub`` when it is there.
    """
    progress = progress or Progress(quiet=True)
    if fmt not in bundle_mod.FORMATS:
        raise UserError(f"--format: {fmt!r} is not allowed; expected {one_of(bundle_mod.FORMATS)}")
    r = load_recipe(board)
    if listen is not None:
        problem = values.listen_address(listen)
        if problem:
            raise UserError(f"--listen: {problem}")
        r = dataclasses.replace(r, service=dataclasses.replace(r.service, listen=listen))
    model = Path(model)
    out_dir = Path(out_dir)
    shapes = {k: tuple(v) for k, v in r.model.input_shapes}
    shapes.update({k: tuple(v) for k, v in (input_shapes or {}).items()})
    epoch = bundle_mod.source_date_epoch()

    with progress.step(f"find the {r.name} toolchain") as s:
        tc = toolchain.resolve(r)
        s.done(detail=f"{tc.cxx.name} ({tc.machine})")
    versions = runtime.compiler_versions()
    with progress.step(f"prepare {model.name}") as s:
        prepared = prepared_mod.prepare(model, shapes or None)
        model_id = prepared.model_id
        s.done(cached=prepared.cached, detail=_signature_line(prepared) + (
            f", folded {prepared.folded_nodes} nodes" if prepared.folded_nodes else ""))
    source = runtime_source or r.runtime.source
    what = f"the {r.runtime.platform} wheels" if source == "wheel" else "TVM's sources"
    with progress.step(f"get the TVM runtime for {r.name} from {what}") as s:
        rt = runtime.get(r, source=source, allow_mismatch=allow_runtime_mismatch, step=s)
        tree = (rt.build or {}).get("tree") if rt.build else None
        s.done(cached=rt.cached, detail=f"apache-tvm {versions['apache-tvm']}" + (
            f", tree {tree['version'] or tree['identity'][:19]} ({rt.build['lock']})" if tree else ""))
    with progress.step(f"build the deploy harness for {r.name}") as s:
        h = harness.build(tc, rt)
        s.done(cached=h.cached)
    db = _tuning_database(tuned, model_id, r, versions)
    if db is not None:
        progress.note(f"applying tuning database {db.key[:12]} ({db.records} measured candidates, "
                      f"{db.workloads} kernels)")
    with progress.step(f"compile {model.name} for {r.name}") as s:
        compiled = model_mod.compile_for_board(prepared, model_id, model, r, tc, versions, database=db)
        s.done(cached=compiled.cached, detail=_tuning_detail(db))
    with progress.step("compute selftest vectors on this machine") as s:
        vectors = model_mod.selftest_vectors(prepared, model_id, model, r.model.seed, versions)
        s.done(cached=vectors.cached)

    name = bundle_name(model)
    parts: dict[str, Path] = {f"bin/{harness.BINARY}": h.path, "model/model.so": compiled.path}
    parts.update({f"lib/{p.name}": p for p in rt.libs})
    parts.update({f"selftest/{p.name}": p for p in [*vectors.inputs, *vectors.expected]})

    with progress.step("package the bundle") as s, tempfile.TemporaryDirectory(prefix="tvmbundle-") as tmp:
        staging = Path(tmp) / "stage"
        files = bundle_mod.stage(staging, parts)
        identity = _manifest(r, name, model, prepared, versions, rt, vectors, epoch)
        identity["tuning"] = db.manifest() if db else None
        bid = bundle_mod.bundle_id(files, identity)
        manifest = Manifest.from_json({"format": FORMAT, "bundle_id": bid, **identity,
                                       "files": [f.to_json() for f in files]}, f"{name}: {MANIFEST}")
        bundle_mod.write_manifest(staging, manifest)
        top = f"{name}-{r.name}-{bid[:8]}"
        tar_key = cache.key("bundle", bid, epoch, fmt)

        def build_tar(dest: Path) -> dict[str, Any]:
            bundle_mod.write_tarball(staging, top, dest / f"{top}.tar.gz", epoch)
            return {}

        entry = cache.get("bundle", tar_key, build_tar)
        out_dir.mkdir(parents=True, exist_ok=True)
        out = _publish(entry.path / f"{top}.tar.gz", out_dir)
        overlay = None
        if fmt == "overlay":
            overlay = _publish_overlay(staging, manifest, out_dir / f"{top}-overlay", epoch)
        elif fmt == "deb":
            overlay = build_deb(staging, manifest, out_dir, epoch, Path(tmp))
        s.done(cached=entry.hit, detail=str(overlay or out))

    trust: list[Path] = []
    if sign is not None:
        with progress.step(f"sign {out.name} with {Path(sign).name}") as s:
            signing.sign(out, Path(sign))
            pub = Path(f"{sign}.pub")
            trust = [pub] if pub.is_file() else []
            s.done()
    report = None
    if run_verify:
        report = verify(out, board=r, progress=progress, reverify=reverify, trust=trust)
    return MakeResult(out, bid, manifest, list(progress.steps), report, overlay)


def _tuning_detail(db: tuning.Database | None) -> str:
    if db is None:
        return "untuned: default schedules"
    check = db.usage.get("model_check", "unchecked")
    applied = db.usage.get("kernels_tuned", 0) + db.usage.get("kernels_from_other_models", 0)
    if check == "defaults":
        return "default schedules: the whole model measured slower with its tuning"
    if check == "knobs":
        return "tuned knobs of the default schedules: the whole model measured slower with its records"
    if not applied:
        return "default schedules: no tuning of its kernels beat them"
    if check == "unchecked":
        return "tuned (the whole model not timed with it yet: `tvmbundle tune` does)"
    return "tuned: faster than the default schedules on the whole model"


def _tuning_database(tuned: bool | Path | str, model_id: str, r: recipe_mod.Recipe,
                     versions: dict[str, str]) -> tuning.Database | None:
    if tuned is False:
        return None
    if tuned is True:
        return tuning.find(model_id, r, versions)
    db = tuning.open_database(Path(tuned))
    if db is None:
        raise UserError(f"--tuning-db: {tuned}: no tuning records there "
                        f"(expected {tuning.RECORDS}, written by `tvmbundle tune`)")
    return db


def _publish(src: Path, out_dir: Path) -> Path:
    """Copy a finished file into the output folder atomically (a reader never sees half of it)."""
    out = out_dir / src.name
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(out)
    return out


def _publish_overlay(release: Path, manifest: Manifest, tree: Path, epoch: int) -> Path:
    """The overlay tree ``tree`` and its tarball ``tree``.tar.gz (replacing older ones of that name)."""
    tmp_tree = tree.with_name(f".{tree.name}.tmp")
    shutil.rmtree(tmp_tree, ignore_errors=True)
    tmp_tree.mkdir()
    bundle_mod.write_overlay(release, manifest, tmp_tree)
    shutil.rmtree(tree, ignore_errors=True)
    tmp_tree.rename(tree)
    tarball = tree.with_name(f"{tree.name}.tar.gz")
    bundle_mod.write_tarball(tree, None, tarball, epoch)
    return tarball


def _signature_line(p: prepared_mod.Prepared) -> str:
    def fmt(specs: tuple[prepared_mod.TensorSpec, ...]) -> str:
        return ", ".join(f"{s.name}:{s.dtype}{list(s.shape)}" for s in specs)
    return f"{fmt(p.inputs)} -> {fmt(p.outputs)}"


def _manifest(r: recipe_mod.Recipe, name: str, model: Path, prepared: prepared_mod.Prepared,
              versions: dict[str, str], rt: runtime.Runtime, vectors: model_mod.Vectors,
              epoch: int) -> dict[str, Any]:
    return {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)),
        "board": {"name": r.name, "title": r.board.title, "cpu_family": r.machine.cpu_family,
                  "cpu": r.machine.cpu, "triple": r.machine.triple, "glibc": r.machine.glibc,
                  "glibcxx": r.machine.glibcxx, "float_abi": r.machine.float_abi,
                  "base_libs": list(r.machine.base_libs)},
        "target": board_target(r),
        "compiler": dict(versions),
        "runtime": rt.manifest(),
        "model": {"file": "model/model.so", "source": model.name, "source_sha256": prepared.source_sha256,
                  "inputs": [s.to_json() for s in prepared.inputs],
                  "outputs": [s.to_json() for s in prepared.outputs]},
        "selftest": {"inputs": [f"selftest/{p.name}" for p in vectors.inputs],
                     "expected": [f"selftest/{p.name}" for p in vectors.expected],
                     "rtol": r.model.rtol, "atol": r.model.atol, "seed": r.model.seed,
                     "reference": vectors.reference},
        "install": {"prefix": r.install_prefix},
        "service": {"listen": r.service.listen, "threads": r.service.threads, "user": r.service.user,
                    "environment": dict(r.service.environment)},
    }


def tune(board, model: Path | str | None, *, input_shapes=None, trials: int | None = None,
        time_limit: float | None = None, host: str | None = None, rpc_addr: str | None = None,
        tracker: str | None = None, key: str | None = None, emulate: bool = False,
        ssh_options: dict[str, Any] | None = None, progress=None, import_file: Path | str | None = None,
        export_file: Path | str | None = None) -> tuning.TuneResult:
    """`tvmbundle tune`: prepare the model as `make` does, then tune it for the board, measuring
    locally (native board), on a device over SSH (``host``), on a running server (``rpc_addr``),
    through a tracker (``tracker``/``key``) or under qemu-user here (``emulate``).

    The records go to the board target's database, shared by every model. ``import_file`` merges
    records exported elsewhere into it first; ``export_file`` writes it out at the end (both work
    without a model)."""
    import dataclasses

    progress = progress or Progress(quiet=True)
    r = load_recipe(board)
    if model is None:
        if not (import_file or export_file):
            raise UserError("give --model (the model to tune), or --import/--export to move tuning records")
        return _tune_records(r, import_file, export_file, progress, tuning.TuneResult(None, 0, 0, 0, 0.0, "no model"))
    model = Path(model)
    trials = trials if trials is not None else r.tune.trials
    time_limit = time_limit if time_limit is not None else r.tune.time_limit
    if sum(bool(x) for x in (host, rpc_addr, tracker, emulate)) > 1:
        raise UserError("give only one of --host, --rpc, --tracker and --emulate")
    if trials < 0:
        raise UserError(f"--trials: expected 0 or more (0: only the default schedules' knobs), got {trials}")
    shapes = {k: tuple(v) for k, v in r.model.input_shapes}
    shapes.update({k: tuple(v) for k, v in (input_shapes or {}).items()})
    versions = runtime.compiler_versions()
    with progress.step(f"prepare {model.name}") as s:
        prepared = prepared_mod.prepare(model, shapes or None)
        model_id = prepared.model_id
        s.done(cached=prepared.cached)
    key = key or rpc.DEFAULT_KEY
    imported = _tune_records(r, import_file, None, progress, tuning.TuneResult(None, 0, 0, 0, 0.0, "")).imported \
        if import_file else 0
    with contextlib.ExitStack() as stack:
        endpoint = None
        if emulate:
            with progress.step(f"start the {r.name} RPC server under {r.qemu or 'this machine'}") as s:
                endpoint = stack.enter_context(rpc.local_server(r, key=key))
                s.done(detail=endpoint.describe())
        elif host:
            # fabric and paramiko take most of a second to import: only tuning over SSH pays it.
            from bundler.device import rpcserver
            from bundler.device.ssh import Target

            with progress.step(f"start the RPC server on {host}") as s:
                endpoint = stack.enter_context(rpcserver.ssh_server(r, Target.parse(host, **(ssh_options or {})), key=key))
                s.done(detail=endpoint.describe())
        elif rpc_addr:
            h, p = rpc.parse_hostport("--rpc", rpc_addr)
            endpoint = rpc.Endpoint(h, p, key)
        elif tracker:
            h, p = rpc.parse_hostport("--tracker", tracker)
            endpoint = rpc.Endpoint(h, p, key, tracker=True)
        builder, runner, where = rpc.measure_setup(r, endpoint)
        if endpoint is None:
            os.environ.setdefault("TVM_NUM_THREADS", str(r.service.threads))
        limit = f", at most {time_limit:g} s" if time_limit else ""
        # The whole-model check after the loop may take a little past the limit, not more.
        deadline = time.monotonic() + time_limit + CHECK_GRACE if time_limit else None
        with progress.step(f"tune {model.name} for {r.name}: {trials} trials{limit}, measured {where}") as s:
            def report(done: int, total: int) -> None:
                s.update(f"measured {done}/{total}", min(1.0, done / total) if total else 1.0)
            result = tuning.tune(r, prepared, model_id, model, versions, trials=trials, timeout=time_limit or 0,
                          runner=runner, builder=builder, runner_name=where, on_progress=report)
            s.done(detail=f"{result.measured} new in {result.seconds:.0f} s ({result.trials_per_minute:g} "
                          f"trials/min, {result.stopped}), {result.previously} before; measured "
                          f"{result.kernels_measured} of {result.tasks} kernels, {result.kernels_skipped} "
                          f"had their share already; {result.variants} variants of the default schedules, "
                          f"{result.kernels_knobs} kernel(s) faster with tuned knobs")
        if emulate:
            progress.note("the whole-model check of the tuning is skipped: timings under qemu mean nothing")
        else:
            with progress.step(f"time {model.name} with and without its tuning, measured {where}") as s:
                v = verdict.check(r, prepared, model_id, model, versions, endpoint,
                                  "this machine" if endpoint is None else where, deadline)
                s.done(detail=v.describe() if v else "not checked: past the time limit"
                       if deadline is not None and time.monotonic() >= deadline else "no tuning applies to it")
            result = dataclasses.replace(result, check=v.to_json() if v else None)
    if imported:
        result = dataclasses.replace(result, imported=imported)
    return _tune_records(r, None, export_file, progress, result) if export_file else result


def _tune_records(r: recipe_mod.Recipe, import_file, export_file, progress, result):
    """`tune --import/--export`: merge a records file into the board target's database, or write it out."""
    import dataclasses

    target, versions = board_target(r), runtime.compiler_versions()
    store = tuning.open_store(target, versions)
    if import_file:
        with progress.step(f"import tuning records from {Path(import_file).name}") as s:
            if not Path(import_file).is_file():
                raise UserError(f"--import: {import_file}: no such file")
            added, dupes = tuning.import_records(store, Path(import_file), target, versions)
            s.done(detail=f"{added} new, {dupes} already there")
        result = dataclasses.replace(result, imported=added)
    if export_file:
        with progress.step(f"export the {r.name} tuning records to {export_file}") as s:
            n = tuning.export_records(store, Path(export_file), target, versions)
            s.done(detail=f"{n} records")
        result = dataclasses.replace(result, exported=n)
    if result.database is None:
        result = dataclasses.replace(result, database=tuning.open_database(store.path))
    return result
