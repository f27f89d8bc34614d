"""`tvmbundle trust --host USER@HOST KEY.pub...`: the keys a device accepts signed releases from."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bundler.errors import EXIT_OK, UserError
from bundler.progress import Progress


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "trust", help="set the OpenSSH keys a device accepts signed releases from (its /etc/tvmbundle/allowed_signers)",
        description="Once a device trusts a key, it installs and activates only releases signed by a key it trusts "
                    "(tvmbundle sign), whoever pushes them. Several keys: rotation. Removing a key revokes it.")
    s.add_argument("keys", nargs="*", metavar="KEY.pub", help="public keys to trust (added to the ones trusted)")
    s.add_argument("--revoke", action="append", default=[], metavar="KEY.pub", help="stop trusting this key (repeatable)")
    s.add_argument("--replace", action="store_true", help="trust exactly KEY.pub... (every other key is revoked)")
    s.add_argument("--list", action="store_true", help="only show the keys the device trusts")
    s.add_argument("--host", required=True, metavar="USER@HOST[:PORT]", help="the device")
    s.add_argument("--identity", metavar="KEY_FILE", help="private key (default: agent and ~/.ssh keys)")
    s.add_argument("--known-hosts", metavar="FILE", help="known_hosts to check the device's key against "
                                                          "(default: ~/.ssh/known_hosts)")
    s.add_argument("--accept-new-host-key", action="store_true",
                   help="trust a device seen for the first time and record its key (a changed key is always refused)")
    s.add_argument("--sudo", action="store_true", help="write the (root-owned) trust file through sudo -n")
    s.add_argument("--json", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bundler.device import trust
    from bundler.device.ssh import Target

    if args.list and (args.keys or args.revoke or args.replace):
        raise UserError("trust: --list only shows the trusted keys; give it without KEY.pub, --revoke and --replace")
    if args.replace and not args.keys:
        raise UserError("trust: --replace needs the keys to trust instead (KEY.pub...)")
    target = Target.parse(args.host, identity=Path(args.identity) if args.identity else None,
                          known_hosts=Path(args.known_hosts) if args.known_hosts else None,
                          accept_new_host_key=args.accept_new_host_key, sudo=args.sudo)
    res = trust.update(target, [Path(k) for k in args.keys], [Path(k) for k in args.revoke], replace=args.replace)
    progress = Progress(quiet=args.quiet or args.json)
    for note in res.notes:
        progress.note(f"note: {note}")
    if args.json:
        def key(k):
            return {"fingerprint": k.fingerprint, "type": k.keytype, **({"file": k.source} if k.source else {})}
        print(json.dumps({"host": res.host, "file": res.file, "written": res.written,
                          "trusted": [key(k) for k in res.keys], "added": [key(k) for k in res.added],
                          "revoked": [key(k) for k in res.revoked]}, indent=2))
        return EXIT_OK
    for k in res.revoked:
        print(f"{res.host}: revoked {k.fingerprint} {k.keytype}")
    added = {k.ident for k in res.added}
    if not res.keys:
        print(f"{res.host}: trusts no key ({res.file} lists none): unsigned releases are accepted")
    for k in res.keys:
        print(f"{res.host}: trusted {k.fingerprint} {k.keytype}" + (f" ({k.source})" if k.source else "")
              + (" [added]" if k.ident in added else ""))
    if not res.written and (args.keys or args.revoke):
        progress.note(f"{res.host}: nothing changed (the device already trusted exactly these)")
    return EXIT_OK
