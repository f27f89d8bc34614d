"""Fleet rollouts against 20 devices with a real systemd (tests/devices.py: nspawn, sshd on 127.0.0.N),
logging in as ``pi`` with ``sudo = true`` from the inventory's [defaults].

Faults spread across the fleet: a dead host, a full disk and a changed host key in
the same wave. The threshold stops the rollout, the failed wave is rolled back,
untouched hosts keep their release, a resumed rollout finishes, and a second
rollout of the same bundle sends nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bundler import api
from bundler.device.fleet import load_inventory, parse_amount, plan_waves, rollout
from bundler.errors import RecipeError, UserError
from tests import models
from tests.devices import Devices, next_index
from tests.test_release import manifest


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="test devices need root (systemd-nspawn, sshd logins)")

N = 20


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fleet-bundles")
    models.conv_net(d / "net.onnx", seed=0)
    a = api.make("x86_64", d / "net.onnx", out_dir=d / "a", run_verify=False).bundle
    models.conv_net(d / "net.onnx", seed=5)
    b = api.make("x86_64", d / "net.onnx", out_dir=d / "b", run_verify=False).bundle
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def fleet(device_root, tmp_path_factory):
    with Devices(tmp_path_factory.mktemp("fleet"), first_index=next_index(N)) as f:
        f.add(N)
        yield f


def current_id(dev) -> str | None:
    return dev.current_id()


def inventory(fleet, path: Path, board: str = "x86_64") -> Path:
    lines = ["format = 1", "", "[defaults]", "user = \"pi\"", "sudo = true", f"board = \"{board}\"", ""]
    for i, d in enumerate(fleet.devices):
        lines += [f"[hosts.dev{i:02d}]", f"address = \"{d.host}\"", f"port = {d.port}",
                  f"groups = [\"{'lab' if i < 4 else 'field'}\"]", ""]
    path.write_text("\n".join(lines))
    return path


def go(fleet, bundle_path: Path, inv: Path, **kw):
    opts = {"identity": fleet.key, "known_hosts": fleet.known_hosts, "health_timeout": 15, "step_timeout": 20,
            "parallel": 8}
    opts.update(kw)
    return rollout(bundle_path, load_inventory(inv), **opts)


def test_waves_and_amounts():
    hosts = list(range(20))
    assert parse_amount("25%", 20, "--batch") == 5 and parse_amount("3", 20, "--batch") == 3
    assert parse_amount("10%", 20, "x") == 2 and parse_amount("1%", 20, "x") == 1
    with pytest.raises(UserError, match="--batch: 'lots' is not allowed"):
        parse_amount("lots", 20, "--batch")
    waves = plan_waves(hosts, 1, 5)   # type: ignore[arg-type]
    assert [len(w) for w in waves] == [1, 5, 5, 5, 4]


def test_inventory_errors_name_file_key_and_value(tmp_path):
    p = tmp_path / "inv.toml"
    p.write_text('format = 1\n[hosts.a]\naddress = "10.0.0.7"\nboard = "rpi4"\nprot = 22\n')
    with pytest.raises(RecipeError, match=r"inv.toml: hosts.a.prot: unknown key \(did you mean 'port'\?\)"):
        load_inventory(p)
    p.write_text('format = 1\n[hosts.a]\naddress = "10.0.0.7"\n')
    with pytest.raises(RecipeError, match="hosts.a.board: missing"):
        load_inventory(p)
    p.write_text('format = 1\n[hosts.a]\naddress = "10.0.0.7"\nboard = "rpi4"\nport = 99999\n')
    with pytest.raises(RecipeError, match="hosts.a.port: 99999 is not allowed"):
        load_inventory(p)
    p.write_text('[hosts.a]\naddress = "x"\nboard = "rpi4"\n')
    with pytest.raises(RecipeError, match="format: missing"):
        load_inventory(p)
    p.write_text('format = 1\n[defaults]\nsudo = "yes"\n[hosts.a]\naddress = "10.0.0.7"\nboard = "rpi4"\n')
    with pytest.raises(RecipeError, match="defaults.sudo: 'yes' is not allowed; expected true or false"):
        load_inventory(p)
    p.write_text('format = 1\n[hosts.a]\naddress = "10.0.0.7"\nboard = "rpi4"\nprefix = "/opt/a;touch /x"\n')
    with pytest.raises(RecipeError, match=r"hosts.a.prefix: '/opt/a;touch /x' is not allowed"):
        load_inventory(p)
    p.write_text('format = 1\n[hosts.a]\naddress = "10.0.0.7;reboot"\nboard = "rpi4"\n')
    with pytest.raises(RecipeError, match=r"hosts.a.address: '10.0.0.7;reboot' is not allowed"):
        load_inventory(p)
    p.write_text('format = 1\n[defaults]\nsudo = true\nuser = "pi"\n[hosts.a]\naddress = "10.0.0.7"\n'
                 'board = "rpi4"\n[hosts.b]\naddress = "10.0.0.8"\nboard = "rpi4"\nsudo = false\nuser = "root"\n')
    a, b = load_inventory(p)
    assert (a.sudo, a.user, b.sudo, b.user) == (True, "pi", False, "root")


@pytest.mark.slow
def test_board_mismatch_is_refused_before_anything_starts(fleet, bundles, tmp_path):
    inv = inventory(fleet, tmp_path / "inv.toml", board="rpi4")
    with pytest.raises(UserError, match="refusing to start, these hosts run another board: dev00 \\(rpi4\\)"):
        go(fleet, bundles["a"], inv)
    assert all(current_id(d) is None for d in fleet.devices)


@pytest.mark.slow
def test_dry_run_shows_waves(fleet, bundles, tmp_path, run_cli):
    inv = inventory(fleet, tmp_path / "inv.toml")
    code, out, err = run_cli("rollout", str(bundles["a"]), "--inventory", str(inv), "--dry-run", "--batch", "25%")
    assert code == 0, err
    assert "wave 0: dev00" in out and "wave 4: dev16, dev17, dev18, dev19  ->" in out
    assert all(current_id(d) is None for d in fleet.devices)


@pytest.mark.slow
def test_rollout_threshold_rollback_resume_and_idempotence(fleet, bundles, tmp_path):
    inv = inventory(fleet, tmp_path / "inv.toml")
    a_id, b_id = manifest(bundles["a"])["bundle_id"], manifest(bundles["b"])["bundle_id"]

    # 1. the whole fleet gets bundle a
    rep = go(fleet, bundles["a"], inv, canary=1, batch="25%", report_path=tmp_path / "r1.json")
    assert rep.completed, rep.to_json()
    assert all(current_id(d) == a_id for d in fleet.devices)
    first_bytes = {h.host: h.uploaded_bytes for h in rep.hosts}
    assert json.loads((tmp_path / "r1.json").read_text())["completed"] is True

    # 2. faults in wave 1 (dev01..dev05): a dead host, a full disk, a changed host key
    dead, full, rekeyed = fleet.devices[2], fleet.devices[3], fleet.devices[4]
    dead.stop()
    # a full store: every file looks missing, and storing the upload runs out of space
    full.mount_tmpfs("/opt/tvmbundle/store", "1m")
    saved_known = fleet.known_hosts.read_text()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    fake = (tmp_path / "k.pub").read_text().split()[:2]
    fleet.known_hosts.write_text("\n".join(
        f"[{rekeyed.host}]:{rekeyed.port} {fake[0]} {fake[1]}" if line.startswith(f"[{rekeyed.host}]:") else line
        for line in saved_known.splitlines()) + "\n")
    try:
        rep = go(fleet, bundles["b"], inv, canary=1, batch=5, max_failures="10%",
                 report_path=tmp_path / "r2.json")
        assert not rep.completed and "more than the 2 allowed" in rep.stopped_reason
        by = {h.host: h for h in rep.hosts}
        assert by["dev00"].result == "ok"                                  # the canary passed
        assert {by[n].result for n in ("dev02", "dev03", "dev04")} == {"failed"}
        assert by["dev02"].step == "connect" and by["dev04"].step == "connect" and "CHANGED" in by["dev04"].error
        assert by["dev03"].step in ("preflight", "upload"), by["dev03"]
        assert by["dev01"].result == "rolled-back" and by["dev05"].result == "rolled-back"
        assert all(by[f"dev{i:02d}"].result == "not-reached" for i in range(6, N))
        # the failed wave is back on a, the canary is on b, hosts not reached still run a
        assert current_id(fleet.devices[1]) == a_id and current_id(fleet.devices[5]) == a_id
        assert current_id(fleet.devices[0]) == b_id
        assert all(current_id(fleet.devices[i]) == a_id for i in range(6, N))
        assert current_id(full) == a_id
        saved = json.loads((tmp_path / "r2.json").read_text())
        assert saved["completed"] is False and len(saved["hosts"]) == N
    finally:
        full.sh("umount -l /opt/tvmbundle/store")
        fleet.known_hosts.write_text(saved_known)
        dead.start()            # a volatile device: it comes back empty, and gets b from scratch

    # 3. the faults are fixed: the resumed rollout finishes; the canary is skipped
    rep = go(fleet, bundles["b"], inv, canary=1, batch="25%")
    assert rep.completed, rep.to_json()
    by = {h.host: h for h in rep.hosts}
    assert by["dev00"].result == "skipped"
    assert all(current_id(d) == b_id for d in fleet.devices)
    # a model-only update sends the model, not the runtime again
    model_bytes = next(f["size"] for f in manifest(bundles["b"])["files"] if f["path"] == "model/model.so")
    assert all(by[f"dev{i:02d}"].uploaded_bytes <= model_bytes + 4096 for i in range(6, N))
    assert all(by[f"dev{i:02d}"].uploaded_bytes < first_bytes[f"dev{i:02d}"] / 5 for i in range(6, N))

    # 4. a second rollout of the same bundle sends nothing
    rep = go(fleet, bundles["b"], inv)
    assert rep.completed and all(h.result == "skipped" and h.uploaded_bytes == 0 for h in rep.hosts)


@pytest.mark.slow
def test_group_selects_hosts(fleet, bundles, tmp_path):
    inv = inventory(fleet, tmp_path / "inv.toml")
    rep = go(fleet, bundles["a"], inv, group="lab", dry_run=True)
    assert [h.host for h in rep.hosts] == ["dev00", "dev01", "dev02", "dev03"]
    with pytest.raises(UserError, match="no host of the inventory is in group 'lob'"):
        go(fleet, bundles["a"], inv, group="lob", dry_run=True)
