"""The systemd unit that runs a bundle's inference service on the board.

Rendered from ``overlays/tvmbundle.service.in`` with the recipe's [service]
settings (carried in the bundle's manifest) and the install prefix, as the unit
of the bundle's own instance, ``tvmbundle@NAME.service`` (bundler.package.layout).  The unit
is hardened to an exposure of about 1 by ``systemd-analyze security``: its own
dynamic user, a read-only view of the system and of the release, no
capabilities, a system-call allow-list and IP access only to where it listens.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bundler.config import values
from bundler.errors import UserError
from bundler.package import layout
from bundler.package.manifest import Manifest


def template_path() -> Path:
    package = Path(__file__).resolve().parents[1]
    for cand in (package.parent / "overlays" / "tvmbundle.service.in", package / "overlays" / "tvmbundle.service.in"):
        if cand.is_file():
            return cand
    raise FileNotFoundError("tvmbundle.service.in is missing from this installation")


def _quote(value: str) -> str:
    # systemd expands %-specifiers and honours C-style escapes inside quotes.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def render_unit(manifest: Manifest | Mapping[str, Any], prefix: str | None = None) -> str:
    """The unit text for the bundle described by ``manifest``, installed under ``prefix``.

    Every value was checked when the manifest loaded (bundler.config.values: no control
    characters, no '%', no spaces in paths, names and addresses of a fixed alphabet); the
    environment is quoted as systemd.syntax(7) says. A prefix given here is checked the same way.
    """
    if not isinstance(manifest, Manifest):      # device code still passes the JSON form
        manifest = Manifest.from_json(dict(manifest), "manifest")
    svc = manifest.service
    prefix = (prefix or manifest.install.prefix).rstrip("/") or "/"
    problem = values.install_prefix(prefix)
    if problem:
        raise UserError(f"--prefix: {problem}")
    host = svc.listen.rpartition(":")[0]
    env_lines = [f"Environment={_quote(f'{key}={value}')}" for key, value in sorted(svc.environment.items())]
    ip_access = "IPAddressAllow=localhost\nIPAddressDeny=any" if is_loopback(host) else ""
    text = template_path().read_text()
    for placeholder, value in (
        ("@NAME@", manifest.name), ("@CURRENT@", layout.current(prefix, manifest.name)), ("@PREFIX@", prefix), ("@LISTEN@", svc.listen),
        ("@THREADS@", str(svc.threads)), ("@USER@", svc.user),
        ("@ENVIRONMENT@", "\n".join(env_lines)), ("@IPACCESS@", ip_access),
    ):
        text = text.replace(placeholder, value)
    # An empty placeholder line would leave a blank line mid-section: harmless, but untidy.
    return re.sub(r"\n{3,}", "\n\n", text)
