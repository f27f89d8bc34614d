"""`tvmbundle deploy BUNDLE --host USER@HOST`: install on one device."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bundler.commands import common
from bundler.errors import EXIT_OK, UserError
from bundler.progress import Progress


def register(subparsers) -> None:
    s = subparsers.add_parser("deploy", help="install a bundle on a device over SSH: atomic switch, health gate, rollback")
    s.add_argument("bundle", metavar="BUNDLE|BOARD", help="a bundle .tar.gz, or a board to build one for (--model)")
    s.add_argument("--model", help="with a board: the ONNX model to build and deploy")
    s.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...")
    common.connection_options(s)
    s.add_argument("--sudo", action="store_true",
                   help="log in as a user with passwordless sudo: only the unit and systemctl run through sudo -n")
    s.add_argument("--accept-new-host-key", action="store_true",
                   help="trust a device seen for the first time and record its key (a changed key is always refused)")
    s.add_argument("--keep", type=int, default=3, help="releases to keep on the device (default 3)")
    s.add_argument("--health-timeout", type=float, default=30.0, metavar="S")
    s.add_argument("--step-timeout", type=float, default=60.0, metavar="S", help="deadline of each remote step")
    s.add_argument("--trust", action="append", metavar="KEY.pub", default=[],
                   help="before connecting, require a signature by this OpenSSH public key (repeatable: any of "
                        "them); the device checks its own trust store (tvmbundle trust) either way")
    s.add_argument("--json", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bundler import api
    from bundler.compile.signature import parse_input_shape
    from bundler.device import release

    progress = Progress(quiet=args.quiet)
    target = common.ssh_target(args).with_(sudo=args.sudo)
    path = Path(args.bundle)
    if not (path.name.endswith((".tar.gz", ".tgz")) or path.is_file()):
        # A board name: build (and verify) the bundle first, then deploy it.
        if not args.model:
            raise UserError(f"deploy: {args.bundle!r} is not a bundle file; to build one give a board and --model",
                            hint="tvmbundle deploy dist/net-rpi4-1a2b3c4d.tar.gz --host pi@10.0.0.7, or "
                                 "tvmbundle deploy rpi4 --model net.onnx --host pi@10.0.0.7")
        shapes = dict(parse_input_shape(s) for s in args.input_shape or [])
        path = api.make(args.bundle, Path(args.model), input_shapes=shapes, progress=progress).bundle
    result = release.deploy(path, target, keep=args.keep, health_timeout=args.health_timeout,
                            step_timeout=args.step_timeout, progress=progress, trust=[Path(k) for k in args.trust])
    for w in result.warnings:
        progress.note(f"warning: {w}")
    if args.json:
        print(json.dumps({"host": result.host, "bundle_id": result.bundle_id, "previous_id": result.previous_id,
                          "uploaded_bytes": result.uploaded_bytes, "skipped_bytes": result.skipped_bytes,
                          "steps": [{"step": n, "seconds": round(t, 3)} for n, t in result.steps],
                          "warnings": result.warnings, "round_trips": result.round_trips,
                          "signed": result.signed, "signed_by": result.signed_by}, indent=2))
    else:
        signer = (f"signed by {result.signed_by}" if result.signed_by
                  else "signed, but the device trusts no key: not checked" if result.signed else "unsigned")
        print(f"{result.host}: {result.bundle_id[:12]} is current and healthy"
              + (f" (was {result.previous_id[:12]})" if result.previous_id else "") + f"; {signer}")
    return EXIT_OK
