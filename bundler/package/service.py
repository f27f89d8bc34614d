"""The systemd unit that runs a bundle's inference service on the board.

Rendered from ``overlays/tvmbundle.service.in`` with the recipe's [service]
settings (carried in the bundle's manifest) and the install prefix.  The unit
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

from bundler.errors import UserError

UNIT = "tvmbundle.service"
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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


def render_unit(manifest: Mapping[str, Any], prefix: str | None = None) -> str:
    """The unit text for the bundle described by ``manifest``, installed under ``prefix``."""
    svc = manifest.get("service", {})
    prefix = (prefix or manifest.get("install", {}).get("prefix") or "/opt/tvmbundle").rstrip("/")
    listen = svc.get("listen", "127.0.0.1:8470")
    host = listen.rpartition(":")[0]
    env_lines = []
    for key, value in sorted(svc.get("environment", {}).items()):
        if not _ENV_KEY.match(key):
            raise UserError(f"service.environment: {key!r} is not allowed; expected a variable name "
                            "([A-Za-z_][A-Za-z0-9_]*)")
        env_lines.append(f"Environment={_quote(f'{key}={value}')}")
    ip_access = "IPAddressAllow=localhost\nIPAddressDeny=any" if is_loopback(host) else ""
    text = template_path().read_text()
    for placeholder, value in (
        ("@NAME@", str(manifest.get("name", "model"))), ("@PREFIX@", prefix), ("@LISTEN@", listen),
        ("@THREADS@", str(svc.get("threads", 1))), ("@USER@", svc.get("user", "tvmbundle")),
        ("@ENVIRONMENT@", "\n".join(env_lines)), ("@IPACCESS@", ip_access),
    ):
        text = text.replace(placeholder, value)
    # An empty placeholder line would leave a blank line mid-section: harmless, but untidy.
    return re.sub(r"\n{3,}", "\n\n", text)
