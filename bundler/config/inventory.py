"""Fleet inventories: TOML (``format = 1``), one ``[hosts.NAME]`` table per device, ``[defaults]``
for any key but the address; loaded into frozen :class:`Host` records.

:class:`Host`'s fields are the schema, as a recipe's sections are (:func:`bundler.config.recipe.key`):
each declares its check, default and doc, so adding a key is one field, and every error reads
``FILE: KEY: problem`` with a did-you-mean for unknown keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from bundler.config import values
from bundler.config.recipe import Field, check_format, display_path, is_nonempty_str, is_str_list, key, read_toml
from bundler.errors import RecipeError, UserError, did_you_mean

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_ADDRESS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,252}$")


def _port(v: Any) -> str | None:
    if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536:
        return None
    return f"{v!r} is not allowed; expected an integer from 1 to 65535"


def _address(v: Any) -> str | None:
    if isinstance(v, str) and _ADDRESS.match(v):
        return None
    return f"{v!r} is not allowed; expected a host name or an IP address"


def _login(v: Any) -> str | None:
    # SSH login names: what sshd accepts and a shell never misreads.
    if isinstance(v, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", v):
        return None
    return f"{v!r} is not allowed; expected a user name (letters, digits, '_', '.', '-')"


def _sudo(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"{v!r} is not allowed; expected true or false"


@dataclass(frozen=True, kw_only=True)
class Host:
    """One device of the fleet."""

    name: str = ""                                     # the [hosts.NAME] table's name, not a key
    address: str = key(_address, "the device's host name or IP address", required=True)
    user: str = key(_login, "the SSH login", "root")
    port: int = key(_port, "the SSH port", 22)
    board: str = key(is_nonempty_str, "the board recipe the device runs (e.g. rpi4)", required=True)
    groups: tuple[str, ...] = key(is_str_list, "groups --group picks from", [], coerce=tuple)
    prefix: str | None = key(values.install_prefix, "install root on the device (default: the bundle's)")
    sudo: bool = key(_sudo, "log in as a normal user and run the root steps through sudo -n", False)


def _keys() -> dict[str, tuple[str, Field]]:
    out = {}
    for f in dataclass_fields(Host):
        spec = f.metadata.get("recipe")
        if spec is not None:
            out[spec.key or f.name] = (f.name, spec)
    return out


HOST_KEYS = tuple(_keys())


def load(path: Path | str) -> list[Host]:
    """The hosts of the inventory at ``path``, in file order."""
    path = Path(path)
    file = display_path(path)
    if not path.is_file():
        raise UserError(f"inventory not found: {path}")
    data = read_toml(path)
    check_format(file, data, "inventory")
    for k in data:
        if k not in ("format", "defaults", "hosts"):
            raise RecipeError(file, k, f"unknown key{did_you_mean(k, ['defaults', 'hosts'])}; "
                                       "allowed at the top level: format, defaults, hosts")
    keys = _keys()
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise RecipeError(file, "defaults", f"expected a table, got {defaults!r}")
    _check(file, "defaults", defaults, {k: v for k, v in keys.items() if k != "address"})
    hosts_t = data.get("hosts")
    if not isinstance(hosts_t, dict) or not hosts_t:
        raise RecipeError(file, "hosts", "missing or empty; add a [hosts.NAME] table per device")
    hosts = []
    for name, raw in hosts_t.items():
        where = f"hosts.{name}"
        if not _NAME.match(name):
            raise RecipeError(file, where, "host names are 1 to 63 letters, digits, '.', '_' and '-'")
        if not isinstance(raw, dict):
            raise RecipeError(file, where, f"expected a table, got {raw!r}")
        _check(file, where, raw, keys)
        merged = {**defaults, **raw}
        kwargs: dict[str, Any] = {"name": name}
        for k, (attr, spec) in keys.items():
            if k in merged:
                v = merged[k]
                kwargs[attr] = spec.coerce(v) if spec.coerce else v
            elif spec.required:
                raise RecipeError(file, f"{where}.{k}", f"missing; {spec.doc}")
            else:
                default = spec.default
                kwargs[attr] = spec.coerce(default) if spec.coerce and default is not None else default
        hosts.append(Host(**kwargs))
    return hosts


def _check(file: str, where: str, table: dict[str, Any], keys: dict[str, tuple[str, Field]]) -> None:
    for k, v in table.items():
        if k not in keys:
            raise RecipeError(file, f"{where}.{k}", f"unknown key{did_you_mean(k, keys)}; "
                                                    f"allowed: {', '.join(keys)}")
        problem = keys[k][1].check(v)
        if problem:
            raise RecipeError(file, f"{where}.{k}", problem)
