"""What several commands share: the console, sizes, SSH connection options."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def out() -> Console:
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:     # logs and pipes: never fold a table row
        console = Console(highlight=False, soft_wrap=True, width=200)
    return console


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def connection_options(s: argparse.ArgumentParser, required: bool = True) -> None:
    s.add_argument("--host", required=required, metavar="USER@HOST[:PORT]", help="the device")
    s.add_argument("--identity", metavar="KEY_FILE", help="private key (default: agent and ~/.ssh keys)")
    s.add_argument("--known-hosts", metavar="FILE", help="known_hosts to check the device's key against "
                                                          "(default: ~/.ssh/known_hosts)")
    s.add_argument("--prefix", metavar="DIR", help="install root on the device (default: the recipe's install.prefix)")


def ssh_target(args: argparse.Namespace):
    from bundler.device.ssh import Target

    return Target.parse(args.host, identity=Path(args.identity) if args.identity else None,
                        known_hosts=Path(args.known_hosts) if args.known_hosts else None,
                        accept_new_host_key=getattr(args, "accept_new_host_key", False), prefix=args.prefix)
