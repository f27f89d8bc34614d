"""The systemd unit: real `systemd-analyze verify` and `security` on the rendered unit.

No systemd runs as PID 1 here, so the unit is checked offline against a root
folder holding it, its ExecStart program and the host's own systemd unit files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bundler.config import recipe
from bundler.errors import UserError
from bundler.package import layout
from bundler.package.service import is_loopback, render_unit
from tests.bundletools import manifest_data

UNIT = layout.unit_name("net")      # the bundle's instance: manifest_for() names it net

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="needs systemd-analyze (apt-get install systemd)")

SYSTEM_UNITS = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None)


def manifest_for(board: str, **service) -> dict:
    r = recipe.load(board)
    svc = {"listen": r.service.listen, "threads": r.service.threads, "user": r.service.user,
           "environment": dict(r.service.environment)}
    svc.update(service)
    return manifest_data("net", install={"prefix": r.install_prefix}, service=svc)


def unit_root(tmp_path: Path, text: str, prefix: str = "/opt/tvmbundle") -> Path:
    root = tmp_path / "root"
    exe = root / layout.current(prefix, "net").strip("/") / "bin" / "tvm-deploy"
    exe.parent.mkdir(parents=True)
    shutil.copy("/bin/true", exe)
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    (units / UNIT).write_text(text)
    if SYSTEM_UNITS:
        shutil.copytree(SYSTEM_UNITS, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120)


def exposure(root: Path) -> float:
    res = analyze("security", "--offline=yes", f"--root={root}", UNIT)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout)
    assert m, res.stdout + res.stderr
    return float(m.group(1))


@pytest.mark.parametrize("board", ["rpi4", "x86_64"])
def test_unit_verifies_cleanly(board, tmp_path):
    root = unit_root(tmp_path, render_unit(manifest_for(board)))
    res = analyze("verify", f"--root={root}", f"/etc/systemd/system/{UNIT}")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""          # verify only warns about unknown keys: warnings fail too


def test_unit_exposure_is_at_most_2(tmp_path):
    root = unit_root(tmp_path, render_unit(manifest_for("rpi4")))
    assert exposure(root) <= 2.0


def test_unit_listening_beyond_loopback_is_still_hardened(tmp_path):
    text = render_unit(manifest_for("rpi4", listen="0.0.0.0:8470"))
    assert "IPAddressDeny" not in text
    root = unit_root(tmp_path, text)
    res = analyze("verify", f"--root={root}", f"/etc/systemd/system/{UNIT}")
    assert res.returncode == 0 and res.stderr == ""
    assert exposure(root) <= 2.5


def test_recipe_settings_reach_the_unit(tmp_path):
    text = render_unit(manifest_for("rpi4", listen="127.0.0.1:9000", threads=2, user="vision",
                                    environment={"TVM_BIND_THREADS": "1", "MSG": 'say "100%"'}),
                       prefix="/srv/models")
    assert "ExecStart=/srv/models/bundles/net/current/bin/tvm-deploy serve --listen 127.0.0.1:9000 --threads 2" in text
    assert "User=vision" in text and "DynamicUser=yes" in text
    assert 'Environment="TVM_BIND_THREADS=1"' in text
    assert 'Environment="MSG=say \\"100%%\\""' in text
    assert "ReadOnlyPaths=/srv/models" in text
    for key in ("ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes", "CapabilityBoundingSet=\n",
                "SystemCallFilter=@system-service", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                "Restart=on-failure", "WantedBy=multi-user.target"):
        assert key in text
    root = unit_root(tmp_path, text, prefix="/srv/models")
    res = analyze("verify", f"--root={root}", f"/etc/systemd/system/{UNIT}")
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_bad_environment_name_is_refused():
    with pytest.raises(UserError, match="service.environment: 'BAD-NAME' is not allowed"):
        render_unit(manifest_for("rpi4", environment={"BAD-NAME": "x"}))


@pytest.mark.parametrize("service, problem", [
    ({"environment": {"MODE": "fast\nExecStartPre=/bin/touch /tmp/pwned"}}, "control characters"),
    ({"user": "tvm\nExecStartPre=/bin/sh"}, "expected a user name"),
    ({"listen": "127.0.0.1:8470 --threads 99"}, "expected HOST:PORT"),
])
def test_values_that_would_add_unit_lines_are_refused(service, problem):
    with pytest.raises(UserError, match=problem):
        render_unit(manifest_for("rpi4", **service))


def test_a_prefix_with_a_space_is_refused():
    with pytest.raises(UserError, match="--prefix: '/opt/tvm bundle' is not allowed"):
        render_unit(manifest_for("rpi4"), prefix="/opt/tvm bundle")


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.7")
