"""`tvmbundle export ansible`: the role and playbook run by a real ansible-playbook against nspawn devices.

The devices are tests/devices.py's Debian 12 roots with a real systemd, plus python3 (Ansible's
modules need it on the managed host; the shared root has none): a copy of that root with python3
installed is built once beside it (``derived_root``), and one with Debian's mender-client for the
standalone `mender install` test.  The Mender update module is also run state by state, the way
mender-update calls it (``module_tree``, ``run_update``).  ansible-playbook gets its own inventory, the test
session's private key and known_hosts, with host key checking on.  The device layout is deploy's
(bundler.package.layout: a folder and a unit tvmbundle@NAME.service per bundle, a shared store), so
`release.status` (what `tvmbundle status` calls) must read the devices Ansible updated, and two bundles'
roles on one host leave both serving.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bundler.device import release
from bundler.package import export as export_mod
from bundler.package import fleetexport, layout
from tests import bundletools, models
from tests.bundletools import perturb_expected, repack
from tests.devices import ROOT_DIR, Device, next_index

NAME = "net"        # the bundles of bundletools.model_update

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="test devices need root (systemd-nspawn, sshd logins)")]

VENV_BIN = Path(sys.executable).parent
PLAYBOOK = shutil.which("ansible-playbook", path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
LINT = shutil.which("ansible-lint", path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")


def derived_root(suffix: str, packages: list[str], mask: tuple[str, ...] = ()) -> Path:
    """ROOT_DIR plus ``packages``, once per machine (a few seconds from the apt cache, else about a
    minute): built beside it, renamed into place when complete. The shared root stays as it is."""
    root = ROOT_DIR.with_name(f"{ROOT_DIR.name}-{suffix}")
    stamp = root / f".tvmbundle-test-root-{suffix}"
    if stamp.is_file():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        subprocess.run(["cp", "-a", str(ROOT_DIR), str(tmp)], check=True)
        shutil.copyfile("/etc/resolv.conf", tmp / "etc/resolv.conf")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["chroot", str(tmp), "apt-get", "update", "-q"], check=True, env=env, capture_output=True)
        subprocess.run(["chroot", str(tmp), "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
                       check=True, env=env, capture_output=True)
        subprocess.run(["chroot", str(tmp), "apt-get", "clean"], check=True)
        if mask:
            subprocess.run(["systemctl", f"--root={tmp}", "mask", *mask], check=True, capture_output=True)
        (tmp / stamp.name).write_text("1\n")
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def booted(root: Path, base: Path, n: int, own_listen: bool = False):
    """``n`` devices of ``root`` (a context manager yielding them); always stopped."""
    from contextlib import contextmanager

    from tests.sshd import client_key

    @contextmanager
    def cm():
        key = client_key(base / "client")
        first = next_index(n)
        devs = [Device(first + i, base / f"device{i}", key, base / "client" / "known_hosts", root=root,
                       own_listen=own_listen) for i in range(n)]
        try:
            for d in devs:
                d.configure()
            for d in devs:
                d.start()
            yield devs
        finally:
            for d in devs:
                d.stop()
    return cm()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    a, b = bundletools.model_update(tmp_path_factory)
    d = a.parent.parent
    (d / "bad").mkdir()
    bad = repack(b, d / "bad", perturb_expected)      # its selftest fails on the device
    return {"a": a, "b": b, "bad": bad}


@pytest.fixture(scope="module")
def exports(bundles, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("exports")
    return {k: export_mod.export(v, "ansible", d / k).path for k, v in bundles.items()}


def python_root() -> Path:
    if PLAYBOOK is None:
        pytest.skip("ansible-playbook is not installed (pip install ansible-core)")
    try:
        return derived_root("python", ["python3"])          # Ansible's modules need python3 on the host
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"cannot build the python3 device root beside {ROOT_DIR}: {e}")


@pytest.fixture
def fleet(device_root, tmp_path):
    with booted(python_root(), tmp_path / "fleet", 3) as devs:
        yield devs


def bundle_id(path: Path) -> str:
    return json.loads((path / "roles/tvmbundle/files/manifest.json").read_text())["bundle_id"]


def inventory(devs, path: Path) -> Path:
    hosts = {f"dev{i}": {"ansible_host": d.host, "ansible_port": d.port,
                         **({} if d.own_listen else {"tvmbundle_probe_listen": f"{d.host}:{d.service_port}"})}
             for i, d in enumerate(devs)}
    doc = {"tvmbundle": {"hosts": hosts, "vars": {
        "ansible_user": "pi", "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_ssh_private_key_file": str(devs[0].key),
        "ansible_ssh_common_args": f"-o UserKnownHostsFile={devs[0].known_hosts} -o StrictHostKeyChecking=yes "
                                   "-o IdentitiesOnly=yes -o ConnectTimeout=10",
        "tvmbundle_health_timeout": 20}}}
    path.write_text(json.dumps(doc, indent=2))        # JSON is YAML
    return path


def play(tree: Path, inv: Path, *extra: str, playbook: str = "deploy.yml") -> subprocess.CompletedProcess:
    env = {**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
           "ANSIBLE_LOCAL_TEMP": str(inv.parent / "ansible-tmp"), "ANSIBLE_HOME": str(inv.parent / "ansible-home"),
           "ANSIBLE_ROLES_PATH": str(tree / "roles"), "ANSIBLE_RETRY_FILES_ENABLED": "False",
           "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    t = time.monotonic()
    res = subprocess.run([PLAYBOOK, "-i", str(inv), playbook, *extra], cwd=tree, env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    res.seconds = time.monotonic() - t
    return res


def recap(out: str) -> dict[str, dict[str, int]]:
    rows = {}
    for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", out, re.MULTILINE):
        rows[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return rows


def uploaded(out: str, host: str) -> list[str]:
    """Labels of the changed items of the role's upload task for ``host``."""
    section = out.split("TASK [tvmbundle : Upload | only the files the store lacks, into staging]")
    found = []
    for part in section[1:]:
        body = part.split("\nTASK [", 1)[0]
        found += re.findall(rf"^changed: \[{re.escape(host)}\] => \(item=(.+)\)$", body, re.MULTILINE)
    return sorted(found)


