"""tvmbundle bench and make --bench: the bundle's own benchmark here, on a device over SSH and under
qemu-user, next to onnxruntime here.

No assertion is about time: only the report's structure and sanity (positive latencies, p50 <= p90,
the runs asked for, where each figure was measured).
"""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import pytest

from bundler import api
from bundler.config import recipe
from bundler.device import bench
from bundler.device.ssh import Target
from bundler.errors import DeployError, UserError
from tests import models
from tests.bundletools import repack
from tests.sshd import free_port

needs_ort = pytest.mark.skipif(not __import__("importlib").util.find_spec("onnxruntime"),
                               reason="onnxruntime is not installed")
native_x86 = pytest.mark.skipif(recipe.host_cpu_family() != "x86_64", reason="the test bundle is for x86_64")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bench")
    model = models.conv_net(d / "net.onnx", seed=0)
    (d / "other").mkdir()
    other = models.conv_net(d / "other" / "net.onnx", seed=1)       # same graph, other weights
    bundle = api.make("x86_64", model, out_dir=d / "dist", run_verify=False).bundle
    return {"dir": d, "model": model, "other": other, "bundle": bundle}


def check_latency(lat: bench.Latency, runs: int, warmup: int, threads: int) -> None:
    assert 0 < lat.min_ms <= lat.p50_ms <= lat.p90_ms <= lat.max_ms
    assert lat.min_ms <= lat.mean_ms <= lat.max_ms
    assert (lat.runs, lat.warmup, lat.threads) == (runs, warmup, threads)
    assert lat.where and lat.version


def foreign(bundle: Path, dest: Path) -> Path:
    """The same bundle, its manifest saying it is for an aarch64 board."""
    def mutate(top: Path) -> None:
        m = json.loads((top / "manifest.json").read_text())
        m["board"].update(name="rpi4", cpu_family="aarch64", triple="aarch64-linux-gnu")
        (top / "manifest.json").write_text(json.dumps(m))
    dest.mkdir(parents=True, exist_ok=True)
    return repack(bundle, dest, mutate)


# --- natively here ----------------------------------------------------------------------------

@native_x86
@needs_ort
def test_native_bench_with_onnxruntime_peer(built):
    r = bench.bench(built["bundle"], runs=5, warmup=1, threads=1, onnx_model=built["model"])
    assert r.mode == "native" and r.board == "x86_64" and r.cpu_family == "x86_64" and r.name == "net"
    assert (r.runs, r.warmup, r.threads) == (5, 1, 1)
    check_latency(r.tvm, 5, 1, 1)
    assert r.tvm.runtime == "tvm" and not r.tvm.emulated and r.tvm.version.startswith("apache-tvm ")
    assert r.onnxruntime is not None
    check_latency(r.onnxruntime, 5, 1, 1)
    assert r.onnxruntime.version.startswith("onnxruntime ")
    # both on this machine, and the report says so
    assert r.tvm.where == r.onnxruntime.where == bench.this_machine() and r.comparable
    data = json.loads(json.dumps(r.to_json()))
    assert set(data) == {"bundle", "bundle_id", "name", "board", "cpu_family", "mode", "runs", "warmup",
                         "threads", "comparable", "results", "notes"}
    assert [x["runtime"] for x in data["results"]] == ["tvm", "onnxruntime"]
    assert set(data["results"][0]) == {"runtime", "version", "where", "emulated", "p50_ms", "p90_ms", "mean_ms",
                                       "min_ms", "max_ms", "runs", "warmup", "threads"}


@native_x86
def test_native_bench_defaults_to_the_bundles_threads_and_needs_model_for_the_peer(built):
    r = bench.bench(built["bundle"], runs=3, warmup=0)
    threads = api.load_recipe("x86_64").service.threads
    check_latency(r.tvm, 3, 0, threads)
    assert r.onnxruntime is None and not r.comparable
    assert any("--model" in n for n in r.notes)


@native_x86
def test_a_different_model_is_refused_as_the_peer(built):
    with pytest.raises(UserError) as e:
        bench.bench(built["bundle"], runs=1, warmup=0, onnx_model=built["other"])
    assert "is not the model this bundle was built from" in e.value.message


