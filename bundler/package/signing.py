"""Signed releases: a detached signature of the manifest, made and checked with OpenSSH's own
``ssh-keygen -Y sign`` / ``-Y verify``.

Why SSH signatures: the manifest holds every file's sha256, so signing it signs the release.
OpenSSH's signature format (SSHSIG, the one git uses for signed commits) needs no tool a device
lacks: ``ssh-keygen`` ships with the SSH server every device we deploy to runs, so the device can
check a release itself, whoever pushes it, with the same code as the build machine. Teams reuse
keys they already manage (ed25519, ECDSA, RSA, and hardware-backed ``-sk`` keys), and an
``allowed_signers`` file of several keys gives rotation: add the new key, re-sign, remove the
old one, and removing a key revokes it.

The signature is ``manifest.json.sig`` beside the manifest in the bundle's top folder. It is not
listed in the manifest (which cannot hash its own signature) and does not change the bundle id.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bundler import proc
from bundler.errors import UserError
from bundler.package import bundle as bundle_mod
from bundler.package.manifest import MANIFEST

SIGNATURE = f"{MANIFEST}.sig"
NAMESPACE = "tvmbundle-manifest"   # ssh-keygen -n: a signature for anything else never verifies here
PRINCIPAL = "tvmbundle"            # the one identity allowed_signers lines name


class SignatureError(UserError):
    """A bundle without a valid signature from a trusted key."""


@dataclass(frozen=True)
class Signer:
    key: Path            # the trusted public key file that verified it
    fingerprint: str     # SHA256:... as ssh-keygen prints it


def _ssh_keygen() -> str:
    return proc.which("ssh-keygen", why="sign or check a bundle's manifest", install="apt-get install openssh-client")


def allowed_signers(keys: Sequence[Path]) -> str:
    """An ``allowed_signers`` text (ssh-keygen(1)) trusting each public key file in ``keys``."""
    lines = []
    for k in keys:
        try:
            text = Path(k).read_text().strip()
        except OSError as e:
            raise UserError(f"{k}: cannot read the public key: {e.strerror}") from None
        parts = text.split()
        if len(parts) < 2 or not (parts[0].startswith(("ssh-", "ecdsa-", "sk-"))):
            raise UserError(f"{k}: not an OpenSSH public key; expected one line like 'ssh-ed25519 AAAA... comment' "
                            "(the .pub file ssh-keygen writes)")
        lines.append(f'{PRINCIPAL} namespaces="{NAMESPACE}" {parts[0]} {parts[1]}')
    return "\n".join(lines) + "\n"


def sign_release(top: Path, key: Path) -> Path:
    """Write ``top/manifest.json.sig``, the signature of ``top/manifest.json`` with private ``key``."""
    key = Path(key)
    if not key.is_file():
        raise UserError(f"--key: {key}: no such private key file")
    sig = top / SIGNATURE
    sig.unlink(missing_ok=True)
    res = subprocess.run([_ssh_keygen(), "-Y", "sign", "-q", "-f", str(key), "-n", NAMESPACE, str(top / MANIFEST)],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    if res.returncode != 0:
        last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"--key: {key}: ssh-keygen could not sign with it: {last[0]}",
                        hint="a key with a passphrase needs ssh-agent (ssh-add it first)")
    (top / f"{MANIFEST}.sig").chmod(0o644)
    return sig


def check_release(top: Path, trusted: Sequence[Path], origin: str) -> Signer:
    """The trusted key that signed ``top/manifest.json``; :class:`SignatureError` if none did."""
    if not trusted:
        raise ValueError("check_release needs at least one trusted key")
    sig = top / SIGNATURE
    if not sig.is_file():
        raise SignatureError(f"{origin}: unsigned: no {SIGNATURE}, and {len(trusted)} trusted key(s) are "
                             "configured; sign it with `tvmbundle sign BUNDLE --key KEY`")
    keygen = _ssh_keygen()
    problems = []
    for key in trusted:
        with tempfile.NamedTemporaryFile("w", suffix=".allowed_signers") as allowed:
            allowed.write(allowed_signers([key]))
            allowed.flush()
            with open(top / MANIFEST, "rb") as data:
                res = subprocess.run([keygen, "-Y", "verify", "-f", allowed.name, "-I", PRINCIPAL, "-n", NAMESPACE,
                                      "-s", str(sig)], stdin=data, capture_output=True, text=True, timeout=60)
        if res.returncode == 0:
            fingerprint = next((w for w in res.stdout.split() if w.startswith("SHA256:")), "")
            return Signer(Path(key), fingerprint)
        problems.append((res.stderr or res.stdout).strip().splitlines()[-1:] or [""])
    raise SignatureError(f"{origin}: {SIGNATURE} is not a valid signature of {MANIFEST} by any of the "
                         f"{len(trusted)} trusted key(s) ({', '.join(str(k) for k in trusted)}): "
                         "signed by another key, or the manifest was changed after signing")


def sign(bundle: Path, key: Path, out: Path | None = None) -> Path:
    """Sign a bundle tarball: the same bundle (same id, same files) with ``manifest.json.sig`` added,
    written reproducibly to ``out`` (default: in place)."""
    bundle = Path(bundle)
    with tempfile.TemporaryDirectory(prefix="tvmbundle-sign-") as tmp:
        top = bundle_mod.extract(bundle, Path(tmp))
        manifest = bundle_mod.load_manifest(top, str(bundle))
        sign_release(top, key)
        dest = Path(out) if out else bundle
        bundle_mod.write_tarball(top, top.name, dest, bundle_mod.epoch_of(manifest))
    return dest
