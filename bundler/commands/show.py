"""`tvmbundle show BOARD`: the resolved recipe, every value and the file it came from."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from bundler.commands import common
from bundler.config import recipe as recipe_mod
from bundler.errors import EXIT_OK


def register(subparsers) -> None:
    s = subparsers.add_parser("show", help="print a resolved recipe: every value and where it came from")
    s.add_argument("board", help="board name (recipes/NAME.toml) or path to a recipe")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    r = recipe_mod.load(args.board)
    if args.json:
        print(json.dumps({"board": r.name, "recipe": str(r.path), "values": r.values, "origins": r.origins},
                         indent=2, default=str))
        return EXIT_OK
    out = common.out()
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
