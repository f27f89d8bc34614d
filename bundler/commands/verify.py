"""`tvmbundle verify BUNDLE`: the checks before a bundle ships, and its selftest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bundler.errors import EXIT_OK
from bundler.progress import Progress


def register(subparsers) -> None:
    s = subparsers.add_parser("verify", help="check a bundle and run its selftest (under qemu-user for foreign boards)")
    s.add_argument("bundle")
    s.add_argument("--board", help="check against this recipe instead of the bundle's own board record")
    s.add_argument("--no-run", action="store_true", help="static checks only")
    s.add_argument("--trust", action="append", metavar="KEY.pub", default=[],
                   help="require a signature by this OpenSSH public key (repeatable: any of them)")
    s.add_argument("--json", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bundler.package.verifier import verify

    progress = Progress(quiet=args.quiet or args.json)
    report = verify(Path(args.bundle), board=args.board, run=not args.no_run, progress=progress,
                    trust=[Path(k) for k in args.trust])
    if args.json:
        print(json.dumps({"bundle": report.bundle, "board": report.board, "ok": report.ok,
                          "checks": [{"check": c, "ok": ok, "detail": d} for c, ok, d in report.checks],
                          "selftest": report.selftest, "info": report.info}, indent=2))
    else:
        for name, ok, detail in report.checks:
            progress.note(f"  {name}: {'ok' if ok else 'FAILED'}{': ' + detail if detail else ''}")
        print(f"{report.bundle}: verified for {report.board}")
    return EXIT_OK
