"""`make --format deb`: the package's whole life in a scratch root with the real dpkg.

dpkg runs with --root on a scratch folder and --force-script-chrootless, so the
maintainer scripts run here with DPKG_ROOT set (as they do in image builds).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests import models

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
                           "--log=/dev/null", *args], capture_output=True, text=True)


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
    prefix = root / "opt" / "tvmbundle"
    wants = root / "etc/systemd/system/multi-user.target.wants/tvmbundle.service"
    res = dpkg(root, "-i", str(old))
    assert res.returncode == 0, res.stderr
    current = prefix / "current"
    assert current.is_symlink() and current.readlink().name.startswith(old_id)
    assert (current / "bin" / "tvm-deploy").is_file()
    assert (root / "lib/systemd/system/tvmbundle.service").is_file()
    assert wants.is_symlink() and str(wants.readlink()) == "/lib/systemd/system/tvmbundle.service"
    # the installed release runs, and the unit checks out against the scratch root
    assert subprocess.run([str(current / "bin" / "tvm-deploy"), "selftest"], capture_output=True).returncode == 0
    units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    check_root = tmp_path / "check"
    shutil.copytree(root, check_root, symlinks=True)
    shutil.copytree(units, check_root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    va = subprocess.run(["systemd-analyze", "verify", f"--root={check_root}", "/lib/systemd/system/tvmbundle.service"],
                        capture_output=True, text=True)
    assert va.returncode == 0 and va.stderr == "", va.stderr

    res = dpkg(root, "-i", str(new))                      # upgrade
    assert res.returncode == 0, res.stderr
    releases = sorted(p.name[:8] for p in (prefix / "releases").iterdir())
    assert releases == [new_id] and current.readlink().name.startswith(new_id)
    assert wants.is_symlink()

    res = dpkg(root, "-r", "tvmbundle-net")               # remove
    assert res.returncode == 0, res.stderr
    assert not current.exists() and not current.is_symlink()
    assert not (root / "lib/systemd/system/tvmbundle.service").exists() and not wants.is_symlink()
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
