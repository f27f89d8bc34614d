"""A bundle as a Debian package (`make --format deb`), for Debian and Raspberry Pi OS images and apt.

The package installs the release where `deploy` and the overlay put it
(PREFIX/releases/<bundle id>, PREFIX/current), and the unit as
/lib/systemd/system/tvmbundle.service.  Its maintainer scripts enable the unit
with the multi-user.target.wants link (which works in an image build with no
systemd running, and honours DPKG_ROOT), and (re)start it only where systemd
runs.  The unit uses DynamicUser, so there is no service user to create or
remove.  All bundle packages provide and conflict with `tvmbundle-service`:
one board runs one bundle service.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from bundler import proc
from bundler.config import cpu
from bundler.package.manifest import Manifest
from bundler.package.service import UNIT, render_unit

POSTINST = """#!/bin/sh
# Enable the service the way deb-systemd-helper would, so it also works in an image build.
set -e
if [ "$1" = configure ]; then
    mkdir -p "$DPKG_ROOT/etc/systemd/system/multi-user.target.wants"
    ln -sfn /lib/systemd/system/@UNIT@ "$DPKG_ROOT/etc/systemd/system/multi-user.target.wants/@UNIT@"
    if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl restart @UNIT@ || true
    fi
fi
exit 0
"""

PRERM = """#!/bin/sh
set -e
if [ "$1" = remove ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl stop @UNIT@ || true
fi
exit 0
"""

POSTRM = """#!/bin/sh
set -e
case "$1" in
    remove|purge)
        rm -f "$DPKG_ROOT/etc/systemd/system/multi-user.target.wants/@UNIT@"
        if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
            systemctl daemon-reload || true
        fi
        ;;
esac
if [ "$1" = purge ]; then
    # Releases and store entries a later `tvmbundle deploy` may have added are the package's too.
    rm -rf "$DPKG_ROOT@PREFIX@/releases" "$DPKG_ROOT@PREFIX@/store" "$DPKG_ROOT@PREFIX@/staging"
    rmdir "$DPKG_ROOT@PREFIX@" 2>/dev/null || true
fi
exit 0
"""


def package_name(manifest: Manifest) -> str:
    name = re.sub(r"[^a-z0-9+.-]+", "-", manifest.name.lower()).strip("-.+") or "model"
    return f"tvmbundle-{name}"


def package_version(manifest: Manifest, epoch: int) -> str:
    """Ordered by build time (SOURCE_DATE_EPOCH), then told apart by the bundle id."""
    return time.strftime("%Y%m%d.%H%M%S", time.gmtime(epoch)) + "+" + manifest.bundle_id[:8]


def build_deb(release: Path, manifest: Manifest, out_dir: Path, epoch: int, work: Path) -> Path:
    board = manifest.board
    prefix = manifest.install.prefix.rstrip("/")
    name, version = package_name(manifest), package_version(manifest, epoch)
    arch = cpu.FAMILIES[board.cpu_family].debian_arch
    root = work / "deb"
    rel_dir = root / prefix.strip("/") / "releases" / manifest.bundle_id
    shutil.copytree(release, rel_dir, symlinks=True)
    os.symlink(f"releases/{manifest.bundle_id}", root / prefix.strip("/") / "current")
    units = root / "lib" / "systemd" / "system"
    units.mkdir(parents=True)
    (units / UNIT).write_text(render_unit(manifest))
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
        "Provides: tvmbundle-service",
        "Conflicts: tvmbundle-service",
        "Replaces: tvmbundle-service",
        "Section: misc",
        "Priority: optional",
        f"Description: {manifest.name} for {board.title or board.name}, served by TVM",
        f" Bundle {manifest.bundle_id} built by tvmbundle: the model compiled with apache-tvm",
        f" {manifest.compiler['apache-tvm']}, its runtime and the tvm-deploy harness, run as the",
        f" {UNIT} inference service.",
        ""]))
    for script, text in (("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)):
        p = debian / script
        p.write_text(text.replace("@UNIT@", UNIT).replace("@PREFIX@", prefix))
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
