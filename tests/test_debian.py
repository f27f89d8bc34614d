"""`make --format deb`: the package's whole life in a scratch root with the real dpkg.

dpkg runs with --root on a scratch folder and --force-script-chrootless, so the
maintainer scripts run here with DPKG_ROOT set (as they do in image builds). The packages of two
bundles install side by side (bundler.package.layout: a folder and a unit per bundle name).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bundler.package import layout
from tests import models

PREFIX = "/opt/tvmbundle"

pytestmark = [pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="needs dpkg"),
              pytest.mark.slow]    # every test builds and installs .deb packages


def make_deb(run_cli, model: Path, out: Path, epoch: str, monkeypatch) -> Path:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", epoch)
    code, stdout, err = run_cli("make", "x86_64", "--model", str(model), "--out", str(out), "--format", "deb",
                                "--no-verify", "-q")
    assert code == 0, err
    return Path(stdout.strip())


def dpkg(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends",
                           "--log=/dev/null", *args], capture_output=True, text=True, check=False)


def scratch_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    admin = root / "var" / "lib" / "dpkg"
    for d in ("info", "updates", "triggers"):
        (admin / d).mkdir(parents=True)
    (admin / "status").write_text("")
    (admin / "available").write_text("")
    return root


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True).stdout.strip()


def contents(deb: Path) -> tuple[set[str], set[str]]:
    """(files and links, folders) the package holds, as paths from /."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    files, dirs = set(), set()
    for line in out.splitlines():
        mode, path = line.split()[0], line.split(None, 5)[5].split(" -> ")[0]
        (dirs if mode.startswith("d") else files).add(path.removeprefix(".").rstrip("/") or "/")
    return files, dirs


