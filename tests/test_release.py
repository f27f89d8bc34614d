"""Deploy, status and rollback against devices with a real systemd (tests/devices.py: Debian 12 booted
by systemd-nspawn, sshd on loopback), logging in as ``pi`` with ``--sudo`` or as ``nosudo``.

The service is the real `tvm-deploy serve` of the x86_64 bundles, run by the device's systemd from the
hardened unit (``DynamicUser``); the device side of each step is `tvm-deploy survey/prepare/install/
activate` of the bundle's own harness. Every fault test ends with the previous release current and serving.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from bundler import api
from bundler.client import Client
from bundler.config import schema
from bundler.device import release
from bundler.device.release import deploy, rollback, status
from bundler.device.ssh import Remote, Target
from bundler.errors import DeployError, UserError
from bundler.package import bundle as bundle_mod
from bundler.package.manifest import Manifest
from tests import bundletools, models
from tests.bundletools import perturb_expected, repack

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="test devices need root (systemd-nspawn, sshd logins)"),
              pytest.mark.slow]     # every test boots devices and deploys to them


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    a, b = bundletools.model_update(tmp_path_factory)
    return {"a": a, "b": b}


def manifest(path: Path) -> dict:
    with __import__("tarfile").open(path) as t:
        m = next(x for x in t.getmembers() if x.name.endswith("/manifest.json"))
        return json.loads(t.extractfile(m).read())


def current_id(dev, prefix: str | None = None) -> str | None:
    return dev.current_id(prefix)


def serving(dev, bundle_path: Path, wait: float = 0.0) -> bool:
    """The device's service answers, and it is the given bundle that answers."""
    deadline = time.monotonic() + wait
    while True:
        try:
            c = Client(dev.service_url, timeout=5)
            if c.healthy() and c.info()["bundle_id"] == manifest(bundle_path)["bundle_id"]:
                return True
        except (OSError, ValueError, KeyError):
            pass                       # not up yet, or not the service
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.3)


def pi(dev, **kw) -> Target:
    return dev.target(user="pi", sudo=True, **kw)


def nothing_installed(dev, user: str = "pi", prefix: str = "/opt/tvmbundle") -> bool:
    return (not dev.exists(prefix) and not dev.exists("/etc/systemd/system/tvmbundle@net.service")
            and not dev.exists(f"{dev.home(user)}/.cache/tvmbundle"))


def test_first_install_update_rollback_as_pi_with_sudo(devices, bundles):
    (dev,) = devices.add(1)
    t = pi(dev)
    first = deploy(bundles["a"], t)
    assert first.previous_id is None and first.uploaded_bytes > 0
    assert [s for s, _ in first.steps] == ["connect", "preflight", "upload", "install", "activate"]
    # One survey before anything is sent, one round trip for the whole install, one for the switch.
    assert first.round_trips["sh"] <= 5, first.round_trips
    assert serving(dev, bundles["a"])
    # the real systemd runs the hardened unit, as a dynamic user; the release is the login user's
    props = dev.sh("systemctl show -p ActiveState -p DynamicUser -p MainPID tvmbundle@net.service").stdout
    assert "ActiveState=active" in props and "DynamicUser=yes" in props
    pid = next(line.split("=")[1] for line in props.splitlines() if line.startswith("MainPID="))
    uid = int(dev.sh(f"stat -c %u /proc/{pid}").stdout)
    assert uid not in (0, int(dev.sh("id -u pi").stdout))
    assert dev.sh("stat -c %U /opt/tvmbundle/bundles/net/releases").stdout.strip() == "pi"
    assert dev.sh("stat -c %U /etc/systemd/system/tvmbundle@net.service").stdout.strip() == "root"
    # the hardened unit as the device's own systemd rates it
    sec = dev.sh("systemd-analyze security --no-pager tvmbundle@net.service").stdout
    assert float(sec.rsplit("Overall exposure level for tvmbundle@net.service:", 1)[1].split()[0]) <= 2.5, sec[-500:]

    (st,) = status(t)
    assert st.current == manifest(bundles["a"])["bundle_id"] and st.healthy and st.service == "active"
    assert (st.name, st.unit, st.legacy) == ("net", "tvmbundle@net.service", False)
    m = manifest(bundles["a"])
    out = Client(dev.service_url).infer([np.zeros(m["model"]["inputs"][0]["shape"], np.float32)])
    assert out[0].shape == (1, 10)

    # the agent (the bundle's harness and libraries in pi's cache) shares its files with the store
    agent = dev.sh("ls -d /home/pi/.cache/tvmbundle/agent/*/").stdout.split()
    assert len(agent) == 1
    harness_sha = next(f["sha256"] for f in m["files"] if f["path"] == "bin/tvm-deploy")
    assert (dev.path(agent[0] + "bin/tvm-deploy").stat().st_ino
            == dev.path(f"/opt/tvmbundle/store/sha256/{harness_sha}").stat().st_ino)
    # an agent of an earlier harness is pruned by the next deploy
    dev.sh("mkdir -p /home/pi/.cache/tvmbundle/agent/0123456789abcdef/bin && chown -R pi: /home/pi/.cache", check=True)

    second = deploy(bundles["b"], t)
    assert not dev.exists("/home/pi/.cache/tvmbundle/agent/0123456789abcdef")
    expected_new = sum(f["size"] for f in manifest(bundles["b"])["files"]
                       if f["sha256"] not in {g["sha256"] for g in manifest(bundles["a"])["files"]})
    model_size = next(f["size"] for f in manifest(bundles["b"])["files"] if f["path"] == "model/model.so")
    assert second.uploaded_bytes == expected_new and model_size <= expected_new
    assert second.uploaded_bytes < second.skipped_bytes      # the runtime and harness were not sent again
    assert second.round_trips["sh"] <= 3, second.round_trips
    assert second.previous_id == first.bundle_id and serving(dev, bundles["b"])

    back = rollback(t)
    assert back.bundle_id == first.bundle_id and serving(dev, bundles["a"], wait=10)
    assert current_id(dev) == first.bundle_id

    again = deploy(bundles["a"], t)      # re-deploying the current release sends nothing
    assert again.uploaded_bytes == 0 and serving(dev, bundles["a"])


