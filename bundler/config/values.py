"""Checks for values that end up in a systemd unit, a path or a command on the device.

A recipe and a bundle's manifest are checked by the same rules, at load time: a recipe so that
`make` never builds a bundle whose unit is wrong, a manifest because a bundle may have been
crafted. Each check returns None when the value is good, else what is wrong and what is
allowed, worded to follow ``FILE: KEY:``.

The rules are deliberately narrower than what systemd could escape: a unit is read by people
on the device too, and an install prefix with a space or a ``%`` is far more likely a mistake
than a wish.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Callable, Iterable
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
PREFIX_RE = re.compile(r"^(/[A-Za-z0-9_.+-]+)+$")
# systemd's own rule for User= with DynamicUser (and useradd's on Debian): no dots, no leading digit.
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else f"{v!r} ({type(v).__name__})"


def bundle_name(v: Any) -> str | None:
    if isinstance(v, str) and NAME_RE.match(v) and v not in (".", ".."):
        return None
    return (f"{_show(v)} is not allowed; expected 1 to 64 letters, digits, '_', '.' or '-', "
            "not starting with '.' or '-'")


def install_prefix(v: Any) -> str | None:
    if isinstance(v, str) and PREFIX_RE.match(v) and posixpath.normpath(v) == v \
            and ".." not in v.split("/") and v != "/":
        return None
    return (f"{_show(v)} is not allowed; expected an absolute, normalised path of letters, digits and "
            "'/', '_', '.', '+', '-' (no spaces, quotes, '%' or '..'), e.g. \"/opt/tvmbundle\"")


def unix_user(v: Any) -> str | None:
    if isinstance(v, str) and USER_RE.match(v):
        return None
    return (f"{_show(v)} is not allowed; expected a user name of lower-case letters, digits, '_' and '-', "
            "starting with a letter or '_', at most 31 characters")


def listen_address(v: Any) -> str | None:
    """HOST:PORT, HOST an IPv4 address, [IPv6] or a host name; the port 1 to 65535."""
    if isinstance(v, str):
        host, _, port = v.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536 and not _CONTROL.search(v):
            if host.startswith("[") and host.endswith("]"):
                try:
                    ipaddress.IPv6Address(host[1:-1])
                    return None
                except ValueError:
                    pass
            elif HOSTNAME_RE.match(host):
                return None
    return (f"expected HOST:PORT (an IPv4 address, [IPv6] or a host name, and a port from 1 to 65535), "
            f"got {_show(v)}")


def environment(v: Any) -> str | None:
    """A table of variable names to values, as a systemd Environment= line can carry them."""
    if not isinstance(v, dict):
        return f"expected a table of NAME = \"value\", got {_show(v)}"
    for key, value in v.items():
        if not isinstance(key, str) or not ENV_NAME_RE.match(key):
            return f"{_show(key)} is not allowed as a variable name; expected [A-Za-z_][A-Za-z0-9_]*"
        if not isinstance(value, str):
            return f"{key}: expected a string, got {_show(value)}"
        if _CONTROL.search(value):
            return (f"{key}: {value!r} is not allowed; control characters (newlines, tabs, NUL) cannot be "
                    "part of a unit's environment")
    return None


def release_path(v: Any) -> str | None:
    """A path inside a release: relative, normalised, no '..', no empty or odd components."""
    if isinstance(v, str) and v and not v.startswith("/") and "\\" not in v and not _CONTROL.search(v):
        parts = v.split("/")
        if all(p not in ("", ".", "..") for p in parts):
            return None
    return (f"{_show(v)} is not allowed; a path in a bundle must be relative and stay inside the release "
            "(no leading '/', no '..', no empty components)")


def sha256_hex(v: Any) -> str | None:
    if isinstance(v, str) and HEX64_RE.match(v):
        return None
    return f"expected 64 lower-case hex digits (a sha256), got {_show(v)}"


def each(check: Callable[[Any], str | None]) -> Callable[[Iterable[Any]], str | None]:
    """``check`` applied to every item of an array: the first problem, naming the item."""
    def check_all(items: Iterable[Any]) -> str | None:
        for i, item in enumerate(items):
            problem = check(item)
            if problem:
                return f"[{i}]: {problem}"
        return None
    return check_all
