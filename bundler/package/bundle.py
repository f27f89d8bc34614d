"""The bundle: a self-contained, reproducible tarball with a manifest of checksums.

Layout and manifest fields are described in docs/bundle-format.md.  The same
inputs give a byte-identical tarball: entries are sorted, owners are 0, mtimes
come from SOURCE_DATE_EPOCH (or 1980-01-01), the gzip header carries no name
or time, and nothing inside names a path of the build machine.
"""

from __future__ import annotations

import calendar
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bundler import cache
from bundler.errors import UserError
from bundler.package import archive, layout
from bundler.package.manifest import (
    MANIFEST,
    FileEntry,
    Manifest,
)
from bundler.package.service import render_unit

DEFAULT_EPOCH = 315532800  # 1980-01-01T00:00:00Z, the oldest time zip (and so wheels) can store
FORMATS = ("tar", "overlay", "deb")


def epoch_of(manifest: Manifest) -> int:
    """The SOURCE_DATE_EPOCH a bundle was made with, from its manifest's ``created``."""
    try:
        return calendar.timegm(time.strptime(manifest.created, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return DEFAULT_EPOCH


def source_date_epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return DEFAULT_EPOCH
    if not value.isdigit():
        raise UserError(f"SOURCE_DATE_EPOCH: {value!r} is not allowed; expected seconds since 1970 (digits only)")
    return int(value)


def file_entry(root: Path, rel: str) -> FileEntry:
    p = root / rel
    executable = os.access(p, os.X_OK)
    return FileEntry(rel, cache.sha256_file(p), p.stat().st_size, "0755" if executable else "0644")


def bundle_id(files: list[FileEntry], identity: Mapping[str, Any]) -> str:
    """The bundle's identity: a hash of its files and of what the manifest says about them."""
    h = hashlib.sha256()
    h.update(json.dumps([f.to_json() for f in files], sort_keys=True).encode())
    h.update(json.dumps(identity, sort_keys=True).encode())
    return h.hexdigest()


def stage(staging: Path, parts: Mapping[str, Path]) -> list[FileEntry]:
    """Copy ``parts`` (bundle path -> source file) into ``staging`` with normalized modes."""
    for rel, src in sorted(parts.items()):
        dest = staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        exe = rel.startswith("bin/") or rel.endswith(".so")
        dest.chmod(0o755 if exe else 0o644)
    return [file_entry(staging, rel) for rel in sorted(parts)]


def write_manifest(staging: Path, manifest: Manifest) -> None:
    (staging / MANIFEST).write_text(manifest.dumps())
    (staging / MANIFEST).chmod(0o644)


def write_tarball(staging: Path, top: str | None, out: Path, epoch: int) -> None:
    """A reproducible .tar.gz of ``staging``, under one top folder ``top`` (or at the root when None).

    Symbolic links are stored as links (the overlay's ``current`` and unit links).
    """
    members = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*"))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if top:
            tar.addfile(_info(top, tarfile.DIRTYPE, 0o755, 0, epoch))
        for rel in members:
            p = staging / rel
            name = f"{top}/{rel}" if top else rel
            if p.is_symlink():
                ti = _info(name, tarfile.SYMTYPE, 0o777, 0, epoch)
                ti.linkname = os.readlink(p)
                tar.addfile(ti)
            elif p.is_dir():
                tar.addfile(_info(name, tarfile.DIRTYPE, 0o755, 0, epoch))
            else:
                mode = 0o755 if os.access(p, os.X_OK) else 0o644
                with open(p, "rb") as f:
                    tar.addfile(_info(name, tarfile.REGTYPE, mode, p.stat().st_size, epoch), f)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=6) as gz:
        gz.write(raw.getvalue())
    os.replace(tmp, out)


def write_overlay(release: Path, manifest: Manifest, tree: Path) -> None:
    """A rootfs overlay in ``tree``: lay it onto / and the service runs at the next boot.

    The bundle's own folder of the device layout (bundler.package.layout): PREFIX/bundles/NAME/
    releases/<bundle id>/ holds the release, PREFIX/bundles/NAME/current points at it, and the unit
    tvmbundle@NAME.service is enabled by its multi-user.target.wants link, without systemctl. It is
    the layout `tvmbundle deploy` keeps, so a later deploy takes over an imaged board; the overlays of
    several bundles laid onto one image share nothing but folders (the store is deploy's alone).
    """
    name, prefix, bid = manifest.name, manifest.install.prefix, manifest.bundle_id
    shutil.copytree(release, tree / layout.release_dir(prefix, name, bid).lstrip("/"), symlinks=True)
    os.symlink(layout.current_target(bid), tree / layout.current(prefix, name).lstrip("/"))
    units = tree / layout.UNIT_DIR.lstrip("/")
    unit = layout.unit_name(name)
    (units / "multi-user.target.wants").mkdir(parents=True, exist_ok=True)
    (units / unit).write_text(render_unit(manifest))
    (units / unit).chmod(0o644)
    os.symlink(f"../{unit}", units / "multi-user.target.wants" / unit)


def _info(name: str, kind: bytes, mode: int, size: int, epoch: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.size = size
    ti.mtime = epoch
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


# --- reading bundles ----------------------------------------------------------------------

def extract(bundle: Path, dest: Path) -> Path:
    """Safely unpack a bundle tarball into ``dest``; returns its top folder."""
    if not bundle.is_file():
        raise UserError(f"bundle not found: {bundle}")
    tops: set[str] = set()

    def one_top(names: list[str]) -> None:
        tops.update(n.split("/", 1)[0] for n in names)
        if len(tops) != 1:
            raise UserError(f"{bundle}: not a tvmbundle bundle: expected one top folder, found "
                            f"{len(tops)} ({', '.join(sorted(tops)[:5])})")

    try:
        archive.extract(bundle, dest, check=one_top)
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{bundle}: not a readable bundle tarball: {e}") from None
    top = dest / tops.pop()
    if not (top / MANIFEST).is_file():
        raise UserError(f"{bundle}: not a tvmbundle bundle: no {MANIFEST} in {top.name}/")
    return top


def load_manifest(top: Path, origin: str) -> Manifest:
    """The release's manifest, validated: every path inside the release, every unit value sane."""
    return Manifest.load(top, origin)


def read_manifest(top: Path, origin: str) -> dict[str, Any]:
    """The validated manifest as a dict, for the readers not yet moved to :class:`Manifest`."""
    return Manifest.load(top, origin).to_json()
