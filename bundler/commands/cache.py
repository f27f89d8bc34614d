"""`tvmbundle cache list|prune`: the build cache."""

from __future__ import annotations

import argparse
import json
import time

from rich.table import Table

from bundler import cache
from bundler.commands import common
from bundler.errors import EXIT_OK


def register(subparsers) -> None:
    s = subparsers.add_parser("cache", help="show or trim the build cache")
    s.add_argument("action", choices=["list", "prune"])
    s.add_argument("--older-than", type=float, metavar="DAYS", help="prune: only entries older than DAYS")
    s.add_argument("--kind", help="prune: only entries of this kind (prepared, runtime, tvm-source, harness, model, vectors, bundle, verified, tuning)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = common.out()
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
            table.add_row(e.kind, e.key[:16], common.size(e.size), f"{(now - e.created) / 86400:.1f} d")
        out.print(f"cache: {cache.root()}")
        out.print(table)
        out.print(f"total {common.size(total)}")
    else:
        removed = cache.prune(older_than_days=args.older_than, kind=args.kind)
        out.print(f"removed {len(removed)} entries, {common.size(sum(e.size for e in removed))}")
    return EXIT_OK
