"""End to end: `tvmbundle make` and `verify` with real compilers, qemu-user and TVM.

Models are built by the tests (tests/models.py). The build cache is shared by
the session (see conftest), so the slow steps (runtime download, harness
build) are paid once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bundler import api, cache
from bundler.errors import UserError
from bundler.package import bundle
from tests import models
from tests.bundletools import perturb_expected, repack

NAME_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)-(?P<board>[A-Za-z0-9_.-]+)-(?P<id>[0-9a-f]{8})\.tar\.gz$")


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/setup installs them)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models")
    models.conv_net(d / "convnet.onnx")
    models.multi_io(d / "multi.onnx")
    models.dynamic_batch(d / "dynbatch.onnx")
    models.unsupported_op(d / "unsupported.onnx")
    return d


def make(run_cli, board: str, model: Path, out: Path, *extra: str) -> tuple[int, dict, str]:
    code, stdout, err = run_cli("make", board, "--model", str(model), "--out", str(out), "--json", *extra)
    return code, (json.loads(stdout) if code == 0 else {}), err


def unpack(bundle_path: Path, dest: Path) -> Path:
    return bundle.extract(bundle_path, dest)


def harness(top: Path, board: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    argv = [str(top / "bin" / "tvm-deploy"), *args]
    if board != "x86_64":
        argv = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", *argv]
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=600)


def onnxruntime_outputs(model: Path, inputs: list[np.ndarray], shapes=None) -> list[np.ndarray]:
    import onnxruntime as ort

    from bundler.compile import onnxmodel

    prepared = onnxmodel.prepare(model, shapes)
    sess = ort.InferenceSession(prepared.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {s.name: a for s, a in zip(prepared.inputs, inputs)})


# --- the happy paths ----------------------------------------------------------------------

def test_make_x86_64_verifies_natively_and_runs(run_cli, model_dir, tmp_path):
    need("g++")
    code, res, err = make(run_cli, "x86_64", model_dir / "convnet.onnx", tmp_path / "dist")
    assert code == 0, err
    path = Path(res["bundle"])
    m = NAME_RE.match(path.name)
    assert m and m["name"] == "convnet" and m["board"] == "x86_64", path.name
    assert path.parent == tmp_path / "dist"
    top = unpack(path, tmp_path / "x")
    assert {p.relative_to(top).as_posix() for p in top.rglob("*") if p.is_file()} == {
        "bin/tvm-deploy", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "model/model.so",
        "selftest/input_0.npy", "selftest/expected_0.npy", "manifest.json"}
    manifest = json.loads((top / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["bundle_id"].startswith(m["id"])
    assert manifest["board"]["name"] == "x86_64"
    assert manifest["runtime"]["origin"] == "wheel"
    assert manifest["runtime"]["apache-tvm"] == manifest["compiler"]["apache-tvm"]
    assert manifest["model"]["inputs"] == [{"name": "input", "dtype": "float32", "shape": [1, 3, 16, 16]}]
    # run the bundle's harness on fresh inputs, compare with onnxruntime
    x = np.random.default_rng(7).standard_normal((1, 3, 16, 16)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    harness(top, "x86_64", "run", "--output-dir", str(tmp_path / "out"), str(tmp_path / "x.npy"))
    (out_file,) = (tmp_path / "out").glob("*.npy")
    want = onnxruntime_outputs(model_dir / "convnet.onnx", [x])[0]
    np.testing.assert_allclose(np.load(out_file), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_make_rpi4_multi_io_verifies_under_qemu(run_cli, model_dir, tmp_path):
    need("aarch64-linux-gnu-g++", "qemu-aarch64")
    code, res, err = make(run_cli, "rpi4", model_dir / "multi.onnx", tmp_path / "dist")
    assert code == 0, err
    path = Path(res["bundle"])
    top = unpack(path, tmp_path / "x")
    info = json.loads(harness(top, "rpi4", "info", "--json").stdout)
    assert info["board"] == "rpi4"
    assert [i["name"] for i in info["inputs"]] == [s["name"] for s in
                                                    json.loads((top / "manifest.json").read_text())["model"]["inputs"]]
    assert len(info["outputs"]) == 2
    # outputs of `run` under qemu-aarch64 equal the host's (onnxruntime) within tolerance
    manifest = json.loads((top / "manifest.json").read_text())
    rng = np.random.default_rng(3)
    inputs = [rng.uniform(-1, 1, size=s["shape"]).astype(s["dtype"]) for s in manifest["model"]["inputs"]]
    args = []
    for i, (spec, a) in enumerate(zip(manifest["model"]["inputs"], inputs)):
        np.save(tmp_path / f"in{i}.npy", a)
        args.append(f"{spec['name']}={tmp_path / f'in{i}.npy'}")
    harness(top, "rpi4", "run", "--output-dir", str(tmp_path / "out"), *args)
    want = onnxruntime_outputs(model_dir / "multi.onnx", inputs)
    for spec, w in zip(manifest["model"]["outputs"], want):
        got = np.load(tmp_path / "out" / f"{spec['name']}.npy")
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-5)


def test_dynamic_batch_needs_a_shape_then_folds_and_runs(run_cli, model_dir, tmp_path):
    need("aarch64-linux-gnu-g++", "qemu-aarch64")
    code, _, err = make(run_cli, "rpi4", model_dir / "dynbatch.onnx", tmp_path / "dist")
    assert code == 2
    assert "--input-shape" in err and "dynbatch.onnx" in err
    code, res, err = make(run_cli, "rpi4", model_dir / "dynbatch.onnx", tmp_path / "dist",
                          "--input-shape", "input=2,3,8,8")
    assert code == 0, err
    top = unpack(Path(res["bundle"]), tmp_path / "x")
    manifest = json.loads((top / "manifest.json").read_text())
    assert manifest["model"]["inputs"][0]["shape"] == [2, 3, 8, 8]
    assert manifest["model"]["outputs"][0]["shape"][0] == 2
    assert harness(top, "rpi4", "selftest").returncode == 0


def test_warm_make_rebuilds_nothing(run_cli, model_dir, tmp_path):
    need("g++")
    code, first, err = make(run_cli, "x86_64", model_dir / "convnet.onnx", tmp_path / "a")
    assert code == 0, err
    code, second, err = make(run_cli, "x86_64", model_dir / "convnet.onnx", tmp_path / "b")
    assert code == 0, err
    assert second["rebuilt"] == []
    assert all(s["cached"] for s in second["steps"] if s["name"].split()[0] in
               ("prepare", "get", "build", "compile", "compute", "package"))
    assert Path(first["bundle"]).name == Path(second["bundle"]).name


@pytest.mark.slow
def test_warm_make_loads_neither_tvm_nor_onnx_and_does_not_rerun_the_selftest(model_dir, tmp_path):
    """What makes a warm make instant: the prepared model and the verification come from the cache.
    A fresh process, so that modules other tests loaded do not count."""
    need("g++")
    script = ("import json, sys\nfrom bundler.cli import main\n"
              "code = main(['make', 'x86_64', '--model', sys.argv[1], '--out', sys.argv[2]])\n"
              "print(json.dumps({'code': code, **{m: m in sys.modules for m in sys.argv[3:]}}))\n")
    heavy = ["tvm", "tvm_ffi", "onnx", "torch", "fabric"]    # tvm_ffi imports torch when it is installed
    argv = [sys.executable, "-c", script, str(model_dir / "convnet.onnx"), str(tmp_path / "dist"), *heavy]
    env = {**os.environ}
    cold = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    assert json.loads(cold.stdout.splitlines()[-1])["code"] == 0, cold.stderr
    warm = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    state = json.loads(warm.stdout.splitlines()[-1])
    assert state == {"code": 0, **{m: False for m in heavy}}, warm.stderr
    assert "was verified for x86_64 before" in warm.stderr and "run the selftest" not in warm.stderr, warm.stderr
    reverify = subprocess.run([sys.executable, "-m", "bundler", "make", "x86_64", "--model",
                               str(model_dir / "convnet.onnx"), "--out", str(tmp_path / "dist"), "--reverify"],
                              capture_output=True, text=True, env=env, timeout=900)
    assert reverify.returncode == 0 and "run the selftest natively" in reverify.stderr, reverify.stderr


@pytest.mark.parametrize("file, name", [("mobile_v2.0_cls.onnx", "mobile_v2.0_cls"),
                                        ("mobile_v2.0_rec.onnx", "mobile_v2.0_rec"),
                                        ("net.ONNX", "net"), ("my model.onnx", "my-model"),
                                        ("..onnx", "model"), ("v1.2", "v1.2")])
def test_bundle_names_keep_the_whole_stem(file, name):
    assert api.bundle_name(Path(file)) == name


@pytest.mark.slow
def test_two_cold_makes_give_identical_tarballs_without_host_paths(model_dir, tmp_path):
    """Two processes with their own caches, folders and hash seeds (so every set and dict the
    build fills may come out in another order), files laid down in opposite orders: byte-identical
    output, and no build path inside."""
    need("aarch64-linux-gnu-g++")
    outs = []
    for n, seed in ((1, "1"), (2, "4242")):
        work = tmp_path / f"work{n}"
        work.mkdir()
        extra = ["b.txt", "a.txt"] if n == 1 else ["a.txt", "b.txt"]
        for name in extra:                                   # a different listing order of the folder
            (work / name).write_text(name)
        shutil.copy(model_dir / "convnet.onnx", work / "convnet.onnx")
        env = {**os.environ, "TVMBUNDLE_CACHE": str(work / "cache"), "PYTHONHASHSEED": seed}
        res = subprocess.run([sys.executable, "-m", "bundler", "make", "rpi4", "--model", "convnet.onnx", "--out",
                              "dist", "--no-verify", "--json", "-q"], cwd=work, env=env, capture_output=True,
                             text=True, timeout=1800)
        assert res.returncode == 0, res.stderr
        outs.append(work / json.loads(res.stdout)["bundle"])
    assert outs[0].name == outs[1].name
    assert outs[0].read_bytes() == outs[1].read_bytes()
    with tarfile.open(outs[0]) as t:
        for member in t.getmembers():
            assert member.uid == 0 and member.gid == 0 and member.mtime == bundle.DEFAULT_EPOCH
        names = t.getnames()
        assert names == sorted(names)
        blobs = [t.extractfile(m).read() for m in t.getmembers() if m.isfile()]
    for needle in (str(tmp_path).encode(), str(Path.home()).encode(), b"/tmp/tvmbundle", b"/root/"):
        assert not any(needle in b for b in blobs), needle


def test_source_date_epoch_sets_mtimes(run_cli, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    code, res, err = make(run_cli, "x86_64", model_dir / "convnet.onnx", tmp_path, "--no-verify")
    assert code == 0, err
    with tarfile.open(res["bundle"]) as t:
        assert {m.mtime for m in t.getmembers()} == {1700000000}
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    code, _, err = make(run_cli, "x86_64", model_dir / "convnet.onnx", tmp_path, "--no-verify")
    assert code == 2 and "SOURCE_DATE_EPOCH: 'yesterday'" in err


# --- bad input ----------------------------------------------------------------------------

def test_unsupported_operator_names_node_and_op(run_cli, model_dir, tmp_path):
    import onnx

    code, _, err = make(run_cli, "x86_64", model_dir / "unsupported.onnx", tmp_path)
    assert code == 2
    assert "unsupported.onnx" in err
    nodes = onnx.load(model_dir / "unsupported.onnx").graph.node
    assert any(n.op_type in err and n.name in err for n in nodes), err
    assert not list(tmp_path.glob("*.tar.gz"))


def test_missing_and_corrupt_model_files(run_cli, tmp_path):
    code, _, err = make(run_cli, "x86_64", tmp_path / "nope.onnx", tmp_path)
    assert code == 2 and "nope.onnx" in err
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage" * 10)
    code, _, err = make(run_cli, "x86_64", tmp_path / "junk.onnx", tmp_path)
    assert code == 2 and "junk.onnx" in err


def test_bad_cli_values(run_cli, model_dir, tmp_path):
    code, _, err = make(run_cli, "x86_64", model_dir / "convnet.onnx", tmp_path, "--format", "zip")
    assert code == 2 and "--format: 'zip' is not allowed; expected one of: deb, overlay, tar" in err
    code, _, err = make(run_cli, "x86_64", model_dir / "convnet.onnx", tmp_path, "--input-shape", "x=1,a")
    assert code == 2 and "x=1,a" in err
    code, _, err = run_cli("make", "x86_64")          # --model missing: a usage error
    assert code == 2


# --- verify rejects what must not ship ----------------------------------------------------

@pytest.fixture(scope="module")
def rpi4_bundle(tmp_path_factory, model_dir) -> Path:
    need("aarch64-linux-gnu-g++", "qemu-aarch64")
    out = tmp_path_factory.mktemp("rpi4")
    result = api.make("rpi4", model_dir / "convnet.onnx", out_dir=out, run_verify=False)
    return result.bundle


def test_verify_passes_a_good_bundle(run_cli, rpi4_bundle):
    code, out, err = run_cli("verify", str(rpi4_bundle), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["selftest"]["passed"] is True
    assert {c["check"] for c in report["checks"]} >= {"files", "elf", "libraries", "selftest", "info"}


def test_verify_rejects_a_tampered_file(run_cli, rpi4_bundle, tmp_path):
    def flip(top: Path) -> None:
        p = top / "model" / "model.so"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))

    bad = repack(rpi4_bundle, tmp_path, flip, fix_manifest=False)
    code, _, err = run_cli("verify", str(bad))
    assert code == 2
    assert "model/model.so: sha256 differs from the manifest" in err


def test_verify_rejects_an_unlisted_file(run_cli, rpi4_bundle, tmp_path):
    bad = repack(rpi4_bundle, tmp_path, lambda top: (top / "bin" / "extra").write_text("x"), fix_manifest=False)
    code, _, err = run_cli("verify", str(bad))
    assert code == 2 and "bin/extra: present but not listed in the manifest" in err


def test_verify_rejects_a_binary_for_the_wrong_architecture(run_cli, rpi4_bundle, tmp_path):
    need("g++")

    def swap(top: Path) -> None:
        (tmp_path / "hello.cc").write_text("int main() { return 0; }\n")
        subprocess.run(["g++", str(tmp_path / "hello.cc"), "-o", str(top / "bin" / "tvm-deploy")], check=True)

    bad = repack(rpi4_bundle, tmp_path, swap)
    code, _, err = run_cli("verify", str(bad))
    assert code == 2
    assert "bin/tvm-deploy: built for x86_64, the board is aarch64" in err


def test_verify_rejects_a_glibc_newer_than_the_board(run_cli, rpi4_bundle, tmp_path):
    (tmp_path / "oldpi.toml").write_text(
        'format = 1\nextends = "rpi4"\n[board]\nos = "Raspberry Pi OS 11 (bullseye)"\n'
        '[host_machine]\nglibc = "2.31"\nglibcxx = "3.4.28"\n')
    code, _, err = run_cli("verify", str(rpi4_bundle), "--board", str(tmp_path / "oldpi.toml"))
    assert code == 2
    assert re.search(r"bin/tvm-deploy: needs GLIBC_2\.3[4-9] \([^)]*__libc_start_main[^)]*\), "
                     r"the board has glibc 2\.31", err), err


def test_verify_rejects_a_missing_library(run_cli, rpi4_bundle, tmp_path):
    bad = repack(rpi4_bundle, tmp_path, lambda top: (top / "lib" / "libtvm_ffi.so").unlink())
    code, _, err = run_cli("verify", str(bad))
    assert code == 2
    assert "needs libtvm_ffi.so, which is neither in the bundle's lib/ nor in the rpi4 base system" in err


def test_verify_runs_the_selftest_and_catches_wrong_outputs(run_cli, rpi4_bundle, tmp_path):
    bad = repack(rpi4_bundle, tmp_path, perturb_expected)
    code, _, err = run_cli("verify", str(bad))
    assert code == 2 and "selftest" in err


def test_verify_rejects_what_is_not_a_bundle(run_cli, tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"not a tarball")
    code, _, err = run_cli("verify", str(tmp_path / "x.tar.gz"))
    assert code == 2 and "x.tar.gz: not a readable bundle tarball" in err
    code, _, err = run_cli("verify", str(tmp_path / "missing.tar.gz"))
    assert code == 2 and "bundle not found" in err


# --- cache and doctor ---------------------------------------------------------------------

@pytest.mark.slow
def test_cache_list_and_prune(run_cli, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TVMBUNDLE_CACHE", str(tmp_path / "c"))
    code, _, err = make(run_cli, "x86_64", model_dir / "convnet.onnx", tmp_path / "d", "--no-verify")
    assert code == 0, err
    code, out, _ = run_cli("cache", "list")
    assert code == 0
    kinds = {l.split()[0] for l in out.splitlines()[2:] if l.strip() and not l.startswith("total")}
    assert {"prepared", "runtime", "harness", "model", "vectors", "bundle"} <= kinds
    code, out, _ = run_cli("cache", "prune", "--kind", "model")
    assert code == 0 and "removed 1 entries" in out
    assert {e.kind for e in cache.entries()} == {"prepared", "runtime", "harness", "vectors", "bundle"}
    # the model is compiled again, nothing else is
    code, res, err = make(run_cli, "x86_64", model_dir / "convnet.onnx", tmp_path / "d", "--no-verify")
    assert code == 0, err
    assert [s.split()[0] for s in res["rebuilt"]] == ["compile"]


def test_doctor_reports_ok_and_missing(run_cli, tmp_path):
    need("aarch64-linux-gnu-g++", "qemu-aarch64")
    code, out, _ = run_cli("doctor", "rpi4")
    assert code == 0, out
    (tmp_path / "ghost.toml").write_text(
        'format = 1\nextends = "rpi4"\n[toolchain]\nprefix = "ghost-linux-gnu-"\n'
        'debian_packages = ["g++-ghost-linux-gnu"]\n')
    code, out, _ = run_cli("doctor", str(tmp_path / "ghost.toml"))
    assert code == 2
    assert "ghost-linux-gnu-g++" in out and "apt-get install -y g++-ghost-linux-gnu" in out


def test_api_raises_user_errors_never_exits(model_dir, tmp_path):
    from bundler import verify

    with pytest.raises(UserError):
        api.make("no-such-board", model_dir / "convnet.onnx", out_dir=tmp_path)
    (tmp_path / "b.tar.gz").write_bytes(b"")
    with pytest.raises(UserError):
        verify(tmp_path / "b.tar.gz")


def test_overlay_format_lays_out_a_bootable_tree(run_cli, model_dir, tmp_path):
    need("systemd-analyze")
    code, res, err = make(run_cli, "x86_64", model_dir / "convnet.onnx", tmp_path, "--format", "overlay")
    assert code == 0, err
    overlay_tar = Path(res["overlay"])
    assert overlay_tar.name.endswith("-overlay.tar.gz") and Path(res["bundle"]).is_file()
    tree = overlay_tar.with_name(overlay_tar.name[: -len(".tar.gz")])
    bid = res["bundle_id"]
    release = tree / "opt" / "tvmbundle" / "bundles" / "convnet" / "releases" / bid
    assert (release / "bin" / "tvm-deploy").is_file() and (release / "manifest.json").is_file()
    current = tree / "opt" / "tvmbundle" / "bundles" / "convnet" / "current"
    assert current.is_symlink() and str(current.readlink()) == f"releases/{bid}"
    unit = tree / "etc" / "systemd" / "system" / "tvmbundle@convnet.service"
    wants = tree / "etc" / "systemd" / "system" / "multi-user.target.wants" / "tvmbundle@convnet.service"
    assert wants.is_symlink() and wants.resolve() == unit.resolve()
    assert "ExecStart=/opt/tvmbundle/bundles/convnet/current/bin/tvm-deploy serve" in unit.read_text()
    # the tarball holds the same tree, links as links, rooted at /
    with tarfile.open(overlay_tar) as t:
        names = t.getnames()
        current_name = "opt/tvmbundle/bundles/convnet/current"
        assert current_name in names and t.getmember(current_name).issym()
        assert all(not n.startswith("/") for n in names)
    # the unit checks out against the tree with the host's systemd units beside it
    root = tmp_path / "root"
    shutil.copytree(tree, root, symlinks=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    res2 = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/tvmbundle@convnet.service"],
                          capture_output=True, text=True)
    assert res2.returncode == 0 and res2.stderr == "", res2.stderr
    # and the release in it runs
    assert subprocess.run([str(release / "bin" / "tvm-deploy"), "selftest"], capture_output=True).returncode == 0
