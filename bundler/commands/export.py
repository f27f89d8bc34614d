"""`tvmbundle export TARGET BUNDLE`: a bundle for an image build or fleet engine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bundler.errors import EXIT_OK
from bundler.package import export
from bundler.progress import Progress


def register(subparsers) -> None:
    s = subparsers.add_parser("export", help="a Buildroot BR2_EXTERNAL tree, a Yocto layer or an Ansible role that installs a bundle")
    s.add_argument("target", choices=export.TARGETS, help="buildroot (a BR2_EXTERNAL tree with one package), "
                                                          "yocto (a layer with one recipe), ansible (a role and deploy.yml that do "
                                                          "what deploy does on each host) or mender (an artifact "
                                                          "and its update module)")
    s.add_argument("bundle", help="a bundle .tar.gz written by make")
    s.add_argument("--out", metavar="DIR", help="the tree to write (default: dist/br2-NAME, dist/meta-NAME, "
                                                "dist/ansible-NAME or dist/mender-NAME, NAME the bundle's "
                                                "name); an earlier export there is replaced")
    s.add_argument("--key", metavar="K", help="mender: the private key (PEM) that signs the artifact "
                                              "(mender-artifact write -k)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = export.export(Path(args.bundle), args.target, Path(args.out) if args.out else None,
                           key=Path(args.key) if args.key else None)
    if args.json:
        print(json.dumps({"target": result.target, "path": str(result.path), "package": result.package,
                          "version": result.version, "bundle_id": result.bundle_id, "files": result.files},
                         indent=2))
    else:
        Progress(quiet=args.quiet).note(f"{result.target}: {result.package} {result.version} "
                                        f"({len(result.files)} files)")
        print(result.path)
    return EXIT_OK
