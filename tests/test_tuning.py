"""tvmbundle tune: the database it writes, make applying it, resuming, and the RPC flow for a
foreign board against `tvm-deploy rpc` under qemu-aarch64 on loopback (its timings mean nothing).

Budgets are a handful of trials on a tiny model; nothing here asserts a duration.
"""

from __future__ import annotations

import glob
import importlib.metadata as md
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bundler import api
from bundler.build import runtime
from bundler.compile import model as model_mod
from bundler.compile import onnxmodel, rpc, tuning
from bundler.config import recipe
from bundler.errors import UserError


def _ffi_serializes() -> bool:
    try:
        tuning.check_serialization()
        return True
    except UserError:
        return False


needs_tuning = pytest.mark.skipif(not _ffi_serializes(),
                                  reason=f"apache-tvm-ffi {md.version('apache-tvm-ffi')} crashes serializing TIR "
                                         "under apache-tvm 0.27 (pyproject.toml pins 0.1.14.post0)")


def tiny(path: Path, seed: int = 7) -> Path:
    """x [1,32] -> relu(x @ W + b) -> y [1,16]: two kernels (matmul+add+relu fused, and none else)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32) * 0.2, "w"),
             numpy_helper.from_array(rng.standard_normal((16,)).astype(np.float32) * 0.1, "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _workloads(db_path: Path) -> set[str]:
    """The workload indices that have a record."""
    out = set()
    for line in (db_path / tuning.RECORDS).read_text().splitlines():
        if line.strip():
            out.add(json.loads(line)[0])
    return out


def _model_id(path: Path) -> str:
    return model_mod.digest(onnxmodel.prepare(path, None))


def fresh(path: Path, board: str) -> Path:
    """Forget an earlier session's database for this model (the build cache is shared)."""
    import shutil

    r = recipe.load(board)
    shutil.rmtree(tuning.database_dir(_model_id(path), tuning.board_target(r), runtime.compiler_versions()),
                  ignore_errors=True)
    return path


@needs_tuning
def test_native_tune_make_and_resume(tmp_path, run_cli):
    m = fresh(tiny(tmp_path / "tiny.onnx"), "x86_64")
    code, out, err = run_cli("tune", "x86_64", "--model", str(m), "--trials", "3", "--json", "-q")
    assert code == 0, err
    res = json.loads(out)
    assert res["measured"] == 3 and res["previously"] == 0 and res["records"] == 3
    db_path = Path(res["database"])
    r = recipe.load("x86_64")
    versions = runtime.compiler_versions()
    # Keyed by the model, the board's target and the TVM version.
    assert db_path == tuning.database_dir(_model_id(m), tuning.board_target(r), versions)
    workloads = [json.loads(line) for line in (db_path / tuning.WORKLOADS).read_text().splitlines() if line]
    assert workloads and _workloads(db_path) <= set(range(len(workloads)))
    before = (db_path / tuning.RECORDS).read_text()

    # The budget is reached: a second run measures nothing and leaves the records alone.
    code, out, err = run_cli("tune", "x86_64", "--model", str(m), "--trials", "3", "--json", "-q")
    assert code == 0, err
    again = json.loads(out)
    assert again["measured"] == 0 and again["stopped"] == "already tuned"
    assert (db_path / tuning.RECORDS).read_text() == before

    # make applies it, says so in the manifest, and the tuned bundle passes its selftest.
    result = api.make("x86_64", m, out_dir=tmp_path / "dist")
    assert result.verified and result.verified.ok
    t = result.manifest["tuning"]
    assert t["database"] == db_path.name and t["records"] == 3
    assert t["records_sha256"] == tuning.open_database(db_path).sha256
    assert result.manifest["target"]["num-cores"] == r.service.threads

    # --no-tuning builds another model library (and says no database was used).
    plain = api.make("x86_64", m, out_dir=tmp_path / "plain", tuned=False, run_verify=False)
    assert plain.manifest["tuning"] is None and plain.bundle_id != result.bundle_id


@needs_tuning
def test_resume_counts_earlier_records(tmp_path):
    m = fresh(tiny(tmp_path / "tiny.onnx", seed=8), "x86_64")
    first = api.tune("x86_64", m, trials=2)
    assert first.measured == 2
    first_lines = (first.database.path / tuning.RECORDS).read_text().splitlines()
    second = api.tune("x86_64", m, trials=4)
    assert second.previously == 2 and second.measured == 2
    lines = (second.database.path / tuning.RECORDS).read_text().splitlines()
    assert lines[:2] == first_lines and len(lines) == 4    # appended, nothing measured twice over


@needs_tuning
def test_the_time_limit_holds_and_keeps_what_was_measured(tmp_path):
    """A budget no run could finish in 2 s: the limit ends it after the batch in flight, the run
    reports it, and what was measured is in the database for next time."""
    m = fresh(tiny(tmp_path / "tiny.onnx", seed=9), "x86_64")
    result = api.tune("x86_64", m, trials=100000, time_limit=2.0)
    assert result.stopped == "time limit" and result.measured < 100000
    if result.measured:
        assert len((result.database.path / tuning.RECORDS).read_text().splitlines()) == result.measured


