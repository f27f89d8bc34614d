"""`tvmbundle status --host USER@HOST [--name NAME]`: a device's bundles, their releases, service and health."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from bundler.commands import common
from bundler.errors import EXIT_OK


def register(subparsers) -> None:
    s = subparsers.add_parser("status", help="a device's bundles: current and kept releases, service state and health")
    common.connection_options(s)
    s.add_argument("--name", help="only this bundle (default: every bundle of the device)")
    s.add_argument("--sudo", action="store_true",
                   help="log in as a user with passwordless sudo: only the unit and systemctl run through sudo -n")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bundler.device import release

    found = release.status(common.ssh_target(args).with_(sudo=args.sudo), name=args.name, prefix=args.prefix)
    if args.json:
        print(json.dumps([st.__dict__ for st in found], indent=2))
        return EXIT_OK
    out = common.out()
    if not found:
        out.print(f"{args.host}: " + (f"no bundle {args.name!r}" if args.name else "no bundle installed"))
        return EXIT_OK
    for st in found:
        layout = "  (single-service layout of tvmbundle 0.1)" if st.legacy else ""
        out.print(f"{st.host}  {st.name}  {st.unit}  {st.service}  {'healthy' if st.healthy else 'NOT healthy'}"
                  f"  prefix {st.prefix}{layout}")
        table = Table("", "release", "board", "created", box=None, pad_edge=False)
        for r in st.releases:
            table.add_row("*" if r["current"] else "", r["id"][:12], r["board"], r["created"])
        out.print(table if st.releases else "no releases installed")
    return EXIT_OK