def test_nosudo_login_is_refused_before_anything_is_sent(devices, bundles):
    (dev,) = devices.add(1)
    # /opt is root's: the prefix cannot be created, and there is no sudo to create it
    with pytest.raises(DeployError) as e:
        deploy(bundles["a"], dev.target(user="nosudo"))
    assert e.value.step == "preflight" and "not writable by nosudo" in e.value.problem
    assert "nothing was sent" in e.value.problem and "--sudo" in (e.value.hint or "")
    assert nothing_installed(dev, "nosudo")
    # asking for sudo does not help a user sudo wants a password from: the error says so
    with pytest.raises(DeployError) as e:
        deploy(bundles["a"], dev.target(user="nosudo", sudo=True))
    assert e.value.step == "preflight" and "sudo needs a password for nosudo" in e.value.problem
    assert nothing_installed(dev, "nosudo")
    # a prefix it owns is not enough: the unit and systemctl need root
    with pytest.raises(DeployError) as e:
        deploy(bundles["a"], dev.target(user="nosudo", prefix="/home/nosudo/models"))
    assert e.value.step == "preflight" and "systemctl" in e.value.problem and "nothing was sent" in e.value.problem
    assert nothing_installed(dev, "nosudo", prefix="/home/nosudo/models")


def test_health_gate_failure_rolls_back_and_the_previous_release_serves(devices, bundles):
    (dev,) = devices.add(1)
    t = pi(dev)
    deploy(bundles["a"], t)
    # Hold the service's address so the new release's service cannot listen: it never becomes healthy.
    import socket

    assert dev.systemctl("stop", "tvmbundle@net.service") == 0
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
    # systemd restarts the failed service (Restart=on-failure): with its address free, a serves again
    assert serving(dev, bundles["a"], wait=30)


def test_failing_selftest_on_the_device_switches_nothing(devices, bundles, tmp_path):
    (dev,) = devices.add(1)
    deploy(bundles["a"], pi(dev))
    bad = repack(bundles["b"], tmp_path, perturb_expected)
    with pytest.raises(DeployError) as e:
        deploy(bad, pi(dev))
    assert e.value.step == "selftest" and "nothing was switched" in e.value.problem
    assert serving(dev, bundles["a"])