@needs_tuning
def test_aarch64_over_rpc_under_qemu(tmp_path):
    """The whole RPC flow for a foreign board: the board's own harness serves under qemu-aarch64,
    candidates are cross-built with the board's compiler and measured there, make applies them."""
    m = fresh(tiny(tmp_path / "tiny.onnx", seed=9), "aarch64")
    r = recipe.load("aarch64")
    with rpc.local_server(r, key="test-key") as ep:
        assert ep.host == "127.0.0.1"
        result = api.tune("aarch64", m, trials=2, rpc_addr=f"{ep.host}:{ep.port}", key="test-key")
    assert result.measured == 2
    db = result.database
    assert db.workloads >= 1          # measured on the board without errors (run_secs recorded)
    made = api.make("aarch64", m, out_dir=tmp_path / "dist")
    assert made.manifest["tuning"]["database"] == db.key
    assert made.verified and made.verified.ok    # its selftest under qemu-aarch64


def test_foreign_board_needs_a_device(tmp_path):
    with pytest.raises(UserError, match="over TVM's RPC"):
        rpc.measure_setup(recipe.load("aarch64"), None)


def test_rpc_server_key_and_file_functions(tmp_path):
    """`tvm-deploy rpc` answers TVM's client: wrong keys are refused, the session's files live in
    its own folder and the measurement input fill exists."""
    from tvm import rpc as tvm_rpc

    r = recipe.load("x86_64")
    with rpc.local_server(r, key="k1") as ep:
        with pytest.raises(Exception):
            tvm_rpc.connect(ep.host, ep.port, key="other", session_timeout=20)
        sess = tvm_rpc.connect(ep.host, ep.port, key="k1", session_timeout=20)
        sess.upload(bytearray(b"hello"), "a.bin")
        assert bytes(sess.download("a.bin")) == b"hello"
        sess.remove("a.bin")
        with pytest.raises(Exception):
            sess.download("../etc/passwd")
        t = __import__("tvm").runtime.empty((64,), "float32", sess.cpu())
        sess.get_function("tvm.contrib.random.random_fill_for_measure")(t)
        a = t.numpy()
        assert a.std() > 0 and np.all(np.abs(a) <= 1)


def test_recipe_tune_keys(tmp_path):
    bad = tmp_path / "b.toml"
    bad.write_text('format = 1\nextends = "x86_64"\n[tune]\ntrials = 0\n')
    with pytest.raises(UserError, match="tune.trials: expected an integer from 1"):
        recipe.load(str(bad))
    ok = tmp_path / "ok.toml"
    ok.write_text('format = 1\nextends = "x86_64"\n[tune]\ntrials = 8\ntime_limit = 60\n')
    r = recipe.load(str(ok))
    assert r.values["tune.trials"] == 8 and r.values["tune.time_limit"] == 60


def test_duration_parsing():
    assert tuning.parse_duration("90") == 90 and tuning.parse_duration("15m") == 900
    with pytest.raises(UserError):
        tuning.parse_duration("soon")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


device = pytest.mark.skipif(not (shutil.which("sshd") and shutil.which("unshare") and os.geteuid() == 0),
                            reason="test devices need root, openssh-server and unshare (see tests/test_release.py)")


@needs_tuning
@device
def test_tune_on_a_device_over_ssh_leaves_nothing_behind(tmp_path):
    """--host: the RPC server goes to the device, listens on its loopback only, is reached through
    the SSH connection, measures, and is stopped and removed. The device is a loopback sshd
    (tests/sshd.py) on this x86_64 machine, so the x86_64 board's server runs there natively."""
    if recipe.host_cpu_family() != "x86_64":
        pytest.skip("the device is this machine: needs an x86_64 build machine")
    from tests.sshd import Fleet

    m = fresh(tiny(tmp_path / "tiny.onnx", seed=10), "x86_64")
    before = set(glob.glob("/tmp/tvmbundle-rpc.*"))
    with Fleet(tmp_path) as fleet:
        (dev,) = fleet.add(1)
        opts = {"identity": dev.key, "known_hosts": dev.known_hosts}
        result = api.tune("x86_64", m, trials=2, host=f"root@{dev.host}:{dev.port}", ssh_options=opts)
        assert result.measured == 2 and result.database is not None
        assert result.database.meta["runner"] == f"RPC (root@{dev.host}:{dev.port} via SSH)"
        assert set(glob.glob("/tmp/tvmbundle-rpc.*")) <= before            # its folder is gone
        ps = subprocess.run(["pgrep", "-f", "tvm-deploy rpc"], capture_output=True, text=True)
        assert ps.stdout.strip() == "", "the RPC server was left running"


@needs_tuning
def test_tune_through_a_tvm_tracker(tmp_path):
    """Boards behind TVM's own tracker: `tvm-deploy rpc --tracker` registers with it under a key, and
    `tune --tracker ... --key ...` gets its sessions from the tracker (all on 127.0.0.1)."""
    pytest.importorskip("tornado", reason="TVM's tracker needs tornado (in the test extra)")
    from tvm import rpc as tvm_rpc
    from tvm.rpc.tracker import Tracker

    m = fresh(tiny(tmp_path / "tiny.onnx", seed=11), "x86_64")
    tracker = Tracker("127.0.0.1", port=9190, port_end=9390, silent=True)
    addr = f"127.0.0.1:{tracker.port}"
    try:
        with rpc.local_server(recipe.load("x86_64"), key="lab-x86", tracker=addr):
            for _ in range(100):      # registration is asynchronous
                summary = tvm_rpc.connect_tracker("127.0.0.1", tracker.port).summary()
                if any(q.get("free", 0) for k, q in summary["queue_info"].items() if k == "lab-x86"):
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"the server never registered with the tracker: {summary}")
            result = api.tune("x86_64", m, trials=2, tracker=addr, key="lab-x86")
        assert result.measured == 2
        assert result.database.meta["runner"] == f"RPC tracker {addr} key lab-x86"
    finally:
        tracker.terminate()
