"""`tvmbundle bench BUNDLE`: a bundle's latency here, on a device or under qemu, next to onnxruntime."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bundler.commands import common
from bundler.errors import EXIT_OK


def register(subparsers) -> None:
    s = subparsers.add_parser("bench", help="latency of a bundle here, on a device over SSH or under qemu-user, "
                                     "next to onnxruntime here")
    s.add_argument("bundle", help="a bundle .tar.gz written by make")
    common.connection_options(s, required=False)
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
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bundler.device import bench

    report = bench.bench(Path(args.bundle), target=common.ssh_target(args) if args.host else None, runs=args.runs,
                         warmup=args.warmup, threads=args.threads,
                         onnx_model=Path(args.model) if args.model else None, emulate=args.emulate)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print_report(common.out(), report)
    return EXIT_OK


def print_report(out: Console, report) -> None:
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