def current(dev, name: str = NAME) -> str | None:
    return dev.current_id(name=name)


def status(dev, name: str = NAME) -> release.DeviceStatus:
    """What `tvmbundle status` reads of bundle ``name`` on ``dev``."""
    (st,) = release.status(dev.target(user="pi", sudo=True), name=name)
    return st


def test_export_is_reproducible_and_lints(bundles, tmp_path):
    a = export_mod.export(bundles["a"], "ansible", tmp_path / "one")
    b = export_mod.export(bundles["a"], "ansible", tmp_path / "two")
    assert a.files == b.files
    for rel in a.files:
        p, q = a.path / rel, b.path / rel
        assert p.read_bytes() == q.read_bytes(), rel
        assert (p.stat().st_mode, p.stat().st_mtime) == (q.stat().st_mode, q.stat().st_mtime), rel
    for sub in ("tasks", "defaults", "handlers", "files", "meta"):
        assert (a.path / "roles/tvmbundle" / sub).is_dir()
    # every agent call names the bundle; the paths are the layout's, the unit the bundle's instance
    role = a.path / "roles/tvmbundle"
    tasks = (role / "tasks/main.yml").read_text()
    calls = re.findall(r"'(survey|activate)', '--prefix', tvmbundle_prefix, '--name', tvmbundle_name", tasks)
    assert sorted(calls) == ["activate", "activate", "survey"], calls
    assert "- install\n          - --prefix\n          - \"{{ tvmbundle_prefix }}\"\n          - --name\n" in tasks
    assert layout.releases_dir("{{ tvmbundle_prefix }}", "{{ tvmbundle_name }}") in tasks
    assert "'/releases/'" not in tasks and "/current" not in tasks
    variables = (role / "vars/main.yml").read_text()
    assert f'tvmbundle_name: "{NAME}"' in variables and f'tvmbundle_unit: "{layout.unit_name(NAME)}"' in variables
    # ansible-playbook run in the export's folder reads its ansible.cfg: pipelining on
    config = subprocess.run([str(VENV_BIN / "ansible-config"), "dump", "--only-changed", "-t", "all"], cwd=a.path, capture_output=True,
                            text=True, env={**os.environ, "ANSIBLE_HOME": str(tmp_path / "ah"), "ANSIBLE_NOCOLOR": "1"},
                            timeout=120, check=True).stdout
    assert re.search(r"^pipelining\(.*ansible\.cfg\) = True$", config, re.MULTILINE), config
    unit = (role / "templates/tvmbundle.service.j2").read_text()
    assert "ExecStart={% endraw %}{{ tvmbundle_prefix }}{% raw %}/bundles/net/current/bin/tvm-deploy serve" in unit
    if LINT is None:
        pytest.skip("ansible-lint is not installed")
    res = subprocess.run([LINT, "-q", "roles/tvmbundle", "deploy.yml"], cwd=a.path, capture_output=True, text=True,
                         env={**os.environ, "ANSIBLE_HOME": str(tmp_path / "ah")}, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_rollout_update_selftest_failure_and_limit(fleet, exports, tmp_path):
    devs = fleet
    inv = inventory(devs, tmp_path / "inventory.yml")
    ida, idb = bundle_id(exports["a"]), bundle_id(exports["b"])

    # 1. a first install: canary, then the rest
    res = play(exports["a"], inv, "-e", '{"tvmbundle_serial": [1, 2]}')
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    print(f"first install: {res.seconds:.1f} s")
    for d in devs:
        assert current(d) == ida
        st = status(d)                                           # what `tvmbundle status` reads
        assert st.current == ida and st.healthy and not st.legacy, st
        assert st.unit == layout.unit_name(NAME)
    assert {h: r["failed"] for h, r in recap(res.stdout).items()} == {"dev0": 0, "dev1": 0, "dev2": 0}

    # 2. a model-only update: only the files whose content changed are copied
    ma = json.loads((exports["a"] / "roles/tvmbundle/files/manifest.json").read_text())
    mb = json.loads((exports["b"] / "roles/tvmbundle/files/manifest.json").read_text())
    have = {f["sha256"] for f in ma["files"]}
    changed_paths = sorted(f["path"] for f in mb["files"] if f["sha256"] not in have)
    assert "model/model.so" in changed_paths
    assert all(p == "model/model.so" or p.startswith("selftest/expected_") for p in changed_paths), changed_paths
    res = play(exports["b"], inv, "-e", '{"tvmbundle_serial": [1, "100%"]}')
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    print(f"model-only update: {res.seconds:.1f} s")
    for i, d in enumerate(devs):
        assert uploaded(res.stdout, f"dev{i}") == changed_paths
        assert current(d) == idb
    # re-running changes nothing but the restart of activate
    res = play(exports["b"], inv, "-e", '{"tvmbundle_serial": [3]}')
    assert res.returncode == 0
    assert all(uploaded(res.stdout, f"dev{i}") == [] for i in range(3))

    # 3. one host's selftest fails: it keeps b, the others go on (1 of the batch of 2 = 50%, allowed)
    # Each host includes the role its inventory names: dev1 gets the export of the perturbed bundle.
    bad_roles = tmp_path / "roles"
    shutil.copytree(exports["a"] / "roles/tvmbundle", bad_roles / "tvmbundle")
    shutil.copytree(exports["bad"] / "roles/tvmbundle", bad_roles / "tvmbundle_bad")
    mixed = tmp_path / "mixed.yml"
    mixed.write_text("\n".join([  # noqa: FLY002
        "---", "- name: Roll out, one host on another release", "  hosts: tvmbundle", "  gather_facts: false",
        "  serial: [1, 2]", "  max_fail_percentage: 50", "  tasks:", "    - name: The host's release",
        "      ansible.builtin.include_role:", "        name: \"{{ role_for_host | default('tvmbundle') }}\"", ""]))
    doc = json.loads(inv.read_text())
    doc["tvmbundle"]["hosts"]["dev1"]["role_for_host"] = "tvmbundle_bad"
    inv.write_text(json.dumps(doc))
    res = play(tmp_path, inv, playbook="mixed.yml")
    assert res.returncode != 0
    rows = recap(res.stdout)
    print(f"mixed rollout, one selftest failing: {res.seconds:.1f} s")
    assert rows["dev1"]["failed"] == 1 and rows["dev0"]["failed"] == 0 and rows["dev2"]["failed"] == 0, rows
    assert "selftest" in res.stdout and "nothing was switched" in res.stdout
    assert current(devs[1]) == idb and status(devs[1]).healthy
    assert current(devs[0]) == ida and current(devs[2]) == ida
    doc["tvmbundle"]["hosts"]["dev1"].pop("role_for_host")
    inv.write_text(json.dumps(doc))

    # 4. the failure limit stops the play: the canary fails, the other hosts are never touched
    res = play(exports["bad"], inv, "-e", '{"tvmbundle_serial": [1, "50%"], "tvmbundle_max_fail_percentage": 0}')
    assert res.returncode != 0
    rows = recap(res.stdout)
    assert rows["dev0"]["failed"] == 1, rows
    assert "dev1" not in rows and "dev2" not in rows, rows
    assert current(devs[0]) == ida and status(devs[0]).healthy
    assert current(devs[1]) == idb and current(devs[2]) == ida

    # 5. the health gate fails on a host (its service cannot listen): activate switched, the role switches back
    import socket

    assert devs[2].systemctl("stop", layout.unit_name(NAME)) == 0
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind((devs[2].host, devs[2].service_port))
    blocker.listen(1)
    try:
        res = play(exports["b"], inv, "--limit", "dev2", "-e", '{"tvmbundle_health_timeout": 3}')
    finally:
        blocker.close()
    assert res.returncode != 0
    assert recap(res.stdout)["dev2"]["failed"] == 1
    assert "TASK [tvmbundle : Rollback | the previous release, with its own harness]" in res.stdout
    assert f"the previous release {ida[:12]} is current again" in res.stdout, res.stdout[-3000:]
    assert current(devs[2]) == ida
    st = status(devs[2])
    deadline = time.monotonic() + 30
    while not st.healthy and time.monotonic() < deadline:       # Restart=on-failure brings a back
        time.sleep(1)
        st = status(devs[2])
    assert st.current == ida and st.healthy


def test_two_bundles_on_one_host(device_root, tmp_path):
    """A detector and a recognizer, each its own export (and address), played onto one host: both serve,
    each from its own folder and unit, the second sends only what the shared store lacks, and playing
    one again leaves the other's service alone. A third bundle on the recognizer's address is refused
    by the device's own install (the check every installer runs), the other two still serving."""
    from bundler import api
    from tests.sshd import free_port

    root = python_root()
    with booted(root, tmp_path / "fleet", 1, own_listen=True) as (dev,):
        trees, ids, listens = {}, {}, {}
        for name, seed in (("det", 0), ("rec", 1), ("dup", 2)):
            d = tmp_path / name
            d.mkdir()
            models.conv_net(d / f"{name}.onnx", seed=seed)
            listens[name] = listens["rec"] if name == "dup" else f"{dev.host}:{free_port(dev.host)}"
            made = api.make("x86_64", d / f"{name}.onnx", out_dir=d / "dist", run_verify=False, listen=listens[name])
            trees[name], ids[name] = export_mod.export(made.bundle, "ansible", d / "ansible").path, made.bundle_id
        inv = inventory([dev], tmp_path / "inventory.yml")
        for name in ("det", "rec"):
            res = play(trees[name], inv)
            assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
        sent = uploaded(res.stdout, "dev0")
        assert "model/model.so" in sent and all(p == "model/model.so" or p.startswith("selftest/") for p in sent), sent
        found = {st.name: st for st in release.status(dev.target(user="pi", sudo=True))}
        assert sorted(found) == ["det", "rec"], found
        for name in ("det", "rec"):
            st = found[name]
            assert st.current == ids[name] and st.healthy and st.unit == layout.unit_name(name) and not st.legacy, st
            assert current(dev, name) == ids[name]
            assert dev.systemctl("is-active", "--quiet", layout.unit_name(name)) == 0
        # one store: the harness both releases run is one file on the device's disk
        harness = [dev.path(layout.release_dir("/opt/tvmbundle", n, ids[n]) + "/bin/tvm-deploy").stat().st_ino
                   for n in ("det", "rec")]
        assert harness[0] == harness[1]

        def main_pid(name: str) -> str:
            return dev.sh(f"systemctl show -p MainPID --value {layout.unit_name(name)}").stdout.strip()

        before = main_pid("rec")
        res = play(trees["det"], inv)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
        assert main_pid("rec") == before and before != "0"
        assert status(dev, "rec").healthy and status(dev, "det").healthy

        res = play(trees["dup"], inv)
        assert res.returncode != 0
        assert (f"bundle 'dup' listens on {listens['rec']}, which bundle 'rec' (tvmbundle@rec.service) already "
                "serves on this device") in res.stdout, res.stdout[-4000:]
        assert current(dev, "dup") is None and not dev.exists(layout.release_dir("/opt/tvmbundle", "dup", ids["dup"]))
        assert main_pid("rec") == before and status(dev, "rec").healthy and status(dev, "det").healthy


# --- Mender -------------------------------------------------------------------------------

MENDER_ARTIFACT = shutil.which("mender-artifact")
MODULE_TREE = "/var/lib/mender/modules/v3/payloads/0000/tree"


def rsa_key(folder: Path) -> tuple[Path, Path]:
    """A signing key as mender-artifact takes it (PKCS#1 RSA PEM) and its public half."""
    folder.mkdir(parents=True, exist_ok=True)
    key, pub = folder / "artifact.key", folder / "artifact.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072", "-out",
                    str(key)], check=True, capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", str(key), "-traditional", "-out", str(key)], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True)
    return key, pub


