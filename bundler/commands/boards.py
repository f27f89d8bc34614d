"""`tvmbundle boards`: the recipes, one line each."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from bundler.commands import common
from bundler.config import recipe as recipe_mod
from bundler.errors import EXIT_OK, UserError


def register(subparsers) -> None:
    s = subparsers.add_parser("boards", help="list the board recipes")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    common.out().print(table)
    return EXIT_OK
