"""Several bundles on one device, and the upgrade from the single-service layout of tvmbundle 0.1,
against devices with a real systemd (tests/devices.py), logging in as ``pi`` with ``--sudo``.

Each bundle name has its own releases, ``current`` and ``tvmbundle@NAME.service``; the store is
shared. Deploying, updating or rolling back one bundle never restarts another (checked by the
other service's main PID), and a bundle that would take another's address is refused before
anything is sent.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from bundler import api
from bundler.client import Client
from bundler.device import release
from bundler.device.release import deploy, rollback, status
from bundler.device.ssh import Remote
from bundler.errors import DeployError
from bundler.package import bundle as bundle_mod
from bundler.package import layout
from bundler.package.service import render_unit
from tests import models
from tests.sshd import free_port

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="test devices need root (systemd-nspawn, sshd logins)"),
              pytest.mark.slow]

PREFIX = "/opt/tvmbundle"


def manifest(path: Path) -> dict:
    with tarfile.open(path) as t:
        m = next(x for x in t.getmembers() if x.name.endswith("/manifest.json"))
        return json.loads(t.extractfile(m).read())


def make(tmp: Path, name: str, seed: int, listen: str | None = None) -> Path:
    d = tmp / f"{name}-{seed}"
    d.mkdir(parents=True, exist_ok=True)
    models.conv_net(d / f"{name}.onnx", seed=seed)
    return api.make("x86_64", d / f"{name}.onnx", out_dir=d / "dist", run_verify=False, listen=listen).bundle


def main_pid(dev, unit: str) -> int:
    out = dev.sh(f"systemctl show -p MainPID --value {unit}").stdout.strip()
    return int(out or 0)


def serves(url: str, bundle: Path, wait: float = 0.0) -> bool:
    """The service at ``url`` answers as ``bundle`` (within ``wait`` s: one just restarted)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            c = Client(url, timeout=5)
            if c.healthy() and c.info()["bundle_id"] == manifest(bundle)["bundle_id"]:
                return True
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.3)


def test_two_bundles_share_a_device_each_with_its_own_service(devices, tmp_path):
    (dev,) = devices.add(1, own_listen=True)
    t = dev.target(user="pi", sudo=True)
    ports = {n: free_port(dev.host) for n in ("det", "rec")}
    url = {n: f"http://{dev.host}:{p}" for n, p in ports.items()}
    det = make(tmp_path, "det", 0, f"{dev.host}:{ports['det']}")
    rec = make(tmp_path, "rec", 1, f"{dev.host}:{ports['rec']}")

    deploy(det, t)
    det_pid = main_pid(dev, "tvmbundle@det.service")
    second = deploy(rec, t)
    # the store is shared: the second model sends its own files, not the runtime and harness again
    assert second.uploaded_bytes < second.skipped_bytes
    assert serves(url["det"], det) and serves(url["rec"], rec)
    assert main_pid(dev, "tvmbundle@det.service") == det_pid, "deploying rec restarted det"
    assert dev.current_id(name="det") == manifest(det)["bundle_id"]
    assert dev.current_id(name="rec") == manifest(rec)["bundle_id"]
    assert {st.name: (st.current, st.healthy, st.unit) for st in status(t)} == {
        "det": (manifest(det)["bundle_id"], True, "tvmbundle@det.service"),
        "rec": (manifest(rec)["bundle_id"], True, "tvmbundle@rec.service")}

    # an update of rec, then its rollback, leave det's service alone
    rec2 = make(tmp_path, "rec", 2, f"{dev.host}:{ports['rec']}")
    deploy(rec2, t)
    assert serves(url["rec"], rec2) and main_pid(dev, "tvmbundle@det.service") == det_pid
    with pytest.raises(DeployError, match=r"2 bundles \(det, rec\): say which with --name"):
        rollback(t)
    back = rollback(t, name="rec")
    assert back.bundle_id == manifest(rec)["bundle_id"] and serves(url["rec"], rec)
    assert main_pid(dev, "tvmbundle@det.service") == det_pid and serves(url["det"], det)
    # each release brought its own unit: rec's is rec's, pointing at rec's current
    unit = dev.path("/etc/systemd/system/tvmbundle@rec.service").read_text()
    assert f"ExecStart={layout.current(PREFIX, 'rec')}/bin/tvm-deploy serve --listen {dev.host}:{ports['rec']}" in unit

    # a third bundle on det's address is refused before anything is sent
    dup = make(tmp_path, "dup", 3, f"{dev.host}:{ports['det']}")
    with pytest.raises(DeployError) as e:
        deploy(dup, t)
    assert e.value.step == "preflight" and "bundle 'det' (tvmbundle@det.service) already serves" in e.value.problem
    assert "--listen" in e.value.hint
    assert not dev.exists(f"{PREFIX}/bundles/dup") and not dev.exists("/etc/systemd/system/tvmbundle@dup.service")
    assert main_pid(dev, "tvmbundle@det.service") == det_pid and serves(url["det"], det)


