"""`tvmbundle doctor BOARD`: what this machine lacks for a board, with the install command."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from bundler.commands import common
from bundler.config import recipe as recipe_mod
from bundler.errors import EXIT_OK, EXIT_USER


def register(subparsers) -> None:
    s = subparsers.add_parser("doctor", help="what this machine lacks for a board, with the install command")
    s.add_argument("board")
    s.add_argument("--json", action="store_true", help="machine-readable output (exit code 2 if anything is missing)")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bundler.build import doctor

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
    out = common.out()
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