def module_tree(artifact: Path, tree: Path) -> None:
    """The folder mender-update hands its update module: header/, files/ (the payload) and tmp/,
    laid out as the update module protocol (v3) documents."""
    import tarfile

    shutil.rmtree(tree, ignore_errors=True)
    for sub in ("header", "files", "tmp"):
        (tree / sub).mkdir(parents=True)
    (tree / "version").write_text("3\n")
    with tarfile.open(artifact) as outer:
        for member in outer.getmembers():
            data = outer.extractfile(member)
            if member.name == "header.tar.gz":
                with tarfile.open(fileobj=data, mode="r:gz") as h:
                    for m in h.getmembers():
                        if m.isfile() and (m.name == "header-info" or m.name.startswith("headers/0000/")):
                            (tree / "header" / Path(m.name).name).write_bytes(h.extractfile(m).read())
            elif member.name == "data/0000.tar.gz":
                with tarfile.open(fileobj=data, mode="r:gz") as d:
                    for m in d.getmembers():
                        if m.isfile() and "/" not in m.name.strip("/"):
                            (tree / "files" / m.name).write_bytes(d.extractfile(m).read())
    info = json.loads((tree / "header" / "header-info").read_text())
    (tree / "header" / "artifact_name").write_text(info["artifact_provides"]["artifact_name"])
    (tree / "header" / "payload_type").write_text(info["payloads"][0]["type"])
    (tree / "header" / "artifact_group").write_text("")


