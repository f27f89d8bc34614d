"""Deploy, status and rollback against real sshd devices on loopback (see tests/sshd.py).

The service is the real `tvm-deploy serve` of the x86_64 bundles (native here);
`systemctl` on the devices is a test double because no systemd runs as PID 1 here.
Every fault test ends with the previous release current and serving.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from bundler import api
from bundler.client import Client
from bundler.device.release import deploy, rollback, status
from bundler.errors import DeployError
from tests import models
from tests.bundletools import perturb_expected, repack
from tests.sshd import Fleet

pytestmark = [
    pytest.mark.skipif(not (shutil.which("sshd") and shutil.which("unshare")),
                       reason="needs openssh-server and unshare (scripts/setup installs them)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="test devices need root: sshd logins, PID namespaces, tmpfs mounts"),
]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bundles")
    models.conv_net(d / "net.onnx", seed=0)
    a = api.make("x86_64", d / "net.onnx", out_dir=d / "a", run_verify=False).bundle
    models.conv_net(d / "net.onnx", seed=1)          # same graph, new weights: a model-only update
    b = api.make("x86_64", d / "net.onnx", out_dir=d / "b", run_verify=False).bundle
    return {"a": a, "b": b}


@pytest.fixture
def fleet(tmp_path):
    with Fleet(tmp_path) as f:
        yield f


def manifest(path: Path) -> dict:
    with __import__("tarfile").open(path) as t:
        m = next(x for x in t.getmembers() if x.name.endswith("/manifest.json"))
        return json.loads(t.extractfile(m).read())


def current_id(dev) -> str | None:
    link = dev.prefix / "current"
    return link.readlink().name if link.is_symlink() else None


def serving(dev, bundle_path: Path) -> bool:
    """The device's service answers, and it is the given bundle that answers."""
    c = Client(dev.service_url, timeout=5)
    return c.healthy() and c.info()["bundle_id"] == manifest(bundle_path)["bundle_id"]


def restarted_and_serving(dev, bundle_path: Path, wait: float = 30.0) -> bool:
    """Restart the device's service (as its init would after a reboot) and wait until it serves."""
    assert dev.systemctl("restart", "tvmbundle.service") == 0
    deadline = time.monotonic() + wait
    while not serving(dev, bundle_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    return serving(dev, bundle_path)


def test_deploy_status_update_and_rollback(fleet, bundles):
    (dev,) = fleet.add(1)
    t = dev.target()
    first = deploy(bundles["a"], t)
    assert first.previous_id is None and first.uploaded_bytes > 0
    assert [s for s, _ in first.steps] == ["connect", "preflight", "upload", "assemble", "check", "switch",
                                           "restart", "health", "prune"]
    assert serving(dev, bundles["a"])
    st = status(t)
    assert st.current == manifest(bundles["a"])["bundle_id"] and st.healthy and st.service == "active"
    # inference over the network from here, on the device's address
    m = manifest(bundles["a"])
    out = Client(dev.service_url).infer([np.zeros(m["model"]["inputs"][0]["shape"], np.float32)])
    assert out[0].shape == (1, 10)

    second = deploy(bundles["b"], t)
    model_size = next(f["size"] for f in manifest(bundles["b"])["files"] if f["path"] == "model/model.so")
    expected_new = sum(f["size"] for f in manifest(bundles["b"])["files"]
                       if f["sha256"] not in {g["sha256"] for g in manifest(bundles["a"])["files"]})
    assert second.uploaded_bytes == expected_new and model_size <= expected_new
    assert second.uploaded_bytes < second.skipped_bytes      # the runtime and harness were not sent again
    assert second.previous_id == first.bundle_id and serving(dev, bundles["b"])

    back = rollback(t)
    assert back.bundle_id == first.bundle_id and serving(dev, bundles["a"])
    assert current_id(dev) == first.bundle_id

    again = deploy(bundles["a"], t)      # re-deploying the current release sends nothing
    assert again.uploaded_bytes == 0


def test_sshd_killed_mid_upload_then_redeploy_finishes(fleet, bundles):
    (dev,) = fleet.add(1)
    deploy(bundles["a"], dev.target())

    def kill_after_first_file(event: str, detail: str) -> None:
        if event == "uploaded":
            dev.kill()

    start = time.monotonic()
    with pytest.raises(DeployError) as e:
        deploy(bundles["b"], dev.target(), hook=kill_after_first_file, step_timeout=20)
    assert e.value.step == "upload"
    assert time.monotonic() - start < 60
    # the device comes back: its previous release is still current, and it serves once restarted
    dev.start()
    assert current_id(dev) == manifest(bundles["a"])["bundle_id"]
    assert restarted_and_serving(dev, bundles["a"])
    done = deploy(bundles["b"], dev.target())
    assert serving(dev, bundles["b"]) and done.uploaded_bytes < sum(f["size"] for f in manifest(bundles["b"])["files"])


def test_full_disk_fails_cleanly_and_keeps_serving(fleet, bundles, tmp_path):
    (dev,) = fleet.add(1)
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        t = dev.target(prefix=str(small / "tvmbundle"))
        with pytest.raises(DeployError) as e:
            deploy(bundles["a"], t)
        assert e.value.step in ("preflight", "upload")
        assert "space" in e.value.problem or "full" in e.value.problem
        assert not list(small.rglob("*.part"))
    finally:
        subprocess.run(["umount", "-l", str(small)])
    # A device whose disk fills mid-upload: fill it from outside after preflight passed.
    t = dev.target()
    deploy(bundles["a"], t)
    sub = dev.prefix / "staging"
    mnt_ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(dev.prefix / "store")]).returncode
    assert mnt_ok == 0
    try:
        with pytest.raises(DeployError):
            deploy(bundles["b"], t)
    finally:
        subprocess.run(["umount", "-l", str(dev.prefix / "store")])
    assert not list(sub.glob("*.part"))
    assert serving(dev, bundles["a"])


