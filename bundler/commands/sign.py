"""`tvmbundle sign BUNDLE --key KEY`: a signature of the bundle's manifest, by an OpenSSH key."""

from __future__ import annotations

import argparse
from pathlib import Path

from bundler.errors import EXIT_OK
from bundler.progress import Progress


def register(subparsers) -> None:
    s = subparsers.add_parser("sign", help="sign a bundle's manifest with an OpenSSH key (ssh-keygen -Y sign)")
    s.add_argument("bundle", help="a bundle .tar.gz written by make")
    s.add_argument("--key", required=True, metavar="KEY", help="the private key (its KEY.pub is what devices trust)")
    s.add_argument("--out", metavar="FILE", help="write the signed bundle here (default: in place)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bundler.package import signing

    out = signing.sign(Path(args.bundle), Path(args.key), Path(args.out) if args.out else None)
    Progress(quiet=args.quiet).note(f"signed with {args.key}: devices that trust {args.key}.pub accept it")
    print(out)
    return EXIT_OK
