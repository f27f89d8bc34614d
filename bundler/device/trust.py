"""A device's trust store for signed releases: ``/etc/tvmbundle/allowed_signers``.

The file is an OpenSSH allowed_signers file (ssh-keygen(1)), one line per trusted public key, in the
form :func:`bundler.package.signing.allowed_signers` writes. When it lists a key, the bundle's own
``tvm-deploy install`` on the device refuses a release whose ``manifest.json`` is not signed by one
of them (before anything is stored), and ``tvm-deploy activate`` re-checks the release it switches to
against the file as it is then (so a rollback to a release of a removed key is refused).

The file is root's, mode 0644, on purpose: releases are pushed logged in as the owner of the install
prefix, and that login must not be able to replace the list of keys allowed to sign what it pushes.
So writing it needs root (``--sudo`` or a root login); reading it does not.

Several keys are trusted at once for rotation (add the new key, sign with it, remove the old one);
removing a key revokes it. :func:`update` reads the current file (one round trip), computes the new
set, writes it atomically (``install`` to a sibling, then ``mv``: a reader never sees it missing or
half written) and reads it back in the same round trip.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import shlex
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bundler.device.ssh import Remote, Target
from bundler.errors import DeployError, UserError
from bundler.package import signing

TRUST_FILE = "/etc/tvmbundle/allowed_signers"
_MARK = "--- tvmbundle trust file ---"
HEADER = (
    "# tvmbundle: the keys whose signature of a release's manifest.json this device accepts\n"
    "# (ssh-keygen -Y verify -n tvmbundle-manifest; written by `tvmbundle trust`).\n"
    "# Root's, mode 0644, on purpose: releases are pushed logged in as the owner of the install prefix,\n"
    "# and that login must not be able to replace this list. Removing a line revokes its key.\n"
)


@dataclass(frozen=True)
class TrustedKey:
    keytype: str
    blob: str                      # base64 of the public key
    source: str = ""               # the .pub file it came from, when it came from one

    @property
    def fingerprint(self) -> str:
        """SHA256:... as ssh-keygen -l prints it."""
        digest = hashlib.sha256(base64.b64decode(self.blob)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    @property
    def ident(self) -> tuple[str, str]:
        return (self.keytype, self.blob)

    def line(self) -> str:
        return f'{signing.PRINCIPAL} namespaces="{signing.NAMESPACE}" {self.keytype} {self.blob}'


@dataclass
class TrustResult:
    host: str
    file: str
    keys: list[TrustedKey]                     # trusted now
    added: list[TrustedKey] = field(default_factory=list)
    revoked: list[TrustedKey] = field(default_factory=list)
    written: bool = False
    notes: list[str] = field(default_factory=list)


def _checked(keytype: str, blob: str, where: str) -> TrustedKey:
    """A key whose base64 decodes to a blob of its own type (what ssh-keygen would accept)."""
    try:
        raw = base64.b64decode(blob, validate=True)
        (n,) = struct.unpack(">I", raw[:4])
        inner = raw[4:4 + n].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
        raise UserError(f"{where}: not an OpenSSH public key (its base64 does not decode)") from None
    if inner != keytype:
        raise UserError(f"{where}: not an OpenSSH public key (it says {keytype}, its key is {inner!r})")
    return TrustedKey(keytype, blob)


def public_key(path: Path) -> TrustedKey:
    """The key of a ``.pub`` file, checked the way :func:`signing.allowed_signers` checks it."""
    line = signing.allowed_signers([Path(path)]).split()      # raises UserError for anything else
    key = _checked(line[2], line[3], str(path))
    return TrustedKey(key.keytype, key.blob, str(path))


def parse(text: str, where: str) -> list[TrustedKey]:
    """The keys of an allowed_signers text (comments and blank lines skipped)."""
    keys: list[TrustedKey] = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        at = next((i for i, w in enumerate(words) if w.startswith(("ssh-", "ecdsa-", "sk-"))), None)
        if at is None or at + 1 >= len(words):
            raise DeployError(where, "trust", f"{TRUST_FILE} line {n} is not a key line; fix or remove it "
                                              "(nothing was changed)")
        keys.append(_checked(words[at], words[at + 1], f"{where}:{TRUST_FILE} line {n}"))
    return keys


def render(keys: Sequence[TrustedKey]) -> str:
    return HEADER + "".join(k.line() + "\n" for k in keys)


def _read_script(path: str) -> str:
    p = shlex.quote(path)
    return f'id -u; echo {shlex.quote(_MARK)}; if [ -e {p} ]; then cat -- {p}; fi'


def _split(out: str) -> tuple[str, str]:
    head, mark, rest = out.partition(_MARK + "\n")
    if not mark:
        raise ValueError("no marker")
    return head.strip(), rest


def update(target: Target, add: Sequence[Path] = (), revoke: Sequence[Path] = (), *, replace: bool = False,
           step_timeout: float = 30.0) -> TrustResult:
    """Make the device trust ``add`` (after the keys it trusts, or instead of them with ``replace``)
    and no longer trust ``revoke``. With nothing to change it only reads (``tvmbundle trust --list``)."""
    adding = [public_key(k) for k in add]          # every key file is read before anything connects
    revoking = [public_key(k) for k in revoke]
    both = {k.ident for k in adding} & {k.ident for k in revoking}
    if both:
        raise UserError("a key is both added and revoked: "
                        + ", ".join(k.source for k in adding if k.ident in both))
    changing = bool(adding or revoking or replace)
    with Remote(target, step_timeout=step_timeout) as r:
        res = r.sh(_read_script(TRUST_FILE), "trust", check=False)
        try:
            uid, current_text = _split(res.out)
        except ValueError:
            tail = " | ".join((res.err or res.out).strip().splitlines()[-3:])
            raise DeployError(target.name, "trust", f"cannot read {TRUST_FILE} (exit {res.code}): {tail or 'no output'}")
        if res.code != 0:
            raise DeployError(target.name, "trust", f"cannot read {TRUST_FILE}: "
                                                    + " | ".join(res.err.strip().splitlines()[-3:]))
        current = parse(current_text, target.name)
        result = TrustResult(target.name, TRUST_FILE, current)
        if not changing:
            return result
        new: list[TrustedKey] = [] if replace else list(current)
        for k in adding:
            if k.ident not in {x.ident for x in new}:
                new.append(k)
        gone = {k.ident for k in revoking}
        for k in revoking:
            if k.ident not in {x.ident for x in current}:
                result.notes.append(f"{k.source} ({k.fingerprint}) was not trusted")
        new = [k for k in new if k.ident not in gone]
        now = {x.ident for x in new}
        result.added = [k for k in new if k.ident not in {x.ident for x in current}]
        result.revoked = [k for k in current if k.ident not in now]
        sources = {k.ident: k.source for k in adding}
        new = [TrustedKey(k.keytype, k.blob, sources.get(k.ident, k.source)) for k in new]
        if not new:
            # A device that trusts no key accepts unsigned releases: revoking the last key must not do that.
            raise UserError("this would leave the device trusting no key, and a device that trusts no key "
                            "accepts unsigned releases; nothing was changed",
                            hint="rotate instead: add the new key in the same command (tvmbundle trust --host ... "
                                 "NEW.pub --revoke OLD.pub); to stop requiring signatures, remove "
                                 f"{TRUST_FILE} on the device yourself")
        if [k.ident for k in new] == [k.ident for k in current]:
            result.keys = new
            return result
        root = uid == "0"
        if not root and not target.sudo:
            raise DeployError(target.name, "trust", f"{TRUST_FILE} is root's (so that a release pusher cannot "
                                                    f"replace it), and {target.user} is not root; nothing was changed",
                              hint="pass --sudo (the login needs passwordless sudo), or log in as root")
        text = render(new)
        # A temporary file in the login user's home (SFTP paths are relative to it), then installed as
        # root beside the trust file and renamed over it: atomic, root's, 0644.
        tmp = f".tvmbundle-allowed_signers.{secrets.token_hex(8)}.tmp"
        r.write_text(text, tmp, "trust")
        sudo = "" if root else "sudo -n "
        dest, staged = shlex.quote(TRUST_FILE), shlex.quote(TRUST_FILE + ".new")
        src = f'"$HOME"/{shlex.quote(tmp)}'
        script = (f"{sudo}install -D -m 0644 -o root -g root {src} {staged} && {sudo}mv -f {staged} {dest}; rc=$?; "
                  f"rm -f {src}; if [ $rc -ne 0 ]; then exit $rc; fi; "
                  f"stat -c '%u %a' {dest}; echo {shlex.quote(_MARK)}; cat -- {dest}")
        res = r.sh(script, "trust", check=False)
        if res.code != 0:
            tail = " | ".join((res.err or res.out).strip().splitlines()[-3:])
            raise DeployError(target.name, "trust", f"writing {TRUST_FILE} failed (exit {res.code}): {tail}")
        owner_mode, back = _split(res.out)
        if owner_mode != "0 644" or back != text:
            raise DeployError(target.name, "trust", f"{TRUST_FILE} reads back wrong (owner and mode {owner_mode!r})")
        result.keys = new
        result.written = True
        return result