def module_state(dev, state: str) -> subprocess.CompletedProcess:
    """One state, as mender-update calls it: `MODULE STATE TREE`, as root, from the tree's folder."""
    env = f"TVM_DEPLOY_LISTEN={dev.host}:{dev.service_port}"
    return dev.sh(f"cd {MODULE_TREE} && env {env} /usr/share/mender/modules/v3/tvmbundle {state} {MODULE_TREE}")


def run_update(dev, artifact: Path) -> list[tuple[str, int, str]]:
    """The state sequence of a standalone install (mender-update's order), ending in rollback on failure."""
    module_tree(artifact, dev.path(MODULE_TREE))
    done = []

    def step(state):
        r = module_state(dev, state)
        done.append((state, r.returncode, (r.stdout + r.stderr).strip()[-600:]))
        return r

    assert step("SupportsRollback").stdout.strip() == "Yes"
    step("Download")
    if step("ArtifactInstall").returncode == 0:
        assert step("NeedsArtifactReboot").stdout.strip() == "No"
        if step("ArtifactCommit").returncode != 0:
            step("ArtifactRollback")
            step("ArtifactFailure")
    else:
        step("ArtifactRollback")
        step("ArtifactFailure")
    step("Cleanup")
    return done


def test_mender_artifact_and_update_module(bundles, devices, tmp_path):
    if MENDER_ARTIFACT is None:
        pytest.skip("mender-artifact is not installed (apt-get install mender-artifact)")
    key, pub = rsa_key(tmp_path / "keys")
    arts = {}
    for name in ("a", "b", "bad"):
        r = export_mod.export(bundles[name], "mender", tmp_path / f"m-{name}", key=key)
        arts[name] = next(r.path.glob("*.mender"))
        assert sorted(r.files) == sorted(["README.md", "modules/v3/tvmbundle", arts[name].name])
        # one module for every bundle of a device: nothing in it is this bundle's
        assert (r.path / "modules/v3/tvmbundle").read_text() == fleetexport.MENDER_MODULE
    again = export_mod.export(bundles["a"], "mender", tmp_path / "m-a2", key=key)
    assert next(again.path.glob("*.mender")).read_bytes() == arts["a"].read_bytes()      # reproducible
    for art in arts.values():
        v = subprocess.run([MENDER_ARTIFACT, "validate", "-k", str(pub), str(art)], capture_output=True, text=True,
                           check=False)
        assert v.returncode == 0, v.stdout + v.stderr
        rd = subprocess.run([MENDER_ARTIFACT, "read", "-k", str(pub), str(art)], capture_output=True, text=True,
                           check=False)
        assert rd.returncode == 0 and "signed and verified correctly" in rd.stdout, rd.stdout
        assert "Type:   tvmbundle" in rd.stdout and "Compatible devices: '[x86_64]'" in rd.stdout
    module_tree(arts["a"], tmp_path / "tree")
    payload = sorted(p.name for p in (tmp_path / "tree/files").iterdir())
    assert payload == sorted([bundles["a"].name, fleetexport.MENDER_UNIT, fleetexport.MENDER_CONF]), payload
    assert f"name={NAME}\n" in (tmp_path / "tree/files" / fleetexport.MENDER_CONF).read_text()
    calls = [line for line in fleetexport.MENDER_MODULE.splitlines()
             if re.search(r'/bin/tvm-deploy" (survey|prepare|install|activate|gc|status) ', line)]
    assert len(calls) == 6 and all('--name "$NAME"' in line for line in calls), calls
    rsa_key(tmp_path / "other")
    wrong = subprocess.run([MENDER_ARTIFACT, "validate", "-k", str(tmp_path / "other/artifact.pub"), str(arts["a"])],
                           capture_output=True, text=True, check=False)
    assert wrong.returncode != 0
    unsigned = export_mod.export(bundles["a"], "mender", tmp_path / "m-unsigned")
    assert subprocess.run([MENDER_ARTIFACT, "validate", str(next(unsigned.path.glob("*.mender")))],
                          check=False).returncode == 0

    (dev,) = devices.add(1)
    module = dev.path("/usr/share/mender/modules/v3/tvmbundle")
    module.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "m-a" / "modules/v3/tvmbundle", module)
    module.chmod(0o755)
    ids = {k: json.loads(subprocess.run(["tar", "-xzOf", str(bundles[k]), "--wildcards", "*/manifest.json"],
                                        capture_output=True, check=True).stdout)["bundle_id"] for k in bundles}

    from tests.test_release import serving
    for name in ("a", "b"):
        states = run_update(dev, arts[name])
        assert [s for s, rc, _ in states if rc != 0] == [], states
        assert current(dev) == ids[name]
        assert serving(dev, bundles[name], wait=10)
    st = status(dev)
    assert st.current == ids["b"] and st.healthy and st.unit == layout.unit_name(NAME)
    states = run_update(dev, arts["bad"])
    failed = [s for s, rc, _ in states if rc != 0]
    assert failed == ["ArtifactInstall"], states
    assert "selftest" in states[2][2], states
    assert [s for s, _, _ in states][-3:] == ["ArtifactRollback", "ArtifactFailure", "Cleanup"]
    assert current(dev) == ids["b"] and serving(dev, bundles["b"], wait=10)
    assert not list(dev.path("/opt/tvmbundle/staging").glob("*.part"))


