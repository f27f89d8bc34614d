"""`tvmbundle tune BOARD --model M.onnx`: MetaSchedule over the model's kernels, here or on the board.

Records go to the board target's database, shared by every model (a kernel tuned for one model
is tuned for all); ``--import``/``--export`` move that database between machines as one file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bundler.errors import EXIT_INTERRUPT, EXIT_OK
from bundler.progress import Progress


def register(subparsers) -> None:
    s = subparsers.add_parser("tune", help="tune a model's kernels for a board (MetaSchedule), here or on the board over RPC")
    s.add_argument("board")
    s.add_argument("--model", help="the ONNX model (optional with --import/--export)")
    s.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...")
    s.add_argument("--trials", type=int, help="candidates to measure for the model in all, counting records its "
                                              "kernels already have from any run or model, split by each "
                                              "kernel's share of the model's time (default: the recipe's "
                                              "tune.trials, 64); before them, and with 0 alone, the knobs of the default "
                                              "schedules (tile sizes, loop orders) are measured for every kernel")
    s.add_argument("--time-limit", metavar="DURATION", help="stop after this long, keeping what was measured: "
                                                             "90s, 15m, 2h (default: the recipe's tune.time_limit, none)")
    s.add_argument("--import", dest="import_file", metavar="FILE",
                   help="merge tuning records exported elsewhere (`--export`) into this board's database first")
    s.add_argument("--export", dest="export_file", metavar="FILE",
                   help="write this board's tuning database (every model's records) to FILE at the end")
    where = s.add_argument_group("where candidates run (default: here, for the build machine's architecture)")
    where.add_argument("--host", metavar="USER@HOST[:PORT]",
                       help="a device: tvmbundle starts `tvm-deploy rpc` there over SSH and stops it afterwards")
    where.add_argument("--rpc", metavar="HOST:PORT", help="a running `tvm-deploy rpc` (or TVM RPC) server")
    where.add_argument("--tracker", metavar="HOST:PORT", help="a TVM RPC tracker; servers register under --key "
                                                               "(candidates are measured on all of them at once)")
    where.add_argument("--key", help="the RPC key (default: tvmbundle)")
    where.add_argument("--emulate", action="store_true",
                       help="run the board's RPC server here under qemu-user (checks the flow; timings mean nothing)")
    s.add_argument("--identity", metavar="KEY_FILE")
    s.add_argument("--known-hosts", metavar="FILE")
    s.add_argument("--accept-new-host-key", action="store_true")
    s.add_argument("--json", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bundler import api
    from bundler.compile import tuning
    from bundler.compile.signature import parse_input_shape

    shapes = dict(parse_input_shape(s) for s in args.input_shape or [])
    progress = Progress(quiet=args.quiet)
    ssh = {"identity": Path(args.identity) if args.identity else None,
           "known_hosts": Path(args.known_hosts) if args.known_hosts else None,
           "accept_new_host_key": args.accept_new_host_key}
    try:
        result = api.tune(args.board, Path(args.model) if args.model else None, input_shapes=shapes,
                          trials=args.trials,
                          time_limit=tuning.parse_duration(args.time_limit) if args.time_limit else None,
                          host=args.host, rpc_addr=args.rpc, tracker=args.tracker, key=args.key,
                          emulate=args.emulate, ssh_options=ssh, progress=progress,
                          import_file=args.import_file, export_file=args.export_file)
    except KeyboardInterrupt:
        print("tvmbundle: interrupted; what was measured is kept: run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPT
    db = result.database
    if args.json:
        print(json.dumps({"database": str(db.path) if db else None, "records": db.records if db else 0,
                          "workloads": db.workloads if db else 0, "tasks": result.tasks,
                          "measured": result.measured, "previously": result.previously,
                          "kernels_measured": result.kernels_measured, "kernels_skipped": result.kernels_skipped,
                          "seconds": round(result.seconds, 1), "trials_per_minute": result.trials_per_minute,
                          "build_workers": result.build_workers, "measure_workers": result.measure_workers,
                          "imported": result.imported, "exported": result.exported,
                          "rule_variants": result.variants, "kernels_with_knobs": result.kernels_knobs,
                          "stopped": result.stopped, "model_check": result.check}, indent=2))
    else:
        print(db.path if db else "no tuning records")
        if args.model and not args.quiet:
            print(f"tvmbundle: {result.measured} trials in {result.seconds:.0f} s "
                  f"({result.trials_per_minute:g} trials/min, {result.stopped}); default schedules: "
                  f"{result.variants} variants measured, {result.kernels_knobs} kernel(s) faster with tuned knobs",
                  file=sys.stderr)
    return EXIT_OK