def _legacy_install(dev, bundle: Path, tmp: Path) -> str:
    """The device as tvmbundle 0.1 left it: PREFIX/releases/<id>, PREFIX/current and tvmbundle.service
    (its ExecStart in PREFIX/current), laid down and started by the agent's single-service commands
    (no --name), which are the commands 0.1's deploy ran; the unit is 0.1's template's."""
    top = bundle_mod.extract(bundle, tmp / "legacy")
    m = manifest(bundle)
    staged = f"/home/pi/{top.name}"
    dev.sh(f"rm -rf {staged}", check=True)
    shutil.copytree(top, dev.path(staged), symlinks=True)
    legacy_unit = render_unit(bundle_mod.load_manifest(top, str(bundle)), PREFIX).replace(
        layout.current(PREFIX, m["name"]), f"{PREFIX}/current")
    dev.path(f"/home/pi/{m['bundle_id']}.tvmbundle.service").write_text(legacy_unit)
    dev.sh("chown -R pi: /home/pi", check=True)
    exe = f"{staged}/bin/tvm-deploy"
    with Remote(dev.target(user="pi", sudo=True)) as r:
        for argv in (["prepare", "--prefix", PREFIX, "--sudo"],
                     ["install", "--prefix", PREFIX, "--release", staged, "--unit",
                      f"/home/pi/{m['bundle_id']}.tvmbundle.service", "--selftest"],
                     ["activate", "--prefix", PREFIX, "--release", m["bundle_id"], "--unit", layout.LEGACY_UNIT,
                      "--sudo", "--health-timeout", "30"]):
            doc = json.loads(r.run([exe, *argv], "legacy").out)
            assert doc["ok"], doc
    return m["bundle_id"]


def test_upgrade_from_the_single_service_layout_keeps_serving(devices, tmp_path):
    (dev,) = devices.add(1)
    t = dev.target(user="pi", sudo=True)
    a, b = make(tmp_path, "net", 0), make(tmp_path, "net", 1)
    a_id, b_id = manifest(a)["bundle_id"], manifest(b)["bundle_id"]
    assert _legacy_install(dev, a, tmp_path) == a_id
    assert dev.current_id() == a_id and serves(dev.service_url, a)
    (st,) = status(t)
    assert st.legacy and st.name == "net" and st.current == a_id and st.unit == "tvmbundle.service"

    # 1. the first deploy of the new layout fails its health gate (b's model is damaged after its
    #    install): a comes back, now as tvmbundle@net.service with a unit rendered for it, and the
    #    single-service layout is gone
    def break_b(event: str, detail: str) -> None:
        if event == "step" and detail == "activate":
            model = f"{layout.release_dir(PREFIX, 'net', b_id)}/model/model.so"
            dev.sh(f"rm -f {model} && echo broken > {model} && chown pi: {model}", check=True)

    with pytest.raises(DeployError) as e:
        release.deploy(b, t, health_timeout=5, hook=break_b)
    assert e.value.step == "health" and f"the previous release {a_id[:12]} is current again" in e.value.problem
    assert serves(dev.service_url, a)
    assert dev.current_id(name="net") == a_id and dev.sh("systemctl is-active tvmbundle@net.service").stdout.strip() == "active"
    assert not dev.exists("/etc/systemd/system/tvmbundle.service") and not dev.exists(f"{PREFIX}/current")
    assert not dev.exists(f"{PREFIX}/releases/{a_id}")
    adopted_unit = dev.path(f"{layout.release_dir(PREFIX, 'net', a_id)}/.deploy/tvmbundle@net.service").read_text()
    assert f"ExecStart={layout.current(PREFIX, 'net')}/bin/tvm-deploy" in adopted_unit
    (st,) = status(t)
    assert not st.legacy and st.current == a_id and st.healthy

    # 2. deploying b again repairs its damaged release and switches; a rollback returns to the adopted a
    done = deploy(b, t)
    assert done.previous_id == a_id and serves(dev.service_url, b)
    back = rollback(t)
    assert back.bundle_id == a_id and serves(dev.service_url, a)
    assert dev.path("/etc/systemd/system/tvmbundle@net.service").read_text() == adopted_unit


