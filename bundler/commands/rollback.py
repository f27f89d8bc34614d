"""`tvmbundle rollback --host USER@HOST [--name NAME]`: a bundle back to its previous release."""

from __future__ import annotations

import argparse

from bundler.commands import common
from bundler.errors import EXIT_OK
from bundler.progress import Progress


def register(subparsers) -> None:
    s = subparsers.add_parser("rollback", help="switch a device back to its previous release")
    common.connection_options(s)
    s.add_argument("--sudo", action="store_true",
                   help="log in as a user with passwordless sudo: only the unit and systemctl run through sudo -n")
    s.add_argument("--name", help="the bundle to roll back (needed when the device has several)")
    s.add_argument("--to", metavar="ID", help="a kept release (id prefix) instead of the previous one")
    s.add_argument("--health-timeout", type=float, default=30.0, metavar="S")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bundler.device import release

    progress = Progress(quiet=args.quiet)
    result = release.rollback(common.ssh_target(args).with_(sudo=args.sudo), name=args.name, to=args.to,
                              prefix=args.prefix, health_timeout=args.health_timeout, progress=progress)
    print(f"{result.host}: {result.bundle_id[:12]} is current again"
          + (f" (was {result.previous_id[:12]})" if result.previous_id else ""))
    return EXIT_OK