def test_full_disk_fails_cleanly_and_keeps_serving(devices, bundles):
    (dev,) = devices.add(1)
    dev.mount_tmpfs("/srv/small", "5m")
    with pytest.raises(DeployError) as e:
        deploy(bundles["a"], pi(dev, prefix="/srv/small/tvmbundle"))
    assert e.value.step == "preflight" and "space" in e.value.problem
    assert not dev.exists("/srv/small/tvmbundle")
    # A disk that fills after preflight passed (something else writes to it): the upload fails,
    # leaves no partial file behind, and the running release is untouched.
    dev.mount_tmpfs("/srv/fs", "12m")
    prefix = "/srv/fs/tvmbundle"
    dev.serve_from(prefix)
    t = pi(dev, prefix=prefix)
    deploy(bundles["a"], t)

    def fill_at_upload(event: str, detail: str) -> None:
        if event == "step" and detail == "upload":
            dev.sh("dd if=/dev/zero of=/srv/fs/filler bs=64k 2>/dev/null; true")

    with pytest.raises(DeployError) as e:
        deploy(bundles["b"], t, hook=fill_at_upload)
    assert e.value.step == "upload" and "full disk" in e.value.problem
    assert not dev.sh(f"ls {prefix}/staging").stdout.split()
    dev.sh("rm -f /srv/fs/filler")
    assert current_id(dev, prefix) == manifest(bundles["a"])["bundle_id"] and serving(dev, bundles["a"])


def crafted(src: Path, tmp: Path, change) -> tuple[Path, Path, dict]:
    """A bundle whose manifest ``change(manifest)`` altered after it was built: (tarball, its top folder, manifest)."""
    work = tmp / f"crafted{len(list(tmp.glob('crafted*')))}"
    top = bundle_mod.extract(src, work / "x")
    m = json.loads((top / "manifest.json").read_text())
    change(m)
    (top / "manifest.json").write_text(json.dumps(m))
    out = work / src.name
    bundle_mod.write_tarball(top, top.name, out, bundle_mod.DEFAULT_EPOCH)
    return out, top, m


def deploy_unchecked(top: Path, m: dict, t: Target, monkeypatch, unit_from: dict, health_timeout: float = 30.0):
    """The deploy with the host's own checks of the manifest and the prefix switched off: what reaches
    the device then, and what the device does with it alone. The manifest is loaded without its
    checks (what a reader that skipped them would hold); the unit is rendered from ``unit_from`` for
    the default prefix and the prefix put in after, since rendering validates both."""
    render = release.render_unit
    typed = schema.load(Manifest, m, "crafted", checks=False)
    with monkeypatch.context() as mp:
        mp.setattr(release, "check_manifest", lambda manifest, host: None)
        mp.setattr(release, "check_prefix", lambda prefix: prefix.rstrip("/"))
        mp.setattr(release, "render_unit", lambda manifest, prefix: render(unit_from, "/opt/tvmbundle").replace(
            "/opt/tvmbundle", prefix).replace(f"({unit_from['name']})", f"({manifest.name})"))
        return release._deploy(top, typed, t, 3, health_timeout, 60.0, release.Progress(quiet=True), None)


def test_crafted_manifest_paths_are_refused_on_host_and_device(devices, bundles, tmp_path, monkeypatch):
    (dev,) = devices.add(1)
    t = pi(dev)
    deploy(bundles["a"], t)
    a_id = manifest(bundles["a"])["bundle_id"]
    model = next(f for f in manifest(bundles["a"])["files"] if f["path"] == "model/model.so")

    for path, name, why in (("../../../../tmp/x", "c", "leaves the release folder"),
                            ("/tmp/x", "d", "is absolute"), ("model/../../../../tmp/x", "e", "leaves the release")):
        def change(m: dict, path: str = path, name: str = name) -> None:
            # a file the device's store already has, so it is not even sent: only its path is wrong
            m["files"].append({**model, "path": path})
            m["bundle_id"] = name * 64
        bad, top, m = crafted(bundles["a"], tmp_path, change)
        # 1. the host refuses it before it connects (reading the manifest, then deploy's own check)
        with pytest.raises(UserError) as e:
            deploy(bad, t)
        assert repr(path) in str(e.value) and "not allowed" in str(e.value)
        # 2. without the host's checks, `tvm-deploy install` on the device refuses it, naming the path
        with pytest.raises(DeployError) as e:
            deploy_unchecked(top, m, t, monkeypatch, manifest(bundles["a"]))
        assert e.value.step == "install" and f"'{path}'" in e.value.problem and why in e.value.problem
        assert not dev.exists("/tmp/x") and not dev.exists("/opt/tmp/x") and not dev.exists("/opt/tvmbundle/tmp")
        assert not dev.exists(f"/opt/tvmbundle/bundles/net/releases/{name * 64}")
        assert not dev.exists(f"/opt/tvmbundle/bundles/net/releases/{name * 64}.partial")
        assert current_id(dev) == a_id and serving(dev, bundles["a"])


