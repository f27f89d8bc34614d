"""A bundle as a Debian package (`make --format deb`), for Debian and Raspberry Pi OS images and apt.

The package installs the bundle's own folder of the device layout (bundler.package.layout), where
`deploy` and the overlay put it: PREFIX/bundles/NAME/releases/<bundle id>, PREFIX/bundles/NAME/current,
and its unit as /lib/systemd/system/tvmbundle@NAME.service.  Its maintainer scripts enable that
instance with its multi-user.target.wants link (which works in an image build with no systemd
running, and honours DPKG_ROOT), and (re)start or stop it only where systemd runs.  The unit uses
DynamicUser, so there is no service user to create or remove.

A device runs several bundles (a detector and a recognizer): each bundle name is its own package
(tvmbundle-NAME) whose files are all below its own folder or named after it, so the packages of
two bundles install side by side.  The shared content-addressed store is deploy's, never in a
package; purging a package removes its bundle's folder and leaves the store, staging and the prefix
to the last bundle.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

from bundler import proc
from bundler.config import cpu
from bundler.package import layout
from bundler.package.manifest import Manifest
from bundler.package.service import render_unit

SYSTEM_UNITS = "/lib/systemd/system"
WANTS = f"{layout.UNIT_DIR}/multi-user.target.wants"

POSTINST = """#!/bin/sh
# Enable the bundle's service the way deb-systemd-helper would, so it also works in an image build.
set -e
if [ "$1" = configure ]; then
    wants="$DPKG_ROOT@WANTS@"
    mkdir -p "$wants"
    ln -sfn "@SYSTEM_UNITS@/@UNIT@" "$wants/@UNIT@"
    # An upgrade from a package of the single-service layout: dpkg removed its @LEGACY_UNIT@ from
    # @SYSTEM_UNITS@; its wants link and its service (which holds the address) go with it.
    legacy=
    if [ -n "$2" ] && [ ! -e "$DPKG_ROOT@SYSTEM_UNITS@/@LEGACY_UNIT@" ] \\
        && [ "$(readlink "$wants/@LEGACY_UNIT@" 2>/dev/null)" = "@SYSTEM_UNITS@/@LEGACY_UNIT@" ]; then
        rm -f "$wants/@LEGACY_UNIT@"
        legacy=1
    fi
    if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
        if [ -n "$legacy" ]; then
            systemctl stop @LEGACY_UNIT@ || true
        fi
        systemctl daemon-reload
        systemctl restart "@UNIT@" || true
    fi
fi
exit 0
"""

PRERM = """#!/bin/sh
set -e
if [ "$1" = remove ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl stop "@UNIT@" || true
fi
exit 0
"""

POSTRM = """#!/bin/sh
set -e
case "$1" in
    remove|purge)
        rm -f "$DPKG_ROOT@WANTS@/@UNIT@"
        if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
            systemctl daemon-reload || true
        fi
        ;;
esac
if [ "$1" = purge ]; then
    # This bundle's folder (the releases a later `tvmbundle deploy` added too) and the unit deploy
    # installed for it. The store, staging and the prefix are shared by every bundle of the device:
    # they go with the last one only (no other bundle's folder, no single-service layout left).
    prefix="$DPKG_ROOT@PREFIX@"
    rm -rf "$DPKG_ROOT@BUNDLE@"
    rm -f "$DPKG_ROOT@UNIT_DIR@/@UNIT@"
    rmdir "$prefix/bundles" 2>/dev/null || true
    if [ ! -e "$prefix/bundles" ] && [ ! -e "$prefix/releases" ] && [ ! -L "$prefix/current" ]; then
        rm -rf "$prefix/store" "$prefix/staging"
        rmdir "$prefix" 2>/dev/null || true
    fi
fi
exit 0
"""


def package_name(manifest: Manifest, allowed: str = "a-z0-9+.-") -> str:
    """tvmbundle-NAME, the bundle's name in a package system's alphabet (Debian's by default).

    Two bundle names never give one package name, or the second package would replace the first:
    a name that had to change (upper case, ``_``) gets 8 hex digits of its sha256 (``My_Net`` ->
    ``tvmbundle-my-net-1a2b3c4d``, while ``my-net`` stays ``tvmbundle-my-net``).
    """
    name = manifest.name
    base = re.sub(f"[^{allowed}]+", "-", name.lower()).strip("-.+") or "model"
    if base != name:
        base += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"tvmbundle-{base}"


def package_version(manifest: Manifest, epoch: int) -> str:
    """Ordered by build time (SOURCE_DATE_EPOCH), then told apart by the bundle id."""
    return time.strftime("%Y%m%d.%H%M%S", time.gmtime(epoch)) + "+" + manifest.bundle_id[:8]


def build_deb(release: Path, manifest: Manifest, out_dir: Path, epoch: int, work: Path) -> Path:
    board = manifest.board
    prefix = manifest.install.prefix.rstrip("/")
    name, version = package_name(manifest), package_version(manifest, epoch)
    unit = layout.unit_name(manifest.name)
    arch = cpu.FAMILIES[board.cpu_family].debian_arch
    root = work / "deb"
    shutil.copytree(release, root / layout.release_dir(prefix, manifest.name, manifest.bundle_id).lstrip("/"),
                    symlinks=True)
    os.symlink(layout.current_target(manifest.bundle_id), root / layout.current(prefix, manifest.name).lstrip("/"))
    units = root / SYSTEM_UNITS.lstrip("/")
    units.mkdir(parents=True)
    (units / unit).write_text(render_unit(manifest))
    debian = root / "DEBIAN"
    debian.mkdir()
    size_kb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()) // 1024 + 1
    depends = [f"libc6 (>= {board.glibc})", "libstdc++6", "libgcc-s1"]
    (debian / "control").write_text("\n".join([
        f"Package: {name}",
        f"Version: {version}",
        f"Architecture: {arch}",
        "Maintainer: tvmbundle <tvmbundle@localhost>",
        f"Installed-Size: {size_kb}",
        f"Depends: {', '.join(depends)}",
        "Section: misc",
        "Priority: optional",
        f"Description: {manifest.name} for {board.title or board.name}, served by TVM",
        f" Bundle {manifest.bundle_id} built by tvmbundle: the model compiled with apache-tvm",
        f" {manifest.compiler['apache-tvm']}, its runtime and the tvm-deploy harness, run as the",
        f" {unit} inference service.",
        ""]))
    values = {"@UNIT@": unit, "@LEGACY_UNIT@": layout.LEGACY_UNIT, "@SYSTEM_UNITS@": SYSTEM_UNITS,
              "@UNIT_DIR@": layout.UNIT_DIR, "@WANTS@": WANTS, "@BUNDLE@": layout.bundle_dir(prefix, manifest.name),
              "@PREFIX@": prefix}
    for script, text in (("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)):
        for key, value in values.items():
            text = text.replace(key, value)
        p = debian / script
        p.write_text(text)
        p.chmod(0o755)
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            if p.is_dir():
                p.chmod(0o755)
            elif p.parent != debian and not os.access(p, os.X_OK):
                p.chmod(0o644)
        os.utime(p, (epoch, epoch), follow_symlinks=False)
    out = out_dir / f"{name}_{version}_{arch}.deb"
    tmp = out.with_name(f".{out.name}.tmp")
    proc.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(tmp)],
             env={"SOURCE_DATE_EPOCH": str(epoch)}, what="build the Debian package")
    tmp.replace(out)
    return out