def test_a_bundle_of_another_name_leaves_the_single_service_layout_alone(devices, tmp_path):
    (dev,) = devices.add(1, own_listen=True)
    t = dev.target(user="pi", sudo=True)
    port_a, port_c = free_port(dev.host), free_port(dev.host)
    a = make(tmp_path, "net", 0, f"{dev.host}:{port_a}")
    a_id = _legacy_install(dev, a, tmp_path)
    legacy_pid = main_pid(dev, "tvmbundle.service")
    assert legacy_pid and serves(f"http://{dev.host}:{port_a}", a)
    # on the legacy service's address: refused
    clash = make(tmp_path, "cam", 1, f"{dev.host}:{port_a}")
    with pytest.raises(DeployError, match=r"bundle 'net' \(tvmbundle.service\) already serves"):
        deploy(clash, t)
    cam = make(tmp_path, "cam", 2, f"{dev.host}:{port_c}")
    deploy(cam, t)
    assert serves(f"http://{dev.host}:{port_c}", cam) and serves(f"http://{dev.host}:{port_a}", a)
    assert main_pid(dev, "tvmbundle.service") == legacy_pid and dev.current_id(name="cam") == manifest(cam)["bundle_id"]
    assert os.readlink(dev.path(f"{PREFIX}/current")) == f"releases/{a_id}"
    assert {(st.name, st.legacy) for st in status(t)} == {("cam", False), ("net", True)}


def test_without_adoption_a_failed_first_release_gives_the_device_back_to_the_old_service(devices, tmp_path):
    """What an Ansible role or a Mender module does on a device of the single-service layout: their
    agent calls carry no --adopt (units are rendered on the host). The new release fails its health
    gate, their rollback is `activate --release none`, and the old service serves again."""
    (dev,) = devices.add(1)
    a, b = make(tmp_path, "net", 0), make(tmp_path, "net", 1)
    a_id, b_id = _legacy_install(dev, a, tmp_path), manifest(b)["bundle_id"]
    top = bundle_mod.extract(b, tmp_path / "b")
    staged = f"/home/pi/{top.name}"
    shutil.copytree(top, dev.path(staged), symlinks=True)
    (model := dev.path(f"{staged}/model/model.so")).unlink()
    model.write_text("broken\n")                      # does not match the manifest
    dev.path(f"/home/pi/{b_id}.tvmbundle@net.service").write_text(
        render_unit(bundle_mod.load_manifest(top, str(b)), PREFIX))
    dev.sh("chown -R pi: /home/pi", check=True)
    exe = f"{staged}/bin/tvm-deploy"
    with Remote(dev.target(user="pi", sudo=True)) as r:
        # a damaged file is refused by install before it is stored: the old service serves on
        res = r.run([exe, "install", "--prefix", PREFIX, "--name", "net", "--release", staged, "--unit",
                     f"/home/pi/{b_id}.tvmbundle@net.service", "--selftest"], "t", check=False)
        assert res.code == 1 and "model/model.so arrived damaged" in json.loads(res.out)["error"], res.out
        assert serves(dev.service_url, a) and main_pid(dev, "tvmbundle.service")
        # a release that installs but does not come up healthy (its service cannot start)
        shutil.copyfile(top / "model/model.so", dev.path(f"{staged}/model/model.so"))
        doc = json.loads(r.run([exe, "install", "--prefix", PREFIX, "--name", "net", "--release", staged, "--unit",
                                f"/home/pi/{b_id}.tvmbundle@net.service", "--selftest"], "t").out)
        assert doc["ok"], doc
        dev.sh(f"rm -f {layout.release_dir(PREFIX, 'net', b_id)}/model/model.so && "
               f"echo broken > {layout.release_dir(PREFIX, 'net', b_id)}/model/model.so", check=True)
        res = r.run([exe, "activate", "--prefix", PREFIX, "--name", "net", "--release", b_id, "--sudo",
                     "--health-timeout", "5"], "t", check=False)
        assert res.code == 1 and json.loads(res.out)["step"] == "health", res.out
        doc = json.loads(r.run([exe, "activate", "--prefix", PREFIX, "--name", "net", "--release", "none", "--sudo"],
                               "t").out)
    assert doc["legacy_restored"] is True
    assert serves(dev.service_url, a, wait=15) and dev.current_id(name="net") is None
    assert os.readlink(dev.path(f"{PREFIX}/current")) == f"releases/{a_id}"
    assert dev.sh("systemctl is-enabled tvmbundle.service").stdout.strip() == "enabled"