def test_failing_selftest_on_the_device_switches_nothing(fleet, bundles, tmp_path):
    (dev,) = fleet.add(1)
    deploy(bundles["a"], dev.target())

    bad = repack(bundles["b"], tmp_path, perturb_expected)
    with pytest.raises(DeployError) as e:
        deploy(bad, dev.target())
    assert e.value.step == "selftest" and "nothing was switched" in e.value.problem
    assert serving(dev, bundles["a"])


def test_service_that_never_gets_healthy_is_rolled_back(fleet, bundles):
    (dev,) = fleet.add(1)
    deploy(bundles["a"], dev.target())

    # Occupy the service's address so the new release's service cannot listen: it never becomes healthy.
    import socket

    t = dev.target()
    # stop the running service, hold its address, then deploy
    assert dev.systemctl("stop", "tvmbundle.service") == 0
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind((dev.host, dev.service_port))
    blocker.listen(1)
    try:
        with pytest.raises(DeployError) as e:
            deploy(bundles["b"], t, health_timeout=3)
        assert e.value.step == "health"
        assert "previous release" in e.value.problem
    finally:
        blocker.close()
    assert current_id(dev) == manifest(bundles["a"])["bundle_id"]
    # with its address free again the previous release serves
    assert restarted_and_serving(dev, bundles["a"])


def test_unknown_and_changed_host_keys_are_refused_before_anything_is_sent(fleet, bundles):
    (dev,) = fleet.add(1)
    dev.known_hosts.write_text("")
    with pytest.raises(DeployError) as e:
        deploy(bundles["a"], dev.target())
    assert e.value.step == "connect" and "unknown host key" in e.value.problem
    assert not list(dev.prefix.iterdir())
    # a changed key: the device was "reinstalled" with a new host key
    dev.trust()
    old_known = dev.known_hosts.read_text()
    dev.kill()
    (dev.root / "ssh_host_ed25519_key").unlink()
    (dev.root / "ssh_host_ed25519_key.pub").unlink()
    dev.setup()
    dev.start()
    dev.known_hosts.write_text(old_known)
    with pytest.raises(DeployError) as e:
        deploy(bundles["a"], dev.target(accept_new_host_key=True))
    assert e.value.step == "connect" and "CHANGED" in e.value.problem
    assert not list(dev.prefix.iterdir())
    # accepting a new key is an explicit option, and then it is recorded
    dev.known_hosts.write_text("")
    deploy(bundles["a"], dev.target(accept_new_host_key=True))
    assert dev.host in dev.known_hosts.read_text()


def test_wrong_credentials_are_refused(fleet, bundles, tmp_path):
    (dev,) = fleet.add(1)
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with pytest.raises(DeployError) as e:
        deploy(bundles["a"], dev.target(identity=other))
    assert e.value.step == "connect" and "authentication failed" in e.value.problem
    assert not list(dev.prefix.iterdir())


def test_wrong_architecture_device_is_refused_at_preflight(fleet, tmp_path):
    (dev,) = fleet.add(1)
    models.conv_net(tmp_path / "n.onnx")
    rpi = api.make("rpi4", tmp_path / "n.onnx", out_dir=tmp_path, run_verify=False).bundle
    with pytest.raises(DeployError) as e:
        deploy(rpi, dev.target())
    assert e.value.step == "preflight" and "the device is x86_64, the bundle is for aarch64" in e.value.problem
    assert not list(dev.prefix.iterdir())


def test_cli_deploy_status_rollback(fleet, bundles, run_cli, monkeypatch):
    (dev,) = fleet.add(1)
    conn = ["--host", f"root@{dev.host}:{dev.port}", "--identity", str(dev.key), "--known-hosts",
            str(dev.known_hosts), "--prefix", str(dev.prefix)]
    # The CLI installs units into /etc/systemd/system; the test device keeps them in its own folder.
    import bundler.device.ssh as ssh_mod

    orig = ssh_mod.Target.parse

    def parse(spec, **kw):
        return orig(spec, **kw).with_(unit_dir=str(dev.unit_dir))

    monkeypatch.setattr(ssh_mod.Target, "parse", staticmethod(parse))
    if True:
        code, out, err = run_cli("deploy", str(bundles["a"]), *conn, "--json", "-q")
        assert code == 0, err
        assert json.loads(out)["bundle_id"] == manifest(bundles["a"])["bundle_id"]
        code, out, err = run_cli("deploy", str(bundles["b"]), *conn, "-q")
        assert code == 0 and "is current and healthy" in out, err
        code, out, err = run_cli("status", *conn)
        assert code == 0 and "healthy" in out and manifest(bundles["b"])["bundle_id"][:12] in out
        code, out, err = run_cli("rollback", *conn, "-q")
        assert code == 0 and "is current again" in out
        assert serving(dev, bundles["a"])
        code, out, err = run_cli("deploy", str(bundles["a"]), "--host", "root@bad host", "-q")
        assert code == 2 and "--host: 'root@bad host' is not allowed" in err
        code, out, err = run_cli("status", "--host", f"root@{dev.host}:{dev.port}", "--identity", str(dev.key),
                                 "--known-hosts", str(dev.key) + ".nothing")
        assert code == 2 and "connect: unknown host key" in err