def test_shell_metacharacters_in_user_values_run_nothing(devices, bundles, tmp_path, monkeypatch, run_cli):
    (dev,) = devices.add(1)
    markers = ["/tmp/pwned-prefix", "/tmp/pwned-name", "/tmp/pwned-to", "/tmp/pwned-host"]
    # unquoted in a shell, this prefix would run `tee >/tmp/pwned-prefix` and `touch >/tmp/pwned-prefix`
    prefix = "/opt/t|tee>/tmp/pwned-prefix&&(touch>/tmp/pwned-prefix)"
    name = "net';touch /tmp/pwned-name;$(touch /tmp/pwned-name)`touch /tmp/pwned-name`\"&"
    odd, top, m = crafted(bundles["a"], tmp_path, lambda m: m.update(name=name, bundle_id="f" * 64))
    # 1. the host refuses them before anything connects
    with pytest.raises(UserError, match="name: .* is not allowed"):
        deploy(odd, pi(dev))
    for bad in (prefix, "/opt/a b", "/opt/$(touch /tmp/pwned-prefix)", "/opt/a;b", "/opt/%n", "/opt/a\nb",
                "opt/x", "/opt/../x"):
        with pytest.raises(UserError, match="--prefix"):
            deploy(bundles["a"], pi(dev, prefix=bad))
    code, _, err = run_cli("status", "--host", f"pi@{dev.host};touch /tmp/pwned-host", "--identity", str(dev.key))
    assert code == 2 and "is not allowed" in err
    # 2. past the host's checks they reach the device only as argv elements or quoted: a whole deploy,
    #    status and rollback with them run nothing extra (systemd reads such a prefix literally). The
    #    name picks the bundle's folder and unit on the device, whose agent refuses it before anything
    #    is written under the prefix.
    dev.serve_from(prefix)
    t = pi(dev, prefix=prefix)
    with pytest.raises(DeployError) as e:
        deploy_unchecked(top, m, t, monkeypatch, manifest(bundles["a"]), health_timeout=3)
    assert e.value.step == "preflight" and "--name: " in e.value.problem and "is not allowed" in e.value.problem
    assert not dev.exists(prefix)
    plain = bundle_mod.extract(bundles["a"], tmp_path / "plain")
    deploy_unchecked(plain, manifest(bundles["a"]), t, monkeypatch, manifest(bundles["a"]))
    assert serving(dev, bundles["a"])
    with monkeypatch.context() as mp:
        mp.setattr(release, "check_prefix", lambda p: p)
        (st,) = status(t)
        assert st.healthy and st.current == manifest(bundles["a"])["bundle_id"] and st.name == "net"
        with pytest.raises(DeployError) as e:
            rollback(t, to="$(touch /tmp/pwned-to);`touch /tmp/pwned-to`")
        assert "matches 0 kept releases" in e.value.problem
    for marker in markers:
        assert not dev.exists(marker), marker
        assert not Path(marker).exists(), marker


def test_unknown_and_changed_host_keys_are_refused_before_anything_is_sent(devices, bundles, tmp_path):
    (dev,) = devices.add(1)
    dev.known_hosts.write_text("")
    with pytest.raises(DeployError) as e:
        deploy(bundles["a"], pi(dev))
    assert e.value.step == "connect" and "unknown host key" in e.value.problem
    # a changed key: known_hosts remembers another key for this address
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    fake = (tmp_path / "k.pub").read_text().split()[:2]
    dev.known_hosts.write_text(f"[{dev.host}]:{dev.port} {fake[0]} {fake[1]}\n")
    with pytest.raises(DeployError) as e:
        deploy(bundles["a"], pi(dev, accept_new_host_key=True))
    assert e.value.step == "connect" and "CHANGED" in e.value.problem
    assert nothing_installed(dev)
    # accepting a new key is an explicit option, and then it is recorded
    dev.known_hosts.write_text("")
    deploy(bundles["a"], pi(dev, accept_new_host_key=True))
    assert dev.host in dev.known_hosts.read_text()