def test_mender_client_standalone_install(bundles, device_root, tmp_path):
    """Debian's mender-client (3.4) installs the artifacts standalone (`mender install`, `mender commit`)
    through the update module; a failing selftest ends in its ArtifactRollback, the previous release serving."""
    if MENDER_ARTIFACT is None:
        pytest.skip("mender-artifact is not installed (apt-get install mender-artifact)")
    try:
        root = derived_root("mender", ["mender-client"],
                            mask=("mender-client.service", "mender-authd.service", "mender-updated.service"))
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"cannot build a device root with mender-client beside {ROOT_DIR}: {e}")
    key, pub = rsa_key(tmp_path / "keys")
    arts = {k: next(export_mod.export(bundles[k], "mender", tmp_path / f"m-{k}", key=key).path.glob("*.mender"))
            for k in ("a", "b", "bad")}
    ids = {k: json.loads(subprocess.run(["tar", "-xzOf", str(bundles[k]), "--wildcards", "*/manifest.json"],
                                        capture_output=True, check=True).stdout)["bundle_id"] for k in bundles}
    from tests.test_release import serving
    with booted(root, tmp_path / "mdev", 1) as (dev,):
        module = dev.path("/usr/share/mender/modules/v3/tvmbundle")
        shutil.copyfile(tmp_path / "m-a" / "modules/v3/tvmbundle", module)
        module.chmod(0o755)
        shutil.copyfile(pub, dev.path("/etc/mender/artifact-verify-key.pem"))
        dev.path("/etc/mender/mender.conf").write_text(
            json.dumps({"ArtifactVerifyKey": "/etc/mender/artifact-verify-key.pem"}))
        dev.path("/etc/mender/artifact_info").write_text("artifact_name=factory\n")
        dev.sh("mkdir -p /data/mender && echo device_type=x86_64 > /data/mender/device_type", check=True)
        env = f"env TVM_DEPLOY_LISTEN={dev.host}:{dev.service_port}"
        for name in ("a", "b", "bad"):
            shutil.copyfile(arts[name], dev.path("/root/update.mender"))
            inst = dev.sh(f"{env} mender install /root/update.mender")
            if name == "bad":
                assert inst.returncode != 0
                assert "selftest" in inst.stdout + inst.stderr
                assert "Rolling back Artifact" in inst.stdout          # mender ran ArtifactRollback
                break
            assert inst.returncode == 0, inst.stdout + inst.stderr
            assert dev.sh(f"{env} mender commit").returncode == 0
            assert dev.sh("mender show-artifact").stdout.strip() == f"net-{ids[name][:12]}"
            assert current(dev) == ids[name] and serving(dev, bundles[name], wait=10)
        assert dev.sh("mender show-artifact").stdout.strip() == f"net-{ids['b'][:12]}"
        assert current(dev) == ids["b"] and serving(dev, bundles["b"], wait=10)
        # an artifact signed by another key is refused before the module runs
        other, _ = rsa_key(tmp_path / "other")
        foreign = export_mod.export(bundles["a"], "mender", tmp_path / "m-foreign", key=other).path
        shutil.copyfile(next(foreign.glob("*.mender")), dev.path("/root/update.mender"))
        assert dev.sh(f"{env} mender install /root/update.mender").returncode != 0
        assert current(dev) == ids["b"]
        # A bundle of another name on net's address (the board's default): the device's own install
        # refuses it in ArtifactInstall, before anything is stored; net still serves.
        from bundler import api

        models.conv_net(tmp_path / "other.onnx", seed=5)
        made = api.make("x86_64", tmp_path / "other.onnx", out_dir=tmp_path / "other", run_verify=False)
        art = export_mod.export(made.bundle, "mender", tmp_path / "m-other", key=key).path
        shutil.copyfile(next(art.glob("*.mender")), dev.path("/root/update.mender"))
        inst = dev.sh(f"{env} mender install /root/update.mender")
        assert inst.returncode != 0
        assert "which bundle 'net' (tvmbundle@net.service) already serves on this device" in inst.stdout + inst.stderr, \
            inst.stdout + inst.stderr
        assert current(dev, "other") is None and not dev.exists(layout.release_dir("/opt/tvmbundle", "other", made.bundle_id))
        assert current(dev) == ids["b"] and serving(dev, bundles["b"], wait=10)
