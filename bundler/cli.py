"""The ``tvmbundle`` command: a thin layer over :mod:`bundler.api`.

Exit codes, in this one place: 0 success, 2 a user error (bad input, missing
tool, failed verification), 1 a bug (with its traceback), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import __version__, cache, doctor
from . import recipe as recipe_mod
from .errors import UserError
from .progress import Progress

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_INTERRUPT = 0, 1, 2, 130


def _out() -> Console:
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:     # logs and pipes: never fold a table row
        console = Console(highlight=False, soft_wrap=True, width=200)
    return console


# --- commands -----------------------------------------------------------------------------

def cmd_boards(args: argparse.Namespace) -> int:
    table = Table("board", "cpu", "triple", "glibc", "runtime", "name", box=None, pad_edge=False)
    rows = []
    for path in recipe_mod.available():
        try:
            r = recipe_mod.load(str(path))
            table.add_row(path.stem, f"{r.machine.cpu_family}/{r.machine.cpu}", r.machine.triple,
                          r.machine.glibc, r.runtime.source, r.board.title)
            rows.append({"board": path.stem, "recipe": str(path), "cpu_family": r.machine.cpu_family,
                         "cpu": r.machine.cpu, "triple": r.machine.triple, "glibc": r.machine.glibc,
                         "runtime": r.runtime.source, "name": r.board.title, "error": None})
        except UserError as e:
            table.add_row(path.stem, "", "", "", "", f"(invalid: {e.message})")
            rows.append({"board": path.stem, "recipe": str(path), "error": e.message})
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    _out().print(table)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    r = recipe_mod.load(args.board)
    if args.json:
        print(json.dumps({"board": r.name, "recipe": str(r.path), "values": r.values, "origins": r.origins},
                         indent=2, default=str))
        return EXIT_OK
    out = _out()
    out.print(f"{r.name}: {r.board.title}  ({recipe_mod.display_path(r.path)}"
              + "".join(f" <- {recipe_mod.display_path(p)}" for p in r.chain[1:]) + ")")
    table = Table("key", "value", "from", box=None, pad_edge=False)
    for key, value in r.values.items():
        if key in ("format", "extends"):
            continue
        if key in ("tvm.target", "service.environment", "model.input_shapes") and isinstance(value, dict):
            if not value:
                table.add_row(key, "{}", r.origins.get(key, ""))
            for sub, v in value.items():
                table.add_row(f"{key}.{sub}", _fmt(v), r.origins.get(f"{key}.{sub}", r.origins.get(key, "")))
            continue
        table.add_row(key, _fmt(value), r.origins.get(key, ""))
    out.print(table)
    return EXIT_OK


def _fmt(v: object) -> str:
    if v is None:
        return "(unset)"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(json.dumps(x) for x in v) + "]"
    return json.dumps(v) if not isinstance(v, str) else (v if v else '""')


def cmd_doctor(args: argparse.Namespace) -> int:
    r = recipe_mod.load(args.board)
    findings = doctor.examine(r)
    if getattr(args, "json", False):
        fixes = doctor.fix_commands(findings)
        print(json.dumps({"board": r.name, "title": r.board.title, "ok": not fixes,
                          "findings": [{"check": f.what, "ok": f.ok, "detail": f.detail, "install": f.install}
                                       for f in findings], "fix": fixes}, indent=2))
        return EXIT_USER if fixes else EXIT_OK
    table = Table("", "check", "detail", box=None, pad_edge=False)
    for f in findings:
        table.add_row("ok" if f.ok else "MISSING", f.what, f.detail)
    out = _out()
    out.print(f"{r.name}: {r.board.title}")
    out.print(table)
    fixes = doctor.fix_commands(findings)
    if fixes:
        out.print("\nTo fix, run:")
        for c in fixes:
            out.print(f"  {c}")
        return EXIT_USER
    out.print("\nEverything needed for this board is here.")
    return EXIT_OK


def cmd_make(args: argparse.Namespace) -> int:
    from . import api, bench, onnxmodel

    shapes = dict(onnxmodel.parse_input_shape(s) for s in args.input_shape or [])
    if args.bench:
        bench.require_native(args.board)      # refuse a foreign board before the build, not after
    progress = Progress(quiet=args.quiet)
    start = time.monotonic()
    result = api.make(args.board, Path(args.model), input_shapes=shapes, out_dir=Path(args.out),
                      fmt=args.format, run_verify=not args.no_verify, progress=progress,
                      runtime_source=args.runtime_source,
                      allow_runtime_mismatch=True if args.allow_runtime_mismatch else None,
                      tuned=False if args.no_tuning else (Path(args.tuning_db) if args.tuning_db else True))
    report = None
    if args.bench:
        with progress.step(f"benchmark {result.bundle.name} here") as s:
            report = bench.bench(result.bundle, onnx_model=Path(args.model))
            s.done(detail=f"p50 {report.tvm.p50_ms:.3f} ms" + (f", onnxruntime {report.onnxruntime.p50_ms:.3f} ms"
                                                              if report.onnxruntime else ""))
    if args.json:
        print(json.dumps({"bundle": str(result.bundle), "bundle_id": result.bundle_id,
                          "overlay": str(result.overlay) if result.overlay else None,
                          "rebuilt": result.rebuilt,
                          "steps": [{"name": s.name, "seconds": round(s.seconds, 3), "cached": s.cached}
                                    for s in result.steps],
                          **({"bench": report.to_json()} if report else {})}, indent=2))
    else:
        verified = " and verified" if result.verified else ""
        progress.note(f"bundle{verified} in {time.monotonic() - start:.1f} s: {result.bundle}")
        if report:      # on stderr: stdout stays the bundle's path alone, for scripts
            _print_bench(Console(stderr=True, highlight=False, soft_wrap=True, width=200), report)
        print(result.overlay or result.bundle)
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    from . import onnxmodel, tuning

    shapes = dict(onnxmodel.parse_input_shape(s) for s in args.input_shape or [])
    progress = Progress(quiet=args.quiet)
    ssh = {"identity": Path(args.identity) if args.identity else None,
           "known_hosts": Path(args.known_hosts) if args.known_hosts else None,
           "accept_new_host_key": args.accept_new_host_key}
    try:
        result = tuning.run(args.board, Path(args.model), input_shapes=shapes, trials=args.trials,
                            time_limit=tuning.parse_duration(args.time_limit) if args.time_limit else None,
                            host=args.host, rpc_addr=args.rpc, tracker=args.tracker, key=args.key,
                            emulate=args.emulate, ssh_options=ssh, progress=progress)
    except KeyboardInterrupt:
        print("tvmbundle: interrupted; what was measured is kept: run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPT
    db = result.database
    if args.json:
        print(json.dumps({"database": str(db.path) if db else None, "records": db.records if db else 0,
                          "workloads": db.workloads if db else 0, "tasks": result.tasks,
                          "measured": result.measured, "previously": result.previously,
                          "seconds": round(result.seconds, 1), "stopped": result.stopped}, indent=2))
    else:
        print(db.path if db else "no tuning records")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    report = bench.bench(Path(args.bundle), target=_target(args) if args.host else None, runs=args.runs,
                         warmup=args.warmup, threads=args.threads,
                         onnx_model=Path(args.model) if args.model else None, emulate=args.emulate)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_bench(_out(), report)
    return EXIT_OK


def _print_bench(out: Console, report) -> None:
    out.print(f"{report.name} for {report.board} ({report.cpu_family}), {report.mode}: {report.runs} runs after "
              f"{report.warmup} warm-up, {report.threads} threads", markup=False)
    table = Table("runtime", "p50 ms", "p90 ms", "mean ms", "measured on", box=None, pad_edge=False)
    for r in report.results:
        table.add_row(r.runtime, f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.mean_ms:.3f}",
                      r.where + (" [EMULATED]" if r.emulated else ""))
    out.print(table)
    if report.comparable and report.onnxruntime.p50_ms > 0:
        out.print(f"tvm / onnxruntime p50: {report.tvm.p50_ms / report.onnxruntime.p50_ms:.2f}")
    for note in report.notes:
        out.print(f"note: {note}", markup=False)


def cmd_verify(args: argparse.Namespace) -> int:
    from .verifier import verify

    progress = Progress(quiet=args.quiet or args.json)
    report = verify(Path(args.bundle), board=args.board, run=not args.no_run, progress=progress)
    if args.json:
        print(json.dumps({"bundle": report.bundle, "board": report.board, "ok": report.ok,
                          "checks": [{"check": c, "ok": ok, "detail": d} for c, ok, d in report.checks],
                          "selftest": report.selftest, "info": report.info}, indent=2))
    else:
        for name, ok, detail in report.checks:
            progress.note(f"  {name}: {'ok' if ok else 'FAILED'}{': ' + detail if detail else ''}")
        print(f"{report.bundle}: verified for {report.board}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from . import export

    result = export.export(Path(args.bundle), args.target, Path(args.out) if args.out else None)
    if args.json:
        print(json.dumps({"target": result.target, "path": str(result.path), "package": result.package,
                          "version": result.version, "bundle_id": result.bundle_id, "files": result.files},
                         indent=2))
    else:
        Progress(quiet=args.quiet).note(f"{result.target}: {result.package} {result.version} "
                                        f"({len(result.files)} files)")
        print(result.path)
    return EXIT_OK


def _target(args: argparse.Namespace):
    from .ssh import Target

    return Target.parse(args.host, identity=Path(args.identity) if args.identity else None,
                        known_hosts=Path(args.known_hosts) if args.known_hosts else None,
                        accept_new_host_key=getattr(args, "accept_new_host_key", False), prefix=args.prefix)


def cmd_deploy(args: argparse.Namespace) -> int:
    from . import api, onnxmodel, release

    progress = Progress(quiet=args.quiet)
    target = _target(args)
    path = Path(args.bundle)
    if not (path.name.endswith((".tar.gz", ".tgz")) or path.is_file()):
        # A board name: build (and verify) the bundle first, then deploy it.
        if not args.model:
            raise UserError(f"deploy: {args.bundle!r} is not a bundle file; to build one give a board and --model",
                            hint="tvmbundle deploy dist/net-rpi4-1a2b3c4d.tar.gz --host pi@10.0.0.7, or "
                                 "tvmbundle deploy rpi4 --model net.onnx --host pi@10.0.0.7")
        shapes = dict(onnxmodel.parse_input_shape(s) for s in args.input_shape or [])
        path = api.make(args.bundle, Path(args.model), input_shapes=shapes, progress=progress).bundle
    result = release.deploy(path, target, keep=args.keep, health_timeout=args.health_timeout,
                            step_timeout=args.step_timeout, progress=progress)
    for w in result.warnings:
        progress.note(f"warning: {w}")
    if args.json:
        print(json.dumps({"host": result.host, "bundle_id": result.bundle_id, "previous_id": result.previous_id,
                          "uploaded_bytes": result.uploaded_bytes, "skipped_bytes": result.skipped_bytes,
                          "steps": [{"step": n, "seconds": round(t, 3)} for n, t in result.steps],
                          "warnings": result.warnings}, indent=2))
    else:
        print(f"{result.host}: {result.bundle_id[:12]} is current and healthy"
              + (f" (was {result.previous_id[:12]})" if result.previous_id else ""))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from . import release

    st = release.status(_target(args), prefix=args.prefix)
    if args.json:
        print(json.dumps(st.__dict__, indent=2))
        return EXIT_OK
    out = _out()
    out.print(f"{st.host}  prefix {st.prefix}  service {st.service}  {'healthy' if st.healthy else 'NOT healthy'}")
    table = Table("", "release", "name", "board", "created", box=None, pad_edge=False)
    for r in st.releases:
        table.add_row("*" if r["current"] else "", r["id"][:12], r["name"], r["board"], r["created"])
    out.print(table if st.releases else "no releases installed")
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from . import release

    progress = Progress(quiet=args.quiet)
    result = release.rollback(_target(args), to=args.to, prefix=args.prefix, health_timeout=args.health_timeout,
                              progress=progress)
    print(f"{result.host}: {result.bundle_id[:12]} is current again"
          + (f" (was {result.previous_id[:12]})" if result.previous_id else ""))
    return EXIT_OK


def cmd_rollout(args: argparse.Namespace) -> int:
    import threading

    from . import fleet

    hosts = fleet.load_inventory(Path(args.inventory))
    out = _out()
    lock = threading.Lock()
    stop = threading.Event()

    def listener(hr: fleet.HostReport) -> None:
        if args.json or args.quiet:
            return
        with lock:
            detail = f" at {hr.step}: {hr.error}" if hr.error else (f" ({hr.step})" if hr.result == "running" else "")
            took = f" {hr.seconds:.1f} s" if hr.result not in ("running", "pending") else ""
            out.print(f"wave {hr.wave}  {hr.host:20s} {hr.result}{took}{detail}", markup=False)

    report = fleet.rollout(
        Path(args.bundle), hosts, group=args.group, canary=args.canary, batch=args.batch,
        max_failures=args.max_failures, parallel=args.parallel, dry_run=args.dry_run,
        identity=Path(args.identity) if args.identity else None,
        known_hosts=Path(args.known_hosts) if args.known_hosts else None,
        accept_new_host_key=args.accept_new_host_key, health_timeout=args.health_timeout,
        step_timeout=args.step_timeout, report_path=Path(args.report) if args.report else None,
        listener=listener, stop=stop)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        table = Table("host", "wave", "result", "step", "time", "sent", "error", box=None, pad_edge=False)
        for hr in report.hosts:
            table.add_row(hr.host, str(hr.wave), hr.result, hr.step, f"{hr.seconds:.1f} s",
                          _size(hr.uploaded_bytes), hr.error[:80])
        out.print(table)
        if args.dry_run:
            for i, wave in enumerate(report.waves):
                out.print(f"wave {i}: {', '.join(wave)}  -> {report.bundle_id[:12]}")
        elif report.completed:
            out.print(f"rollout of {report.bundle_id[:12]} completed on {len(report.hosts)} host(s)")
        else:
            out.print(f"rollout of {report.bundle_id[:12]} stopped: {report.stopped_reason}")
    return EXIT_OK if report.completed or args.dry_run else EXIT_USER


def _connection_options(s: argparse.ArgumentParser, required: bool = True) -> None:
    s.add_argument("--host", required=required, metavar="USER@HOST[:PORT]", help="the device")
    s.add_argument("--identity", metavar="KEY_FILE", help="private key (default: agent and ~/.ssh keys)")
    s.add_argument("--known-hosts", metavar="FILE", help="known_hosts to check the device's key against "
                                                          "(default: ~/.ssh/known_hosts)")
    s.add_argument("--prefix", metavar="DIR", help="install root on the device (default: the recipe's install.prefix)")


def cmd_cache(args: argparse.Namespace) -> int:
    out = _out()
    if getattr(args, "json", False):
        def entry(e: cache.Listed) -> dict:
            return {"kind": e.kind, "key": e.key, "size": e.size, "created": e.created}
        if args.action == "list":
            entries = list(cache.entries())
            print(json.dumps({"root": str(cache.root()), "entries": [entry(e) for e in entries],
                              "total": sum(e.size for e in entries)}, indent=2))
        else:
            removed = cache.prune(older_than_days=args.older_than, kind=args.kind)
            print(json.dumps({"root": str(cache.root()), "removed": [entry(e) for e in removed],
                              "total": sum(e.size for e in removed)}, indent=2))
        return EXIT_OK
    if args.action == "list":
        table = Table("kind", "key", "size", "age", box=None, pad_edge=False)
        total = 0
        now = time.time()
        for e in cache.entries():
            total += e.size
            table.add_row(e.kind, e.key[:16], _size(e.size), f"{(now - e.created) / 86400:.1f} d")
        out.print(f"cache: {cache.root()}")
        out.print(table)
        out.print(f"total {_size(total)}")
    else:
        removed = cache.prune(older_than_days=args.older_than, kind=args.kind)
        out.print(f"removed {len(removed)} entries, {_size(sum(e.size for e in removed))}")
    return EXIT_OK


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --- parser -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tvmbundle", description="Ship TVM-compiled models to embedded Linux boards.")
    p.add_argument("--version", action="version", version=f"tvmbundle {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log every external command as `cwd$ cmd`")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("boards", help="list the board recipes")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_boards)

    s = sub.add_parser("show", help="print a resolved recipe: every value and where it came from")
    s.add_argument("board", help="board name (recipes/NAME.toml) or path to a recipe")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("doctor", help="what this machine lacks for a board, with the install command")
    s.add_argument("board")
    s.add_argument("--json", action="store_true", help="machine-readable output (exit code 2 if anything is missing)")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("make", help="build (and verify) a bundle of a model for a board")
    s.add_argument("board")
    s.add_argument("--model", required=True, help="the ONNX model")
    s.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...",
                   help="fix the shape of an input with dynamic dims (repeatable)")
    s.add_argument("--out", default="dist", help="output folder (default: dist/)")
    s.add_argument("--format", default="tar",
                   help="tar (the bundle); overlay (also a rootfs overlay tree and its tarball for image builds); "
                        "deb (also a Debian package)")
    s.add_argument("--no-verify", action="store_true", help="skip the verification at the end")
    s.add_argument("--bench", action="store_true",
                   help="then benchmark the bundle here (boards of this machine's CPU family), next to "
                        "onnxruntime on the same model when it is installed")
    s.add_argument("--no-tuning", action="store_true",
                   help="ignore the tuning database `tvmbundle tune` wrote for this model and board")
    s.add_argument("--tuning-db", metavar="DIR", help="apply this tuning database folder instead")
    s.add_argument("--runtime-source", metavar="wheel|git|DIR",
                   help="where the TVM runtime comes from, instead of the recipe's runtime.source: PyPI's "
                        "wheels, TVM's git repository at the compiler's version, or a TVM source tree")
    s.add_argument("--allow-runtime-mismatch", action="store_true",
                   help="build the runtime from a TVM tree even if its version is not the compiler's")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_make)

    s = sub.add_parser("tune", help="tune a model's kernels for a board (MetaSchedule), here or on the board over RPC")
    s.add_argument("board")
    s.add_argument("--model", required=True, help="the ONNX model")
    s.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...")
    s.add_argument("--trials", type=int, help="candidates to measure in all, counting earlier runs "
                                              "(default: the recipe's tune.trials, 64)")
    s.add_argument("--time-limit", metavar="DURATION", help="stop after this long: 90s, 15m, 2h "
                                                             "(default: the recipe's tune.time_limit, none)")
    where = s.add_argument_group("where candidates run (default: here, for the build machine's architecture)")
    where.add_argument("--host", metavar="USER@HOST[:PORT]",
                       help="a device: tvmbundle starts `tvm-deploy rpc` there over SSH and stops it afterwards")
    where.add_argument("--rpc", metavar="HOST:PORT", help="a running `tvm-deploy rpc` (or TVM RPC) server")
    where.add_argument("--tracker", metavar="HOST:PORT", help="a TVM RPC tracker; servers register under --key")
    where.add_argument("--key", help="the RPC key (default: tvmbundle)")
    where.add_argument("--emulate", action="store_true",
                       help="run the board's RPC server here under qemu-user (checks the flow; timings mean nothing)")
    s.add_argument("--identity", metavar="KEY_FILE")
    s.add_argument("--known-hosts", metavar="FILE")
    s.add_argument("--accept-new-host-key", action="store_true")
    s.add_argument("--json", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("bench", help="latency of a bundle here, on a device over SSH or under qemu-user, "
                                     "next to onnxruntime here")
    s.add_argument("bundle", help="a bundle .tar.gz written by make")
    _connection_options(s, required=False)
    s.add_argument("--accept-new-host-key", action="store_true")
    s.add_argument("--emulate", action="store_true",
                   help="a foreign board: run under qemu-user here (checks the flow; timings mean nothing)")
    s.add_argument("--runs", type=int, default=20, metavar="N", help="timed runs (default 20)")
    s.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed runs first (default 3)")
    s.add_argument("--threads", type=int, metavar="N",
                   help="threads of both runtimes (default: the bundle's service.threads)")
    s.add_argument("--model", metavar="M.onnx", help="the ONNX model the bundle was built from: also run it "
                                                      "with onnxruntime here, on the same inputs")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("verify", help="check a bundle and run its selftest (under qemu-user for foreign boards)")
    s.add_argument("bundle")
    s.add_argument("--board", help="check against this recipe instead of the bundle's own board record")
    s.add_argument("--no-run", action="store_true", help="static checks only")
    s.add_argument("--json", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("deploy", help="install a bundle on a device over SSH: atomic switch, health gate, rollback")
    s.add_argument("bundle", metavar="BUNDLE|BOARD", help="a bundle .tar.gz, or a board to build one for (--model)")
    s.add_argument("--model", help="with a board: the ONNX model to build and deploy")
    s.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...")
    _connection_options(s)
    s.add_argument("--accept-new-host-key", action="store_true",
                   help="trust a device seen for the first time and record its key (a changed key is always refused)")
    s.add_argument("--keep", type=int, default=3, help="releases to keep on the device (default 3)")
    s.add_argument("--health-timeout", type=float, default=30.0, metavar="S")
    s.add_argument("--step-timeout", type=float, default=60.0, metavar="S", help="deadline of each remote step")
    s.add_argument("--json", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_deploy)

    s = sub.add_parser("status", help="a device's current and kept releases, service state and health")
    _connection_options(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("rollback", help="switch a device back to its previous release")
    _connection_options(s)
    s.add_argument("--to", metavar="ID", help="a kept release (id prefix) instead of the previous one")
    s.add_argument("--health-timeout", type=float, default=30.0, metavar="S")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_rollback)

    s = sub.add_parser("rollout", help="deploy a bundle to a fleet in waves, stopping and rolling back on failures")
    s.add_argument("bundle")
    s.add_argument("--inventory", required=True, metavar="FILE", help="fleet inventory (TOML, format = 1)")
    s.add_argument("--group", help="only hosts in this group")
    s.add_argument("--canary", type=int, default=1, help="hosts in the first wave (default 1)")
    s.add_argument("--batch", default="25%", help="hosts per later wave, a count or a share (default 25%%)")
    s.add_argument("--max-failures", default="10%", help="failures tolerated before stopping (default 10%%)")
    s.add_argument("--parallel", type=int, default=16, help="hosts deployed at once within a wave (default 16)")
    s.add_argument("--dry-run", action="store_true", help="show the waves and stop")
    s.add_argument("--report", metavar="FILE", help="write the JSON report here")
    s.add_argument("--identity", metavar="KEY_FILE")
    s.add_argument("--known-hosts", metavar="FILE")
    s.add_argument("--accept-new-host-key", action="store_true")
    s.add_argument("--health-timeout", type=float, default=30.0, metavar="S")
    s.add_argument("--step-timeout", type=float, default=60.0, metavar="S")
    s.add_argument("--json", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_rollout)

    s = sub.add_parser("cache", help="show or trim the build cache")
    s.add_argument("action", choices=["list", "prune"])
    s.add_argument("--older-than", type=float, metavar="DAYS", help="prune: only entries older than DAYS")
    s.add_argument("--kind", help="prune: only entries of this kind (runtime, tvm-source, harness, model, vectors, bundle)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_cache)

    from .export import TARGETS as EXPORT_TARGETS
    s = sub.add_parser("export", help="a Buildroot BR2_EXTERNAL tree or a Yocto layer that installs a bundle")
    s.add_argument("target", choices=EXPORT_TARGETS, help="buildroot (a BR2_EXTERNAL tree with one package) or "
                                                          "yocto (a layer with one recipe)")
    s.add_argument("bundle", help="a bundle .tar.gz written by make")
    s.add_argument("--out", metavar="DIR", help="the tree to write (default: dist/br2-tvmbundle or "
                                                "dist/meta-tvmbundle); an earlier export there is replaced")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # argparse exits on --help and on usage errors
        return int(e.code or 0) if e.code in (0, None) else EXIT_USER
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s", stream=sys.stderr, force=True)
    try:
        return args.func(args)
    except UserError as e:
        print(f"tvmbundle: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tvmbundle: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT


def entry_point() -> None:
    sys.exit(main())
