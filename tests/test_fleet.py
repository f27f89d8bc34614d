"""Fleet rollouts against 20 real sshd devices on 127.0.0.N (see tests/sshd.py for the test double).

Faults spread across the fleet: a dead host, a full disk and a changed host key in
the same wave. The threshold stops the rollout, the failed wave is rolled back,
untouched hosts keep their release, a resumed rollout finishes, and a second
rollout of the same bundle sends nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bundler import api
from bundler.device.fleet import load_inventory, parse_amount, plan_waves, rollout
from bundler.errors import RecipeError, UserError
from tests import models
from tests.sshd import Fleet
from tests.test_release import current_id, manifest

pytestmark = [
    pytest.mark.skipif(not (shutil.which("sshd") and shutil.which("unshare")),
                       reason="needs openssh-server and unshare (scripts/setup installs them)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="test devices need root: sshd logins, PID namespaces, tmpfs mounts"),
]

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
def fleet(tmp_path_factory):
    with Fleet(tmp_path_factory.mktemp("fleet")) as f:
        f.add(N)
        yield f


def inventory(fleet, path: Path, board: str = "x86_64") -> Path:
    lines = ["format = 1", "", "[defaults]", "user = \"root\"", f"board = \"{board}\"", ""]
    for d in fleet.devices:
        lines += [f"[hosts.dev{d.index:02d}]", f"address = \"{d.host}\"", f"port = {d.port}",
                  f"prefix = \"{d.prefix}\"", f"groups = [\"{'lab' if d.index < 4 else 'field'}\"]", ""]
    path.write_text("\n".join(lines))
    return path


def go(fleet, bundle_path: Path, inv: Path, **kw):
    opts = dict(identity=fleet.key, known_hosts=fleet.known_hosts, unit_dir=None, health_timeout=15,
                step_timeout=20, parallel=8)
    opts.update(kw)
    hosts = load_inventory(inv)
    # each test device keeps its units in its own folder
    import bundler.device.fleet as fleet_mod

    orig = fleet_mod.Target

    def target(**tk):
        dev = next(d for d in fleet.devices if d.host == tk["host"])
        return orig(unit_dir=str(dev.unit_dir), **{k: v for k, v in tk.items() if k != "unit_dir"})

    fleet_mod.Target = target
    try:
        return rollout(bundle_path, hosts, **opts)
    finally:
        fleet_mod.Target = orig


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


def test_board_mismatch_is_refused_before_anything_starts(fleet, bundles, tmp_path):
    inv = inventory(fleet, tmp_path / "inv.toml", board="rpi4")
    with pytest.raises(UserError, match="refusing to start, these hosts run another board: dev00 \\(rpi4\\)"):
        go(fleet, bundles["a"], inv)
    assert all(current_id(d) is None for d in fleet.devices)


def test_dry_run_shows_waves(fleet, bundles, tmp_path, run_cli):
    inv = inventory(fleet, tmp_path / "inv.toml")
    code, out, err = run_cli("rollout", str(bundles["a"]), "--inventory", str(inv), "--dry-run", "--batch", "25%")
    assert code == 0, err
    assert "wave 0: dev00" in out and "wave 4: dev16, dev17, dev18, dev19  ->" in out
    assert all(current_id(d) is None for d in fleet.devices)


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
    dead.kill()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full.prefix / "store")], check=True)
    saved_known = fleet.known_hosts.read_text()
    kind, b64 = rekeyed.host_pubkey()
    other = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    del other
    fake = (tmp_path / "k.pub").read_text().split()[1]
    fleet.known_hosts.write_text(saved_known.replace(b64, fake))
    try:
        rep = go(fleet, bundles["b"], inv, canary=1, batch=5, max_failures="10%",
                 report_path=tmp_path / "r2.json")
        assert not rep.completed and "more than the 2 allowed" in rep.stopped_reason
        by = {h.host: h for h in rep.hosts}
        assert by["dev00"].result == "ok"                                  # the canary passed
        assert {by[n].result for n in ("dev02", "dev03", "dev04")} == {"failed"}
        assert by["dev02"].step == "connect" and by["dev04"].step == "connect" and "CHANGED" in by["dev04"].error
        assert by["dev03"].step in ("preflight", "upload")
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
        subprocess.run(["umount", "-l", str(full.prefix / "store")])
        fleet.known_hosts.write_text(saved_known)
        dead.start()

    # 3. the faults are fixed: the resumed rollout finishes; the canary is skipped
    assert dead.systemctl("restart", "tvmbundle.service") == 0
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


def test_group_selects_hosts(fleet, bundles, tmp_path):
    inv = inventory(fleet, tmp_path / "inv.toml")
    rep = go(fleet, bundles["a"], inv, group="lab", dry_run=True)
    assert [h.host for h in rep.hosts] == ["dev00", "dev01", "dev02", "dev03"]
    with pytest.raises(UserError, match="no host of the inventory is in group 'lob'"):
        go(fleet, bundles["a"], inv, group="lob", dry_run=True)
