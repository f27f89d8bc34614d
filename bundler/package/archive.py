"""Unpacking a tarball that may have been crafted: nothing lands outside the destination.

Python's tarfile gained its ``data`` extraction filter in 3.11.4 (and 3.10.12); Debian 12's own
python3 is 3.11.2 and has none, and the filter's messages differ between versions. So every
member is checked here, by the same rules and with the same messages on every Python, and
written by this module, never by ``extractall``:

* a member's name must be relative, with no ``..`` and no empty component;
* only regular files, folders, and links that stay inside the tree are allowed; devices,
  FIFOs and anything else are refused;
* files are created with ``O_EXCL | O_NOFOLLOW`` and their mode masked to 0o755, so no member
  can write through a link or become setuid, and links are made last, once no file remains
  to be written through them.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

from bundler.errors import UserError

_COPY_CHUNK = 1 << 20


class UnsafeArchive(UserError):
    """A tarball member that would escape the destination or is not a plain file or folder."""


def member_path(name: str) -> str | None:
    """``name`` normalised, or None when it is absolute, climbs with ``..`` or is empty."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def _check_link(origin: str, m: tarfile.TarInfo, rel: str) -> str:
    target = m.linkname
    if not target or "\x00" in target:
        raise UnsafeArchive(f"{origin}: member {m.name!r}: link with an empty target is not allowed")
    if target.startswith("/"):
        raise UnsafeArchive(f"{origin}: member {m.name!r}: link to the absolute path {target!r} is not allowed; "
                            "links must stay inside the archive")
    # A symlink resolves from its folder, a hard link from the archive's root.
    base = posixpath.dirname(rel) if m.issym() else ""
    resolved = posixpath.normpath(posixpath.join(base, target))
    if resolved == ".." or resolved.startswith("../") or member_path(resolved) is None:
        raise UnsafeArchive(f"{origin}: member {m.name!r}: link to {target!r} leads out of the archive")
    return resolved


def extract(archive: Path, dest: Path, origin: str | None = None,
            check: Callable[[list[str]], None] | None = None) -> list[str]:
    """Unpack ``archive`` into ``dest`` (created if missing); returns the members' paths.

    Raises :class:`UnsafeArchive` naming the member for anything that breaks the rules above,
    before writing anything: the whole member list is checked first, then given to ``check``
    (which may raise to refuse the archive's layout).
    """
    origin = origin or str(archive)
    dest = Path(dest)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        plan: list[tuple[tarfile.TarInfo, str]] = []
        for m in members:
            rel = member_path(m.name)
            if rel is None:
                raise UnsafeArchive(f"{origin}: member {m.name!r}: absolute paths, '..' and empty names are not "
                                    "allowed; every member must stay inside the archive")
            if m.isfile() or m.isdir():
                pass
            elif m.issym() or m.islnk():
                _check_link(origin, m, rel)
            else:
                kind = ("character device" if m.ischr() else "block device" if m.isblk() else
                        "FIFO" if m.isfifo() else f"member of type {m.type!r}")
                raise UnsafeArchive(f"{origin}: member {m.name!r}: a {kind} is not allowed; "
                                    "expected regular files, folders and links inside the archive")
            plan.append((m, rel))
        _no_duplicates_or_links_as_folders(origin, plan)
        if check is not None:
            check([rel for _, rel in plan])
        dest.mkdir(parents=True, exist_ok=True)
        written: list[str] = []
        for m, rel in plan:
            out = dest / rel
            _no_links_above(dest, rel, origin, m.name)
            if m.isdir():
                out.mkdir(parents=True, exist_ok=True)
            elif m.isfile():
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None  # a regular file always has data
                fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, m.mode & 0o755 | 0o600)
                with os.fdopen(fd, "wb") as f, src:
                    shutil.copyfileobj(src, f, _COPY_CHUNK)
                os.chmod(out, m.mode & 0o755 | 0o400)
            written.append(rel)
        for m, rel in plan:
            if m.issym() or m.islnk():
                out = dest / rel
                _no_links_above(dest, rel, origin, m.name)
                out.parent.mkdir(parents=True, exist_ok=True)
                if m.issym():
                    os.symlink(m.linkname, out)
                else:
                    os.link(dest / _check_link(origin, m, rel), out, follow_symlinks=False)
    return written


def _no_duplicates_or_links_as_folders(origin: str, plan: list[tuple[tarfile.TarInfo, str]]) -> None:
    seen: dict[str, tarfile.TarInfo] = {}
    for m, rel in plan:
        if rel in seen and not (m.isdir() and seen[rel].isdir()):
            raise UnsafeArchive(f"{origin}: member {m.name!r}: appears twice; each path may be written once")
        seen[rel] = m
    links = {rel for m, rel in plan if m.issym() or m.islnk()}
    for m, rel in plan:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in links:
                raise UnsafeArchive(f"{origin}: member {m.name!r}: its folder {folder!r} is a link in the archive; "
                                    "writing through links is not allowed")


def _no_links_above(dest: Path, rel: str, origin: str, name: str) -> None:
    """A folder on the member's way that is a link (a member made it one) would redirect the write."""
    cur = dest
    for part in rel.split("/")[:-1]:
        cur = cur / part
        if cur.is_symlink():
            raise UnsafeArchive(f"{origin}: member {name!r}: its folder {part!r} is a link; "
                                "writing through links is not allowed")
