"""`tvmbundle make BOARD --model M.onnx`: build and verify a bundle."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from bundler.commands import bench as bench_cmd
from bundler.errors import EXIT_OK
from bundler.progress import Progress


def register(subparsers) -> None:
    s = subparsers.add_parser("make", help="build (and verify) a bundle of a model for a board")
    s.add_argument("board")
    s.add_argument("--model", required=True, help="the ONNX model")
    s.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...",
                   help="fix the shape of an input with dynamic dims (repeatable)")
    s.add_argument("--out", default="dist", help="output folder (default: dist/)")
    s.add_argument("--format", default="tar",
                   help="tar (the bundle); overlay (also a rootfs overlay tree and its tarball for image builds); "
                        "deb (also a Debian package)")
    s.add_argument("--listen", metavar="HOST:PORT",
                   help="the address the bundle's service listens on, instead of the recipe's service.listen "
                        "(each bundle of a device needs its own)")
    s.add_argument("--no-verify", action="store_true", help="skip the verification at the end")
    s.add_argument("--sign", metavar="KEY", help="sign the bundle's manifest with this OpenSSH private key "
                                                 "(devices that trust KEY.pub accept it)")
    s.add_argument("--reverify", action="store_true",
                   help="verify even a bundle that was verified for this board before (same bytes, qemu, sysroot)")
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
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bundler import api
    from bundler.compile.signature import parse_input_shape

    shapes = dict(parse_input_shape(s) for s in args.input_shape or [])
    if args.bench:
        from bundler.device import bench  # it loads fabric (half a second): only for --bench

        bench.require_native(args.board)      # refuse a foreign board before the build, not after
    progress = Progress(quiet=args.quiet)
    start = time.monotonic()
    result = api.make(args.board, Path(args.model), input_shapes=shapes, out_dir=Path(args.out),
                      fmt=args.format, run_verify=not args.no_verify, progress=progress,
                      runtime_source=args.runtime_source,
                      allow_runtime_mismatch=True if args.allow_runtime_mismatch else None,
                      tuned=False if args.no_tuning else (Path(args.tuning_db) if args.tuning_db else True),
                      reverify=args.reverify, sign=Path(args.sign) if args.sign else None, listen=args.listen)
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
            bench_cmd.print_report(Console(stderr=True, highlight=False, soft_wrap=True, width=200), report)
        print(result.overlay or result.bundle)
    return EXIT_OK