# --- errors -------------------------------------------------------------------------------------

def test_not_a_bundle_file(built, tmp_path):
    with pytest.raises(UserError) as e:
        bench.bench(built["model"], runs=1, warmup=0)
    assert "not a bundle" in e.value.message and "tvmbundle make" in e.value.message
    with pytest.raises(UserError) as e:
        bench.bench(tmp_path / "missing.tar.gz", runs=1, warmup=0)
    assert "no such bundle file" in e.value.message


@pytest.mark.parametrize("kw, flag", [({"runs": 0}, "--runs"), ({"warmup": -1}, "--warmup"),
                                      ({"threads": 0}, "--threads")])
def test_bad_counts_are_refused(built, kw, flag):
    args = {"runs": 2, "warmup": 0, **kw}
    with pytest.raises(UserError) as e:
        bench.bench(built["bundle"], **args)
    assert e.value.message.startswith(flag) and "is not allowed" in e.value.message


def test_foreign_bundle_needs_host_or_emulate(built, tmp_path):
    if recipe.host_cpu_family() == "aarch64":
        pytest.skip("the relabelled bundle would be native here")
    fake = foreign(built["bundle"], tmp_path / "foreign")
    with pytest.raises(UserError) as e:
        bench.bench(fake, runs=1, warmup=0)
    msg = e.value.message
    assert "rpi4 (aarch64)" in msg and "--host" in msg and "--emulate" in msg


def test_host_and_emulate_together_are_refused(built):
    with pytest.raises(UserError) as e:
        bench.bench(built["bundle"], target=Target("127.0.0.3"), emulate=True, runs=1, warmup=0)
    assert "only one of --host" in e.value.message


def test_unreachable_host_is_a_connect_error(built):
    port = free_port("127.0.0.3")       # nothing listens there
    with pytest.raises(DeployError) as e:
        bench.bench(built["bundle"], target=Target("127.0.0.3", port=port, connect_timeout=5), runs=1, warmup=0)
    assert e.value.step == "connect" and e.value.host == f"root@127.0.0.3:{port}"


def test_make_bench_refuses_a_foreign_board_before_building(run_cli, built, tmp_path):
    if recipe.host_cpu_family() == "aarch64":
        pytest.skip("rpi4 is native here")
    code, out, err = run_cli("make", "rpi4", "--model", str(built["model"]), "--out", str(tmp_path), "--bench", "-q")
    assert code == 2 and "--bench: rpi4's CPU family is aarch64" in err
    assert not list(tmp_path.iterdir())          # nothing was built


# --- CLI ----------------------------------------------------------------------------------------