def test_wrong_credentials_are_refused(devices, bundles, tmp_path):
    (dev,) = devices.add(1)
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with pytest.raises(DeployError) as e:
        deploy(bundles["a"], pi(dev, identity=other))
    assert e.value.step == "connect" and "authentication failed" in e.value.problem
    assert nothing_installed(dev)


@pytest.mark.slow                 # builds an aarch64 bundle
def test_wrong_architecture_device_is_refused_at_preflight(devices, tmp_path):
    (dev,) = devices.add(1)
    models.conv_net(tmp_path / "n.onnx")
    rpi = api.make("rpi4", tmp_path / "n.onnx", out_dir=tmp_path, run_verify=False).bundle
    with pytest.raises(DeployError) as e:
        deploy(rpi, pi(dev))
    assert e.value.step == "preflight" and "the device is x86_64, the bundle is for aarch64" in e.value.problem
    assert nothing_installed(dev)          # not even the (aarch64) harness was sent


def test_cli_deploy_status_rollback_with_sudo(devices, bundles, run_cli):
    (dev,) = devices.add(1)
    conn = ["--host", f"pi@{dev.host}:{dev.port}", "--identity", str(dev.key), "--known-hosts",
            str(dev.known_hosts), "--sudo"]
    code, out, err = run_cli("deploy", str(bundles["a"]), *conn, "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["bundle_id"] == manifest(bundles["a"])["bundle_id"]
    code, out, err = run_cli("deploy", str(bundles["b"]), *conn, "-q")
    assert code == 0 and "is current and healthy" in out, err
    code, out, err = run_cli("status", *conn)
    assert code == 0 and "healthy" in out and manifest(bundles["b"])["bundle_id"][:12] in out, err
    code, out, err = run_cli("rollback", *conn, "-q")
    assert code == 0 and "is current again" in out, err
    assert serving(dev, bundles["a"], wait=10)
    code, out, err = run_cli("deploy", str(bundles["a"]), "--host", "root@bad host", "-q")
    assert code == 2 and "--host: 'root@bad host' is not allowed" in err
    code, out, err = run_cli("status", "--host", f"pi@{dev.host}:{dev.port}", "--identity", str(dev.key),
                             "--known-hosts", str(dev.key) + ".nothing")
    assert code == 2 and "connect: unknown host key" in err


# --- a device that loses power mid-transfer ----------------------------------------------------------
# A persistent device (a root of its own on disk) whose init is SIGKILLed from the host at an exact point
# of the upload: sessions, the receiving `tvm-deploy` and the service die at once, with no shutdown, as on
# a board whose power is cut. It boots again from the disk as the cut left it.

def test_device_killed_mid_upload_boots_into_its_release_and_redeploy_resumes(devices, bundles):
    (dev,) = devices.add(1, persistent=True)
    deploy(bundles["a"], pi(dev))

    def cut_power_after_first_file(event: str, detail: str) -> None:
        if event == "uploaded":
            dev.kill()

    with pytest.raises(DeployError) as e:
        deploy(bundles["b"], pi(dev), hook=cut_power_after_first_file, step_timeout=20)
    assert e.value.step == "upload"
    # it boots into its previous release, and its own systemd starts the service: nobody logs in to fix it
    dev.start()
    assert dev.current_id() == manifest(bundles["a"])["bundle_id"]
    assert serving(dev, bundles["a"], wait=60)
    # the redeploy keeps what reached the device's disk before the cut
    done = deploy(bundles["b"], pi(dev))
    assert done.uploaded_bytes < sum(f["size"] for f in manifest(bundles["b"])["files"])
    assert serving(dev, bundles["b"])


def test_device_commands_answer_in_json(devices, bundles):
    """`tvm-deploy survey` and friends take argv and print one JSON document (what the host reads)."""
    (dev,) = devices.add(1)
    deploy(bundles["a"], pi(dev))
    deploy(bundles["b"], pi(dev))
    exe = "/opt/tvmbundle/bundles/net/current/bin/tvm-deploy"
    a_only = {f["sha256"] for f in manifest(bundles["a"])["files"]} - {f["sha256"] for f in manifest(bundles["b"])["files"]}
    with Remote(pi(dev)) as r:
        survey = json.loads(r.run([exe, "survey", "--prefix", "/opt/tvmbundle", "--name", "net", "--sudo"], "t").out)
        assert survey["ok"] and survey["arch"] == "x86_64" and survey["sudo"]["ok"] and survey["prefix"]["writable"]
        assert survey["current"] == manifest(bundles["b"])["bundle_id"]
        assert survey["releases"] == [manifest(bundles["b"])["bundle_id"], manifest(bundles["a"])["bundle_id"]]
        assert survey["bundles"] == [{"name": "net", "unit": "tvmbundle@net.service", "current": survey["current"],
                                      "listen": manifest(bundles["b"])["service"]["listen"]}]
        assert survey["legacy"] is None
        # gc keeps the current release and removes the other with the store files only it used
        gc = json.loads(r.run([exe, "gc", "--prefix", "/opt/tvmbundle", "--name", "net", "--keep", "1"], "t").out)
        assert gc["ok"] and gc["gc"]["removed_releases"] == [manifest(bundles["a"])["bundle_id"]]
        assert gc["gc"]["removed_files"] == len(a_only)
        assert not any(dev.exists(f"/opt/tvmbundle/store/sha256/{h}") for h in a_only)
        bad = r.run([exe, "activate", "--prefix", "/opt/tvmbundle", "--name", "net", "--release", "../../etc"], "t",
                    check=False)
        assert bad.code == 1 and json.loads(bad.out)["ok"] is False
        bad = r.run([exe, "status", "--prefix", "/opt/tvmbundle", "--name", "../net"], "t", check=False)
        assert bad.code == 2 and "--name: '../net' is not allowed" in bad.err
        usage = r.run([exe, "install", "--prefix", "/opt/tvmbundle", "--bogus"], "t", check=False)
        assert usage.code == 2 and "unknown argument '--bogus'" in usage.err
    assert serving(dev, bundles["b"])


# --- signed releases, enforced by the device itself ----------------------------------------------------
# The device's trust store (/etc/tvmbundle/allowed_signers, root's, written by `tvmbundle trust --sudo`)
# decides: its `tvm-deploy install` refuses a release not signed by a key it lists before anything is
# stored, and `activate` re-checks the release it switches to. Each refusal leaves the previous release
# current and serving.

@pytest.fixture(scope="module")
def sigkeys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sigkeys")
    for n in ("a", "b", "other"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", n, "-f", str(d / n)], check=True)
    return {n: d / n for n in ("a", "b", "other")}


def signed(src: Path, key: Path, dest_dir: Path) -> Path:
    from bundler.package import signing

    dest_dir.mkdir(parents=True, exist_ok=True)
    return signing.sign(src, key, dest_dir / src.name)


def fingerprint(key: Path) -> str:
    return subprocess.run(["ssh-keygen", "-l", "-f", f"{key}.pub"], capture_output=True, text=True,
                          check=True).stdout.split()[1]


def trust_cli(run_cli, dev, *argv: str, sudo: bool = True) -> tuple[int, str, str]:
    return run_cli("trust", "--host", f"pi@{dev.host}:{dev.port}", "--identity", str(dev.key), "--known-hosts",
                   str(dev.known_hosts), *(["--sudo"] if sudo else []), *argv)


def trusted_on(dev) -> list[str]:
    """The public keys the device's trust file lists (its own bytes, read as root)."""
    text = dev.sh("cat /etc/tvmbundle/allowed_signers").stdout
    return [" ".join(line.split()[2:4]) for line in text.splitlines() if line and not line.startswith("#")]


def pub(key: Path) -> str:
    return " ".join(Path(f"{key}.pub").read_text().split()[:2])


def test_signed_release_from_a_trusted_key_installs_and_reports_its_signer(devices, bundles, sigkeys, tmp_path,
                                                                            run_cli):
    (dev,) = devices.add(1)
    t = pi(dev)
    a_signed = signed(bundles["a"], sigkeys["a"], tmp_path / "sa")
    # no trust file: unsigned releases are allowed, as before, and the answer says whether it was signed
    plain = deploy(bundles["a"], t)
    assert not plain.signed and plain.signed_by is None
    unchecked = deploy(a_signed, t)
    assert unchecked.signed and unchecked.signed_by is None
    # writing the trust file needs root: pi without --sudo is refused, and nothing is written
    code, _, err = trust_cli(run_cli, dev, f"{sigkeys['a']}.pub", sudo=False)
    assert code != 0 and "root's" in err and "--sudo" in err, err
    assert not dev.exists("/etc/tvmbundle/allowed_signers")
    code, out, err = trust_cli(run_cli, dev, f"{sigkeys['a']}.pub")
    assert code == 0 and f"trusted {fingerprint(sigkeys['a'])}" in out, err
    assert dev.sh("stat -c '%u %a' /etc/tvmbundle/allowed_signers").stdout.split() == ["0", "644"]
    assert trusted_on(dev) == [pub(sigkeys["a"])]
    assert not dev.sh("ls -A /home/pi").stdout.count(".tvmbundle-allowed_signers")     # the temp file is gone
    b_signed = signed(bundles["b"], sigkeys["a"], tmp_path / "sb")
    done = deploy(b_signed, t)
    assert done.signed and done.signed_by == fingerprint(sigkeys["a"])
    assert serving(dev, bundles["b"])
    b_id = manifest(bundles["b"])["bundle_id"]
    assert dev.path(f"/opt/tvmbundle/bundles/net/releases/{b_id}/manifest.json.sig").read_bytes() == \
        bundle_mod.extract(b_signed, tmp_path / "peek").joinpath("manifest.json.sig").read_bytes()
    # the CLI prints the signer; --list shows the trusted keys
    conn = ["--host", f"pi@{dev.host}:{dev.port}", "--identity", str(dev.key), "--known-hosts", str(dev.known_hosts),
            "--sudo"]
    code, out, err = run_cli("deploy", str(a_signed), *conn, "-q")
    assert code == 0 and f"signed by {fingerprint(sigkeys['a'])}" in out, err
    code, out, err = trust_cli(run_cli, dev, "--list", sudo=False)
    assert code == 0 and fingerprint(sigkeys["a"]) in out, err
    # the host's optional pre-check refuses a bundle of another key before it connects
    code, _, err = run_cli("deploy", str(b_signed), *conn, "-q", "--trust", f"{sigkeys['other']}.pub")
    assert code == 2 and "not a valid signature" in err, err
    assert serving(dev, bundles["a"])


def rehash(top: Path, rel: str) -> None:
    """Re-record one file's checksum and size in manifest.json (what someone who changed it would do)."""
    m = json.loads((top / "manifest.json").read_text())
    entry = bundle_mod.file_entry(top, rel).to_json()
    m["files"] = [entry if f["path"] == rel else f for f in m["files"]]
    (top / "manifest.json").write_text(json.dumps(m, indent=2))


def test_device_refuses_releases_not_signed_by_a_trusted_key(devices, bundles, sigkeys, tmp_path, run_cli):
    from tests.bundletools import perturb_expected

    (dev,) = devices.add(1)
    t = pi(dev)
    assert trust_cli(run_cli, dev, f"{sigkeys['a']}.pub")[0] == 0
    a_signed = signed(bundles["a"], sigkeys["a"], tmp_path / "sa")
    deploy(a_signed, t)
    a_id, b_id = manifest(bundles["a"])["bundle_id"], manifest(bundles["b"])["bundle_id"]
    b_only = {f["sha256"] for f in manifest(bundles["b"])["files"]} - {f["sha256"] for f in manifest(bundles["a"])["files"]}
    b_signed = signed(bundles["b"], sigkeys["a"], tmp_path / "sb")

    def tampered_manifest(top: Path) -> None:
        m = json.loads((top / "manifest.json").read_text())
        m["service"]["threads"] = 1
        (top / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")

    def tampered_file(top: Path) -> None:
        perturb_expected(top)
        rehash(top, "selftest/expected_0.npy")

    cases = {
        "unsigned": (bundles["b"], "unsigned: the release has no manifest.json.sig"),
        "other key": (signed(bundles["b"], sigkeys["other"], tmp_path / "so"),
                      f"not signed by a trusted key: the release is signed by {fingerprint(sigkeys['other'])}"),
        "tampered manifest": (repack(b_signed, tmp_path / "tm", tampered_manifest, fix_manifest=False),
                              "the manifest changed after signing"),
        "tampered file, re-hashed manifest": (repack(b_signed, tmp_path / "tf", tampered_file, fix_manifest=False),
                                              "the manifest changed after signing"),
    }
    for case, (path, problem) in cases.items():
        with pytest.raises(DeployError) as e:
            deploy(path, t)
        assert e.value.step == "signature", (case, e.value)
        assert problem in e.value.problem and "nothing was installed" in e.value.problem, (case, e.value.problem)
        # nothing was stored: no release, none of its files in the store, staging empty
        assert not dev.exists(f"/opt/tvmbundle/bundles/net/releases/{b_id}") and not dev.exists(f"/opt/tvmbundle/bundles/net/releases/{b_id}.partial")
        assert not any(dev.exists(f"/opt/tvmbundle/store/sha256/{h}") for h in b_only), case
        assert not dev.sh("ls -A /opt/tvmbundle/staging").stdout.split(), case
        assert current_id(dev) == a_id and serving(dev, bundles["a"]), case
    # the signed original still goes through
    assert deploy(b_signed, t).signed_by == fingerprint(sigkeys["a"]) and serving(dev, bundles["b"])


def test_rotation_and_revocation_refuse_the_revoked_keys_releases_even_on_rollback(devices, bundles, sigkeys,
                                                                                   tmp_path, run_cli):
    (dev,) = devices.add(1)
    t = pi(dev)
    code, out, err = trust_cli(run_cli, dev, f"{sigkeys['a']}.pub", f"{sigkeys['b']}.pub")
    assert code == 0 and out.count("trusted SHA256:") == 2, err
    a_by_a = signed(bundles["a"], sigkeys["a"], tmp_path / "aa")
    b_by_b = signed(bundles["b"], sigkeys["b"], tmp_path / "bb")
    assert deploy(a_by_a, t).signed_by == fingerprint(sigkeys["a"])
    assert deploy(b_by_b, t).signed_by == fingerprint(sigkeys["b"])      # rotation: either key will do
    a_id, b_id = manifest(bundles["a"])["bundle_id"], manifest(bundles["b"])["bundle_id"]
    code, out, err = trust_cli(run_cli, dev, "--revoke", f"{sigkeys['a']}.pub")
    assert code == 0 and f"revoked {fingerprint(sigkeys['a'])}" in out, err
    assert trusted_on(dev) == [pub(sigkeys["b"])]
    # a's release is still kept on the device, but A no longer signs for it: deploying it is refused ...
    with pytest.raises(DeployError) as e:
        deploy(a_by_a, t)
    assert e.value.step == "signature" and "not signed by a trusted key" in e.value.problem
    assert fingerprint(sigkeys["a"]) in e.value.problem and "nothing was installed" in e.value.problem
    assert current_id(dev) == b_id and serving(dev, bundles["b"])
    # ... and so is rolling back to it, by the device's activate, before the switch
    with pytest.raises(DeployError) as e:
        rollback(t, to=a_id[:12])
    assert e.value.step == "signature" and "nothing was switched" in e.value.problem
    assert current_id(dev) == b_id and serving(dev, bundles["b"])
    # a pusher that calls the device commands itself cannot point them at another trust file: a missing
    # one, or one the login user could write, is refused too
    dev.sh(f"printf 'tvmbundle namespaces=\"tvmbundle-manifest\" %s\\n' '{pub(sigkeys['a'])}' > /home/pi/mine; "
           "chown pi: /home/pi/mine", check=True)
    exe = f"/opt/tvmbundle/bundles/net/releases/{b_id}/bin/tvm-deploy"
    with Remote(t) as r:
        for trust_file, why in (("/home/pi/mine", "cannot be trusted"), ("/nonexistent", "No such file")):
            res = r.run([exe, "activate", "--prefix", "/opt/tvmbundle", "--name", "net", "--release", a_id,
                         "--sudo",
                         "--trust-file", trust_file], "t", check=False)
            doc = json.loads(res.out)
            assert res.code == 1 and doc["step"] == "signature" and why in doc["error"], doc
    assert current_id(dev) == b_id and serving(dev, bundles["b"])
    # revoking the last key would let unsigned releases in again: refused
    code, _, err = trust_cli(run_cli, dev, "--revoke", f"{sigkeys['b']}.pub")
    assert code == 2 and "trusting no key" in err, err
    assert trusted_on(dev) == [pub(sigkeys["b"])]