def at(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def test_deb_install_upgrade_remove_purge(run_cli, tmp_path, monkeypatch):
    models.conv_net(tmp_path / "net.onnx", seed=0)
    old = make_deb(run_cli, tmp_path / "net.onnx", tmp_path / "a", "1700000000", monkeypatch)
    models.conv_net(tmp_path / "net.onnx", seed=1)
    new = make_deb(run_cli, tmp_path / "net.onnx", tmp_path / "b", "1700086400", monkeypatch)
    assert field(old, "Package") == "tvmbundle-net" and field(old, "Architecture") == "amd64"
    assert field(old, "Version") < field(new, "Version")
    assert "libc6 (>= 2.36)" in field(old, "Depends")
    old_id = field(old, "Version").split("+")[1]
    new_id = field(new, "Version").split("+")[1]

    root = scratch_root(tmp_path)
    prefix = at(root, PREFIX)
    unit = layout.unit_name("net")
    wants = root / "etc/systemd/system/multi-user.target.wants" / unit
    res = dpkg(root, "-i", str(old))
    assert res.returncode == 0, res.stderr
    current = at(root, layout.current(PREFIX, "net"))
    assert current.is_symlink() and current.readlink().name.startswith(old_id)
    assert str(current.readlink().parent) == "releases"
    assert (current / "bin" / "tvm-deploy").is_file()
    assert (root / "lib/systemd/system" / unit).is_file()
    assert wants.is_symlink() and str(wants.readlink()) == f"/lib/systemd/system/{unit}"
    # the installed release runs, and the unit checks out against the scratch root
    assert subprocess.run([str(current / "bin" / "tvm-deploy"), "selftest"], capture_output=True, check=False).returncode == 0
    units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    check_root = tmp_path / "check"
    shutil.copytree(root, check_root, symlinks=True)
    shutil.copytree(units, check_root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    va = subprocess.run(["systemd-analyze", "verify", f"--root={check_root}", f"/lib/systemd/system/{unit}"],
                        capture_output=True, text=True, check=False)
    assert va.returncode == 0 and va.stderr == "", va.stderr

    res = dpkg(root, "-i", str(new))                      # upgrade
    assert res.returncode == 0, res.stderr
    releases = sorted(p.name[:8] for p in at(root, layout.releases_dir(PREFIX, "net")).iterdir())
    assert releases == [new_id] and current.readlink().name.startswith(new_id)
    assert wants.is_symlink()

    res = dpkg(root, "-r", "tvmbundle-net")               # remove
    assert res.returncode == 0, res.stderr
    assert not current.exists() and not current.is_symlink()
    assert not (root / "lib/systemd/system" / unit).exists() and not wants.is_symlink()
    status = (root / "var/lib/dpkg/status").read_text()
    assert "Package: tvmbundle-net" in status and "config-files" in status

    res = dpkg(root, "-P", "tvmbundle-net")               # purge
    assert res.returncode == 0, res.stderr
    assert "tvmbundle-net" not in (root / "var/lib/dpkg/status").read_text()
    assert not prefix.exists()


def test_deb_is_reproducible_and_named_for_the_board(run_cli, tmp_path, monkeypatch):
    models.conv_net(tmp_path / "net.onnx")
    a = make_deb(run_cli, tmp_path / "net.onnx", tmp_path / "a", "1700000000", monkeypatch)
    b = make_deb(run_cli, tmp_path / "net.onnx", tmp_path / "b", "1700000000", monkeypatch)
    assert a.name == b.name and a.read_bytes() == b.read_bytes()
    if shutil.which("aarch64-linux-gnu-g++"):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
        code, stdout, err = run_cli("make", "rpi4", "--model", str(tmp_path / "net.onnx"), "--out",
                                    str(tmp_path / "c"), "--format", "deb", "--no-verify", "-q")
        assert code == 0, err
        deb = Path(stdout.strip())
        assert deb.name.endswith("_arm64.deb") and field(deb, "Architecture") == "arm64"


def test_two_bundles_install_side_by_side(run_cli, tmp_path, monkeypatch):
    """A detector and a recognizer: two packages with no file in common, both installed, both enabled;
    purging one leaves the other and the shared store, purging the last leaves nothing."""
    (tmp_path / "m").mkdir()
    models.conv_net(tmp_path / "m" / "det.onnx", seed=0)
    models.conv_net(tmp_path / "m" / "rec.onnx", seed=1)
    debs = {n: make_deb(run_cli, tmp_path / "m" / f"{n}.onnx", tmp_path / n, "1700000000", monkeypatch)
            for n in ("det", "rec")}
    assert {n: field(d, "Package") for n, d in debs.items()} == {"det": "tvmbundle-det", "rec": "tvmbundle-rec"}
    for deb in debs.values():
        assert "tvmbundle-service" not in field(deb, "Conflicts") + field(deb, "Provides")
    (det_files, det_dirs), (rec_files, rec_dirs) = contents(debs["det"]), contents(debs["rec"])
    assert det_files and rec_files and not det_files & rec_files, sorted(det_files & rec_files)
    assert not det_files & rec_dirs and not rec_files & det_dirs
    for n, files in (("det", det_files), ("rec", rec_files)):
        own = (layout.bundle_dir(PREFIX, n) + "/", f"/lib/systemd/system/{layout.unit_name(n)}")
        assert all(f.startswith(own[0]) or f == own[1] for f in files), files
    assert not any(d.startswith((f"{PREFIX}/store", f"{PREFIX}/staging")) for d in det_dirs | rec_dirs)

    root = scratch_root(tmp_path)
    res = dpkg(root, "-i", str(debs["det"]), str(debs["rec"]))
    assert res.returncode == 0, res.stderr
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert sorted(p.name for p in wants.iterdir()) == [layout.unit_name("det"), layout.unit_name("rec")]
    for n in ("det", "rec"):
        current = at(root, layout.current(PREFIX, n))
        assert (current / "manifest.json").is_file() and (current / "bin" / "tvm-deploy").is_file()
        assert f"ExecStart={layout.current(PREFIX, n)}/bin/tvm-deploy" in (
            root / "lib/systemd/system" / layout.unit_name(n)).read_text()
    # what deploys add later: the shared store, a release of det's, det's unit in /etc
    store = at(root, PREFIX) / "store" / "sha256"
    store.mkdir(parents=True)
    (store / ("0" * 64)).write_text("a shared file")
    (at(root, PREFIX) / "staging").mkdir()
    at(root, layout.release_dir(PREFIX, "det", "1" * 64)).mkdir()
    at(root, layout.UNIT_DIR).joinpath(layout.unit_name("det")).write_text("[Unit]\n")

    res = dpkg(root, "-P", "tvmbundle-det")
    assert res.returncode == 0, res.stderr
    assert not at(root, layout.bundle_dir(PREFIX, "det")).exists()
    assert not at(root, layout.UNIT_DIR).joinpath(layout.unit_name("det")).exists()
    assert sorted(p.name for p in wants.iterdir()) == [layout.unit_name("rec")]
    assert (at(root, layout.current(PREFIX, "rec")) / "bin" / "tvm-deploy").is_file()
    assert (store / ("0" * 64)).is_file()                       # rec may link it: the store stays

    res = dpkg(root, "-P", "tvmbundle-rec")
    assert res.returncode == 0, res.stderr
    assert not at(root, PREFIX).exists()                          # the last bundle takes the store along
    assert list(wants.iterdir()) == []


def test_deb_upgrades_a_package_of_the_single_service_layout(run_cli, tmp_path, monkeypatch):
    """tvmbundle-net built for the single-service layout (PREFIX/current, tvmbundle.service), upgraded:
    its files and its wants link go, the bundle's own folder and instance come."""
    old = tmp_path / "old"
    (old / "DEBIAN").mkdir(parents=True)
    (old / "lib/systemd/system").mkdir(parents=True)
    (old / "lib/systemd/system" / layout.LEGACY_UNIT).write_text("[Service]\nExecStart=/bin/true\n")
    release = old / PREFIX.lstrip("/") / "releases" / ("a" * 64)
    release.mkdir(parents=True)
    (release / "manifest.json").write_text("{}\n")
    (old / PREFIX.lstrip("/") / "current").symlink_to(f"releases/{'a' * 64}")
    (old / "DEBIAN/control").write_text("Package: tvmbundle-net\nVersion: 20000101.000000+aaaaaaaa\n"
                                        "Architecture: amd64\nMaintainer: t <t@localhost>\n"
                                        "Provides: tvmbundle-service\nConflicts: tvmbundle-service\n"
                                        "Description: the old layout\n")
    postinst = old / "DEBIAN/postinst"
    postinst.write_text('#!/bin/sh\nset -e\nmkdir -p "$DPKG_ROOT/etc/systemd/system/multi-user.target.wants"\n'
                        f'ln -sfn /lib/systemd/system/{layout.LEGACY_UNIT} '
                        f'"$DPKG_ROOT/etc/systemd/system/multi-user.target.wants/{layout.LEGACY_UNIT}"\n')
    postinst.chmod(0o755)
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(old), str(tmp_path / "old.deb")],
                   check=True, capture_output=True)
    models.conv_net(tmp_path / "net.onnx", seed=0)
    new = make_deb(run_cli, tmp_path / "net.onnx", tmp_path / "a", "1700000000", monkeypatch)

    root = scratch_root(tmp_path)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert dpkg(root, "-i", str(tmp_path / "old.deb")).returncode == 0
    assert (wants / layout.LEGACY_UNIT).is_symlink()
    res = dpkg(root, "-i", str(new))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in wants.iterdir()) == [layout.unit_name("net")]
    assert not (root / "lib/systemd/system" / layout.LEGACY_UNIT).exists()
    assert not at(root, PREFIX).joinpath("current").is_symlink() and not at(root, PREFIX).joinpath("releases").exists()
    assert (at(root, layout.current(PREFIX, "net")) / "bin" / "tvm-deploy").is_file()