@native_x86
@needs_ort
def test_cli_bench_json_and_table(run_cli, built):
    code, out, err = run_cli("bench", str(built["bundle"]), "--runs", "3", "--warmup", "1", "--threads", "1",
                             "--model", str(built["model"]), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["mode"] == "native" and data["runs"] == 3 and data["threads"] == 1 and data["comparable"]
    assert [x["runtime"] for x in data["results"]] == ["tvm", "onnxruntime"]
    assert all(0 < x["p50_ms"] <= x["p90_ms"] for x in data["results"])
    code, out, err = run_cli("bench", str(built["bundle"]), "--runs", "3", "--model", str(built["model"]))
    assert code == 0, err
    assert "p50 ms" in out and "onnxruntime" in out and "tvm / onnxruntime p50" in out
    code, out, err = run_cli("bench", str(built["model"]))
    assert code == 2 and "not a bundle" in err


@native_x86
@needs_ort
def test_cli_make_bench_reports_both_runtimes(run_cli, built, tmp_path):
    code, out, err = run_cli("make", "x86_64", "--model", str(built["model"]), "--out", str(tmp_path),
                             "--no-verify", "--bench", "--json", "-q")
    assert code == 0, err
    data = json.loads(out)
    b = data["bench"]
    assert b["bundle_id"] == data["bundle_id"] and b["mode"] == "native" and b["comparable"]
    assert [x["runtime"] for x in b["results"]] == ["tvm", "onnxruntime"]
    assert all(x["p50_ms"] > 0 for x in b["results"])
    code, out, err = run_cli("make", "x86_64", "--model", str(built["model"]), "--out", str(tmp_path),
                             "--no-verify", "--bench", "-q")
    assert code == 0, err
    assert out.strip() == data["bundle"]           # stdout stays the bundle path; the table is on stderr
    assert "onnxruntime" in err and "p50 ms" in err


# --- under qemu-user --------------------------------------------------------------------------

@pytest.mark.skipif(not (shutil.which("qemu-aarch64") and shutil.which("aarch64-linux-gnu-g++")),
                    reason="needs qemu-user and the aarch64 cross compiler")
def test_emulated_bench_is_labelled(built, tmp_path):
    if recipe.host_cpu_family() == "aarch64":
        pytest.skip("aarch64 is native here")
    b = api.make("aarch64", built["model"], out_dir=tmp_path, run_verify=False).bundle
    r = bench.bench(b, emulate=True, runs=2, warmup=0, threads=1, onnx_model=built["model"])
    assert r.mode == "emulated" and r.tvm.emulated and "qemu-aarch64" in r.tvm.where
    check_latency(r.tvm, 2, 0, 1)
    assert any("timings mean nothing" in n for n in r.notes)
    if r.onnxruntime is not None:
        assert not r.onnxruntime.emulated and not r.comparable
        assert any("not comparable" in n for n in r.notes)


# --- on a device over SSH (tests/devices.py) --------------------------------------------------

@pytest.mark.slow
@native_x86
def test_bench_on_a_device_uploaded_then_installed(built, tmp_path, run_cli, devices):
    """A booted Debian 12 device, logged into as its normal user pi (sudo only to install): a
    bundle not installed there is uploaded to a temporary folder of pi's, run and removed; an
    installed one runs from its current release."""
    from bundler.device.release import deploy

    (dev,) = devices.add(1)
    t = dev.target(user="pi", sudo=True)

    def temp_folders() -> str:
        return dev.sh("ls -d /tmp/tvmbundle-bench.* 2>/dev/null || true", user="pi").stdout.strip()

    # not installed: uploaded to a temporary folder on the device, run, removed
    r = bench.bench(built["bundle"], target=t, runs=3, warmup=1, threads=1, onnx_model=built["model"])
    assert r.mode == "ssh" and r.tvm.where == f"{t.name} (x86_64)"
    check_latency(r.tvm, 3, 1, 1)
    assert any("uploaded to a temporary folder" in n for n in r.notes)
    assert temp_folders() == ""                                     # the device's copy is gone
    assert not dev.exists("/opt/tvmbundle/bundles")                 # nothing installed
    # onnxruntime ran here, not on the device: the report says they are not comparable
    if r.onnxruntime is not None:
        assert r.onnxruntime.where == bench.this_machine() and not r.comparable
        assert any("not comparable" in n for n in r.notes)

    # installed as the current release: that one runs
    deploy(built["bundle"], t)
    r = bench.bench(built["bundle"], target=t, runs=3, warmup=0, threads=1)
    check_latency(r.tvm, 3, 0, 1)
    assert any("current release" in n for n in r.notes)

    # the CLI, with the connection options of deploy and status
    conn = ["--host", f"pi@{dev.host}:{dev.port}", "--identity", str(dev.key), "--known-hosts",
            str(dev.known_hosts)]
    code, out, err = run_cli("bench", str(built["bundle"]), *conn, "--runs", "2", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["mode"] == "ssh" and data["results"][0]["where"].startswith(f"pi@{dev.host}:{dev.port}")

    # a bundle for another CPU family is refused before anything runs there
    if recipe.host_cpu_family() != "aarch64":
        with pytest.raises(DeployError) as e:
            bench.bench(foreign(built["bundle"], tmp_path / "foreign"), target=t, runs=1, warmup=0)
        assert e.value.step == "preflight" and "the device is x86_64" in e.value.problem
