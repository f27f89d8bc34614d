"""tvmbundle tune: the database it writes, make applying it, resuming, and the RPC flow for a
foreign board against `tvm-deploy rpc` under qemu-aarch64 on loopback (its timings mean nothing).

Budgets are a handful of trials on a tiny model; nothing here asserts a duration.
"""

from __future__ import annotations

import glob
import importlib.metadata as md
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bundler import api
from bundler.build import runtime
from bundler.compile import rpc, tuning
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
    from bundler.compile import prepared as prepared_mod

    return prepared_mod.prepare(path, None).model_id


@pytest.fixture(autouse=True)
def own_tuning_dir(tmp_path, monkeypatch):
    """Each test tunes into a database of its own (the build cache is shared by the session, and the
    database is shared by every model: tiny() models of any seed share their kernel)."""
    monkeypatch.setenv("TVMBUNDLE_TUNING_DIR", str(tmp_path / "tuning"))
    return tmp_path / "tuning"


def fresh(path: Path, board: str) -> Path:
    return path


def two_kernels(path: Path, seed: int = 3) -> Path:
    """tiny()'s kernel (matmul+add+relu on [1,32] x [32,16]) followed by a second one of its own
    (matmul+relu [1,16] x [16,32]): a model sharing one kernel with tiny()."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32) * 0.2, "w"),
             numpy_helper.from_array(rng.standard_normal((16,)).astype(np.float32) * 0.1, "b"),
             numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32) * 0.2, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["m2"]),
             helper.make_node("Relu", ["m2"], ["y"])]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _measured_kernels(db_path: Path) -> set[str]:
    """Workload hashes with a record that built and ran (not MetaSchedule's failed ones)."""
    store = tuning.Store(db_path)
    shash = [w[0] for w in store.workloads()]
    return {shash[i] for i, (_, secs, *_) in store.records() if secs and max(secs) < tuning.FAILED}


def _records_by_kernel(db_path: Path) -> dict[str, int]:
    """workload hash -> how many records the database has for it."""
    return {k: len(v) for k, v in tuning.Store(db_path).by_workload().items()}


def _kernels(model: Path, board: str = "x86_64") -> list[str]:
    """The workload hashes of the model's tunable kernels."""
    from bundler.compile import prepared as prepared_mod

    p = prepared_mod.prepare(model, None)
    return [tuning._describe(t)["workload"] for t in tuning.extract(p, model, recipe.load(board))]


def default_times(db_path: Path, secs: float | None = None) -> dict[str, float]:
    """What tune measured for the default schedules of the kernels; with ``secs``, every one of them
    set to that, with or without tuned knobs (a record applies only where it beats its kernel's
    default schedule: timings decide that, so tests that count applied records fix them)."""
    data = json.loads((db_path / tuning.DEFAULTS).read_text())
    if secs is not None:
        forget_checks(db_path)
        data = {k: secs for k in data}
        (db_path / tuning.DEFAULTS).write_text(json.dumps(data))
        if (db_path / tuning.RULES).is_file():
            rules = json.loads((db_path / tuning.RULES).read_text())
            (db_path / tuning.RULES).write_text(json.dumps({k: {**v, "secs": secs, "default_secs": secs}
                                                            for k, v in rules.items()}))
    return data


def forget_checks(db_path: Path) -> None:
    """Drop the whole-model verdicts tune left (of this machine's noise on a tiny model): with
    them, make would apply what the verdict chose instead of what the test's fixed timings say."""
    for f in (db_path / tuning.MODELS).glob("*.json"):
        info = json.loads(f.read_text())
        info.pop("check", None)
        f.write_text(json.dumps(info))


def test_native_tune_make_and_resume(tmp_path, run_cli):
    m = fresh(tiny(tmp_path / "tiny.onnx"), "x86_64")
    code, out, err = run_cli("tune", "x86_64", "--model", str(m), "--trials", "3", "--json", "-q")
    assert code == 0, err
    res = json.loads(out)
    assert res["measured"] == 3 and res["previously"] == 0 and res["records"] == 3
    db_path = Path(res["database"])
    r = recipe.load("x86_64")
    versions = runtime.compiler_versions()
    # Keyed by the board's target and the TVM version (not the model: every model shares it).
    assert db_path == tuning.database_dir(tuning.board_target(r), versions)
    assert res["trials_per_minute"] > 0 and res["build_workers"] == (os.cpu_count() or 1)
    workloads = [json.loads(line) for line in (db_path / tuning.WORKLOADS).read_text().splitlines() if line]
    assert workloads and _workloads(db_path) <= set(range(len(workloads)))
    before = (db_path / tuning.RECORDS).read_text()

    # The budget is reached: a second run measures nothing and leaves the records alone.
    code, out, err = run_cli("tune", "x86_64", "--model", str(m), "--trials", "3", "--json", "-q")
    assert code == 0, err
    again = json.loads(out)
    assert again["measured"] == 0 and again["stopped"] == "already tuned"
    assert (db_path / tuning.RECORDS).read_text() == before

    # The kernel's default schedule was measured too, by the same runner.
    assert len(default_times(db_path)) == 1 and all(0 < v < 1 for v in default_times(db_path).values())

    # make applies it, says so in the manifest, and the tuned bundle passes its selftest.
    default_times(db_path, 1e9)                       # the records beat the default schedule
    result = api.make("x86_64", m, out_dir=tmp_path / "dist")
    assert result.verified and result.verified.ok
    t = result.manifest.tuning
    assert t["database"] == db_path.name and t["records"] == 3 and t["workloads"] == 1
    assert (t["kernels"], t["kernels_tuned"], t["kernels_from_other_models"], t["kernels_defaulted"]) == (1, 1, 0, 0)
    assert t["records_sha256"] and t["records_sha256"] != tuning.open_database(db_path).sha256   # the best one only
    assert result.manifest.target["num-cores"] == r.service.threads

    # --no-tuning builds another model library (and says no database was used).
    plain = api.make("x86_64", m, out_dir=tmp_path / "plain", tuned=False, run_verify=False)
    assert plain.manifest.tuning is None and plain.bundle_id != result.bundle_id

    # A record no faster than the kernel's default schedule is not applied: the default one is.
    default_times(db_path, 1e-12)
    lost = api.make("x86_64", m, out_dir=tmp_path / "lost", run_verify=False)
    t = lost.manifest.tuning
    assert (t["kernels_tuned"], t["kernels_defaulted"], t["kernels_default_faster"]) == (0, 1, 1)
    assert lost.bundle_id != result.bundle_id


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


@pytest.mark.slow
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
@pytest.mark.slow
def test_a_kernel_tuned_for_one_model_serves_another(tmp_path):
    """One database per target: make applies a kernel tuned for another model (and says so), and
    tuning the second model measures only the kernel the first did not have."""
    a = tiny(tmp_path / "a.onnx")
    b = two_kernels(tmp_path / "b.onnx")
    (shared,) = _kernels(a)
    assert shared in _kernels(b) and len(_kernels(b)) == 2       # the premise: a workload in both models
    (own,) = set(_kernels(b)) - {shared}

    first = api.tune("x86_64", a, trials=2)
    assert first.measured == 2
    db_path = first.database.path
    assert _records_by_kernel(db_path) == {shared: 2}

    # b, never tuned: its make takes the shared kernel from a's tuning, defaults the other.
    default_times(db_path, 1e9)
    made = api.make("x86_64", b, out_dir=tmp_path / "dist", run_verify=False)
    t = made.manifest.tuning
    assert (t["kernels"], t["kernels_tuned"], t["kernels_from_other_models"], t["kernels_defaulted"]) == (1 + 1, 0, 1, 1)

    # Tuning b: the shared kernel has its share of b's budget already; only b's own is measured.
    second = api.tune("x86_64", b, trials=4)
    assert second.previously == 2 and second.kernels_skipped == 1 and second.kernels_measured == 1
    counts = _records_by_kernel(db_path)
    assert counts[shared] == 2 and counts[own] == second.measured > 0
    default_times(db_path, 1e9)
    t = api.make("x86_64", b, out_dir=tmp_path / "dist2", run_verify=False).manifest.tuning
    assert (t["kernels_tuned"], t["kernels_from_other_models"], t["kernels_defaulted"]) == (1, 1, 0)


@needs_tuning
def test_make_applies_what_timing_the_whole_model_chose(tmp_path, run_cli):
    """tune ends by timing the whole model on the board (here: the x86_64 board's own RPC server)
    with all of its tuning, with only the default rules' knobs and with none; make applies the
    fastest of them, says which in the manifest, and a verdict holds only for the tuning it timed."""
    from bundler.compile import prepared as prepared_mod
    from bundler.compile import verdict

    m = two_kernels(tmp_path / "two.onnx", seed=31)
    code, out, err = run_cli("tune", "x86_64", "--model", str(m), "--trials", "2", "--json", "-q")
    assert code == 0, err
    res = json.loads(out)
    db_path = Path(res["database"])
    if res["model_check"] is not None:          # None: nothing of it beat the defaults on this machine
        assert res["model_check"]["choice"] in tuning.CHOICES and res["model_check"]["rounds"] == verdict.ROUNDS
        assert set(res["model_check"]["ms"]) >= {"tuned", "defaults"}

    # Fixed timings: one kernel's records beat its default schedule, the other's knobs beat its own
    # (a default of 1 ns: no record of it can beat that). Which kernel the trials went to (by their
    # shares, or where a candidate failed) is tune's business: the first is one with a record that ran.
    measured = _measured_kernels(db_path)
    first = next(k for k in _kernels(m) if k in measured)
    (second,) = [k for k in _kernels(m) if k != first]
    default_times(db_path, 1e9)
    defaults = json.loads((db_path / tuning.DEFAULTS).read_text())
    defaults[second] = 1e-9
    (db_path / tuning.DEFAULTS).write_text(json.dumps(defaults))
    rules = json.loads((db_path / tuning.RULES).read_text())
    rules[first] = {**rules[first], "knobs": {}}
    rules[second] = {**rules[second], "knobs": {"nr": 4}, "secs": 1e-12, "default_secs": 1e-9}
    (db_path / tuning.RULES).write_text(json.dumps(rules))
    r = recipe.load("x86_64")
    p = prepared_mod.prepare(m, None)
    db = tuning.find(p.model_id, r, runtime.compiler_versions())
    assert db.for_model(p, p.model_id, m, r).check == "unchecked"

    v = verdict.check(r, p, p.model_id, m, runtime.compiler_versions(), None, "this machine")
    assert list(v.ms) == ["tuned", "knobs", "defaults"] and all(x > 0 for x in v.ms.values()) and v.measured
    assert db.for_model(p, p.model_id, m, r).check == v.choice
    again = verdict.check(r, p, p.model_id, m, runtime.compiler_versions(), None, "this machine")
    assert not again.measured and again.choice == v.choice          # kept, not timed again

    # Whatever this machine's noise chose, make applies what the verdict says.
    info_file = tuning.Store(db_path).model_file(p.model_id)
    info = json.loads(info_file.read_text())
    expected = {"tuned": (2, 1, 0), "knobs": (1, 1, 1), "defaults": (0, 0, 2)}   # tuned counts knobs too
    libs = {}
    for choice, (tuned, knobs, defaulted) in expected.items():
        info_file.write_text(json.dumps({**info, "check": {**info["check"], "choice": choice}}))
        made = api.make("x86_64", m, out_dir=tmp_path / choice, run_verify=choice != "knobs")
        t = made.manifest.tuning
        assert t["model_check"] == choice, t
        assert (t["kernels_tuned"], t["kernels_tuned_knobs"], t["kernels_defaulted"]) == (tuned, knobs, defaulted), t
        assert made.verified is None or made.verified.ok
        libs[choice] = next(f.sha256 for f in made.manifest.files if f.path.endswith("model.so"))
    assert len(set(libs.values())) == 3
    plain = api.make("x86_64", m, out_dir=tmp_path / "plain", tuned=False, run_verify=False)
    assert next(f.sha256 for f in plain.manifest.files if f.path.endswith("model.so")) == libs["defaults"]

    # A board that cannot be reached: a clear error, and no verdict is kept.
    forget_checks(db_path)
    with pytest.raises(UserError, match="cannot reach the RPC server"):
        verdict.check(r, p, p.model_id, m, runtime.compiler_versions(), rpc.Endpoint("127.0.0.1", _free_port()),
                      "nowhere")
    assert "check" not in tuning.Store(db_path).model_info(p.model_id)
    info_file.write_text(json.dumps(info))

    # Other tuning (here: other knobs) is not what was timed: unchecked, all of it applies.
    rules[second] = {**rules[second], "knobs": {"nr": 8}}
    (db_path / tuning.RULES).write_text(json.dumps(rules))
    t = api.make("x86_64", m, out_dir=tmp_path / "other", run_verify=False).manifest.tuning
    assert t["model_check"] == "unchecked" and (t["kernels_tuned"], t["kernels_defaulted"]) == (2, 0), t


@needs_tuning
def test_export_import_round_trip(tmp_path, monkeypatch, run_cli):
    """--export writes one file; --import merges it into another machine's (here: another
    folder's) database, dropping duplicates; the imported kernel counts as tuned elsewhere."""
    m = tiny(tmp_path / "tiny.onnx", seed=12)
    tuned = api.tune("x86_64", m, trials=2)
    assert tuned.measured == 2
    source = tuning.Store(tuned.database.path)
    assert source.rule_schedules() and source.defaults()
    f = tmp_path / "records.jsonl"
    code, out, err = run_cli("tune", "x86_64", "--export", str(f), "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["exported"] == 2
    header = json.loads(f.read_text().splitlines()[0])
    assert header["target"] == tuning.board_target(recipe.load("x86_64")) and header["records"] == 2

    monkeypatch.setenv("TVMBUNDLE_TUNING_DIR", str(tmp_path / "elsewhere"))
    assert tuning.find(_model_id(m), recipe.load("x86_64"), runtime.compiler_versions()) is None
    code, out, err = run_cli("tune", "x86_64", "--import", str(f), "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["imported"] == 2 and json.loads(out)["records"] == 2
    code, out, err = run_cli("tune", "x86_64", "--import", str(f), "--json", "-q")
    assert code == 0 and json.loads(out)["imported"] == 0 and json.loads(out)["records"] == 2   # duplicates dropped

    # Already tuned here, from the import (records, default timings and knobs): nothing to
    # measure; make applies it as another's.
    assert api.tune("x86_64", m, trials=2).stopped == "already tuned"
    from bundler.compile import prepared as prepared_mod

    p = prepared_mod.prepare(m, None)
    db = tuning.find(p.model_id, recipe.load("x86_64"), runtime.compiler_versions())
    default_times(db.path, 1e9)
    applied = db.for_model(p, p.model_id, m, recipe.load("x86_64"))
    assert (applied.kernels, applied.tuned, applied.reused, applied.defaulted) == (1, 0, 1, 0)
    assert applied.path is not None and len((applied.path / tuning.RECORDS).read_text().splitlines()) == 1

    # Records for another target are refused, not mixed in.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({**header, "target": {"kind": "llvm", "mcpu": "other"}}) + "\n")
    code, out, err = run_cli("tune", "x86_64", "--import", str(other), "-q")
    assert code != 0 and "target" in err


def test_timings_of_other_default_schedules_are_measured_again(tmp_path, monkeypatch, caplog):
    """Default-schedule timings and knobs are stamped with the schedules they were measured
    against: after an upgrade that changes the schedules, make applies no record on their word
    (a record that beat the old defaults may lose to the new), tune measures them again, and
    an export from the other version brings its records but not its timings."""
    from bundler.compile import prepared as prepared_mod

    m = tiny(tmp_path / "tiny.onnx", seed=21)
    r = recipe.load("x86_64")
    db_path = api.tune("x86_64", m, trials=2).database.path
    default_times(db_path, 1e9)                       # the records beat the default schedule
    p = prepared_mod.prepare(m, None)
    db = tuning.find(p.model_id, r, runtime.compiler_versions())
    assert db.for_model(p, p.model_id, m, r).path is not None
    f = tmp_path / "records.jsonl"
    tuning.export_records(tuning.Store(db_path), f, tuning.board_target(r), runtime.compiler_versions())

    monkeypatch.setattr(tuning, "pipeline_identity", lambda: "other schedules")
    store = tuning.Store(db_path)
    assert not store.current() and store.defaults() == {} and store.rule_schedules() == {}
    with caplog.at_level("WARNING", logger="tvmbundle"):
        applied = db.for_model(p, p.model_id, m, r)
    assert applied.path is None and (applied.tuned, applied.defaulted) == (0, 1)
    assert "another tvmbundle version" in caplog.text

    again = api.tune("x86_64", m, trials=2)           # the budget is spent, the timings are not
    assert again.stopped != "already tuned" and again.measured == 0
    assert store.current() and len(store.defaults()) == 1 and store.rule_schedules()

    monkeypatch.setenv("TVMBUNDLE_TUNING_DIR", str(tmp_path / "elsewhere"))
    elsewhere = tuning.open_store(tuning.board_target(r), runtime.compiler_versions())
    added, _dup = tuning.import_records(elsewhere, f, tuning.board_target(r), runtime.compiler_versions())
    assert added == 2 and elsewhere.defaults() == {} and not elsewhere.current()


def test_per_model_databases_of_earlier_versions_are_merged(tmp_path):
    """A folder of the old layout (tuning/<model key>/) is merged into the shared database once."""
    r = recipe.load("x86_64")
    target, versions = tuning.board_target(r), runtime.compiler_versions()
    old = tuning.root() / tuning.legacy_key("m" * 64, target, versions)
    old.mkdir(parents=True)
    (old / tuning.WORKLOADS).write_text(json.dumps(["123", "e30="]) + "\n")
    rec = [[[], []], [1e-5], {"kind": "llvm"}, []]
    (old / tuning.RECORDS).write_text(json.dumps([0, rec]) + "\n" + json.dumps([0, rec]) + "\n")
    (old / tuning.META).write_text(json.dumps({"model_sha256": "m" * 64, "model": "old.onnx", "target": target,
                                               **versions}))
    for _ in range(2):                          # the second look merges nothing again
        store = tuning.open_store(target, versions)
        assert _records_by_kernel(store.path) == {"123": 1}     # the duplicate dropped too
    assert store.model_info("m" * 64)["measured"] == ["123"]


def test_budget_follows_each_kernels_share():
    assert tuning.allocate(10, [3.0, 1.0, 1.0]) == [6, 2, 2]
    assert tuning.allocate(1, [1.0, 5.0]) == [0, 1]
    assert sum(tuning.allocate(64, [float(i) for i in range(1, 63)])) == 64


def test_the_whole_model_check_keeps_the_tuning_through_noise():
    """A less tuned variant replaces a more tuned one only when it is faster by more than the margin."""
    from bundler.compile.verdict import MARGIN, choose

    three = ["tuned", "knobs", "defaults"]
    assert choose(three, {"tuned": 1.67, "knobs": 1.68, "defaults": 1.66}) == "tuned"    # a tie: noise
    assert choose(three, {"tuned": 2.00, "knobs": 1.90, "defaults": 1.89}) == "knobs"    # 5% faster; 0.5% more is noise
    assert choose(three, {"tuned": 2.00, "knobs": 1.95, "defaults": 1.80}) == "defaults"
    assert choose(["tuned", "defaults"], {"tuned": 1.0, "defaults": 1.0 - MARGIN * 1.01}) == "defaults"
    assert choose(["tuned", "defaults"], {"tuned": 1.0, "defaults": 1.0 - MARGIN * 0.99}) == "tuned"


_SLOW_MARK = "TVMBUNDLE_TEST_SLOW_EXPORT"


def _slow_after_two(mod):
    """An f_export for the builder: the first two builds of the (single) worker export at once
    (the first round's two candidates: the default schedules and their knobs were measured by an
    earlier run), every later one hangs (a build that would take minutes)."""
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export

    n = globals()["_calls"] = globals().get("_calls", 0) + 1
    if n > 2:
        Path(os.environ[_SLOW_MARK]).write_text(str(os.getpid()))
        time.sleep(600)
    return default_export(mod)


@needs_tuning
@pytest.mark.slow
def test_the_time_limit_ends_a_round_in_progress(tmp_path, monkeypatch):
    """A build that would take ten minutes is in flight when the limit comes: the run ends then,
    kills that build, and keeps the round measured before it."""
    from tvm.s_tir import meta_schedule as ms

    from bundler.compile import prepared as prepared_mod

    mark = tmp_path / "slow.pid"
    monkeypatch.setenv(_SLOW_MARK, str(mark))
    m = two_kernels(tmp_path / "b.onnx", seed=5)
    r = recipe.load("x86_64")
    p = prepared_mod.prepare(m, None)
    first = tuning.tune(r, p, p.model_id, m, runtime.compiler_versions(), trials=0, timeout=0,
                        runner=ms.runner.LocalRunner(timeout_sec=60, initializer=tuning.ignore_sigint()),
                        builder=tuning.CandidateBuilder(workers=1), runner_name="local")
    assert first.measured == 0 and first.stopped == "budget"     # the default schedules' knobs only
    builder = tuning.CandidateBuilder(workers=1, timeout=900, f_export=_slow_after_two)
    runner = ms.runner.LocalRunner(timeout_sec=60, initializer=tuning.ignore_sigint())
    start = time.monotonic()
    result = tuning.tune(r, p, p.model_id, m, runtime.compiler_versions(), trials=4, timeout=40, runner=runner,
                         builder=builder, runner_name="local")
    assert time.monotonic() - start < 100              # returned: not after the 600 s build
    assert result.stopped == "time limit"
    assert mark.is_file(), "the limit came before the second round: the machine is too slow for this test"
    assert result.measured == 2 and result.kernels_measured == 1        # the first round, kept
    assert sum(_records_by_kernel(result.database.path).values()) == 2
    pid = int(mark.read_text())
    for _ in range(50):                                 # the hanging build was killed
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()


def interrupt_tune(model: Path, trials: int, ready, settle: float = 0.0) -> tuple[int, str, float]:
    """Run `tvmbundle tune` in a session of its own, wait (at most 120 s) until ``ready(pid)`` says
    the moment has come, then Ctrl-C it as a terminal does (SIGINT to the whole process group).
    (returncode, stderr, seconds it took to stop after the signal)."""
    import signal

    p = subprocess.Popen([sys.executable, "-m", "bundler", "tune", "x86_64", "--model", str(model), "--trials",
                          str(trials), "-q"], cwd=Path(__file__).resolve().parent.parent, env=dict(os.environ),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None and not ready(p.pid):
            time.sleep(0.01)
        assert p.poll() is None and ready(p.pid), f"not ready after 120 s: {p.communicate()[1]}"
        time.sleep(settle)
        os.killpg(p.pid, signal.SIGINT)
        t0 = time.monotonic()
        _, err = p.communicate(timeout=60)
        return p.returncode, err, time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@needs_tuning
@pytest.mark.slow
def test_ctrl_c_keeps_what_was_measured(tmp_path, own_tuning_dir):
    """Ctrl-C in the middle of a run: exit 130 within seconds, no traceback from tvmbundle or its
    workers, the records kept."""
    m = tiny(tmp_path / "tiny.onnx", seed=13)

    def records(_pid=None) -> Path | None:
        found = glob.glob(str(own_tuning_dir / "*" / tuning.RECORDS))
        return Path(found[0]) if found and Path(found[0]).read_text().count("\n") >= 1 else None

    code, err, took = interrupt_tune(m, 100000, records, settle=1.0)     # settle: into the next round
    assert code == 130, err
    assert "Traceback" not in err and "what was measured is kept" in err, err
    kept = [line for line in records().read_text().splitlines() if line.strip()]
    assert kept and all(json.loads(line)[0] == 0 for line in kept)
    assert took < 30, f"took {took:.0f} s to stop"


@pytest.mark.slow
@needs_tuning
def test_ctrl_c_in_the_whole_model_check(tmp_path):
    """Ctrl-C while the whole-model check's timing process is starting (its imports): exit 130,
    no traceback from either process, the process gone, the tuning kept and the check left undone.
    (The timing process is in a process group of its own, so the Ctrl-C reaches tune alone.)"""
    m = two_kernels(tmp_path / "two.onnx", seed=32)
    first = api.tune("x86_64", m, trials=2)
    default_times(first.database.path, 1e9)           # its records apply: the next run checks the model

    def timers(session: int) -> list[str]:
        ps = subprocess.run(["pgrep", "-s", str(session), "-f", "verdict import _chil[d]"], capture_output=True,
                            text=True)
        return ps.stdout.split()

    session = []
    code, err, _ = interrupt_tune(m, 2, lambda pid: session.append(pid) or timers(pid))
    assert code == 130, err
    assert "Traceback" not in err and "what was measured is kept" in err, err
    assert not timers(session[-1])
    store = tuning.Store(first.database.path)
    assert store.by_workload() and "check" not in store.model_info(_model_id(m))


@pytest.mark.slow
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
    # The default schedule and its knob variants were measured there too.
    assert result.variants > 0
    assert all(e["secs"] < tuning.FAILED for e in tuning.Store(db.path).rule_schedules().values())
    made = api.make("aarch64", m, out_dir=tmp_path / "dist")
    assert made.manifest.tuning["database"] == db.key
    assert made.verified and made.verified.ok    # its selftest under qemu-aarch64


def test_foreign_board_needs_a_device(tmp_path):
    with pytest.raises(UserError, match="over TVM's RPC"):
        rpc.measure_setup(recipe.load("aarch64"), None)


@pytest.mark.slow
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
        for outside in ("../etc/passwd", "/etc/passwd"):
            with pytest.raises(Exception, match=f"refusing path '{outside}' outside the session folder"):
                sess.download(outside)
        t = __import__("tvm").runtime.empty((64,), "float32", sess.cpu())
        sess.get_function("tvm.contrib.random.random_fill_for_measure")(t)
        a = t.numpy()
        assert a.std() > 0 and np.all(np.abs(a) <= 1)


def test_recipe_tune_keys(tmp_path):
    bad = tmp_path / "b.toml"
    bad.write_text('format = 1\nextends = "x86_64"\n[tune]\ntrials = -1\n')
    with pytest.raises(UserError, match="tune.trials: expected an integer from 0"):
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




@pytest.mark.slow
@needs_tuning
def test_tune_on_a_device_over_ssh_leaves_nothing_behind(tmp_path, devices):
    """--host: the RPC server goes to the device, listens on its loopback only, is reached through
    the SSH connection, measures (the candidates, then the whole model with and without its
    tuning), and is stopped and removed. The device is a booted Debian 12 root (tests/devices.py)
    on this x86_64 machine, logged into as its normal user pi, so the x86_64 board's server runs
    there natively."""
    if recipe.host_cpu_family() != "x86_64":
        pytest.skip("the device is this machine: needs an x86_64 build machine")
    m = two_kernels(tmp_path / "two.onnx", seed=10)
    (dev,) = devices.add(1)
    opts = {"identity": dev.key, "known_hosts": dev.known_hosts}
    result = api.tune("x86_64", m, trials=2, host=f"pi@{dev.host}:{dev.port}", ssh_options=opts)
    assert result.measured == 2 and result.database is not None
    where = f"RPC (pi@{dev.host}:{dev.port} via SSH)"
    assert result.database.meta["runner"] == where
    assert result.check is None or result.check["where"] == where     # None: no tuning beat the defaults
    # Default schedules made slow on paper: their records apply, so a second run (with nothing left to
    # measure, or a little) must time the whole model on the device.
    default_times(result.database.path, 1e9)
    again = api.tune("x86_64", m, trials=2, host=f"pi@{dev.host}:{dev.port}", ssh_options=opts)
    assert again.check is not None and again.check["where"] == where and again.check["measured"], again.check
    assert again.check["rounds"] > 0 and all(ms > 0 for ms in again.check["ms"].values())
    assert dev.sh("ls -d /tmp/tvmbundle-rpc.* 2>/dev/null", user="pi").stdout.strip() == ""   # its folder is gone
    # [y]: the pattern must not match the shell that runs pgrep, whose own argv holds it.
    ps = dev.sh("pgrep -u pi -f 'tvm-deplo[y] rpc' || true", user="pi")
    assert ps.stdout.strip() == "", "the RPC server was left running"


@pytest.mark.slow
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


def depthwise(path: Path, seed: int = 4) -> Path:
    """A 3x3 depthwise convolution on a 32-channel 14x14 map with a bias and ReLU: one kernel,
    scheduled by the Conv2D rule, whose knobs (rows and pixels per tile) `tune` varies."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 1, 3, 3)).astype(np.float32) * 0.3, "w"),
             numpy_helper.from_array(rng.standard_normal((32,)).astype(np.float32) * 0.1, "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1] * 4, group=32),
             helper.make_node("Relu", ["c"], ["y"])]
    g = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 14, 14])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 14, 14])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


@needs_tuning
def test_tune_searches_the_default_schedules_knobs_and_make_applies_the_faster(tmp_path, run_cli):
    """--trials 0 measures only the default schedule of each kernel and variants of its rule's
    knobs, and keeps the best; make applies knobs that beat the rule's own choices (the manifest
    counts them, and the bundle's selftest passes with them) and ignores knobs that do not."""
    m = depthwise(tmp_path / "dw.onnx")
    code, out, err = run_cli("tune", "x86_64", "--model", str(m), "--trials", "0", "--json", "-q")
    assert code == 0, err
    res = json.loads(out)
    assert res["measured"] == 0 and res["rule_variants"] > 2 and res["stopped"] == "budget", res
    db_path = Path(res["database"])
    (shash,) = _kernels(m)
    entry = tuning.Store(db_path).rule_schedules()[shash]
    assert entry["rule"] == "Conv2D" and entry["variants"] == res["rule_variants"]
    assert entry["secs"] <= entry["default_secs"] == default_times(db_path)[shash]

    # Again: nothing left to measure.
    code, out, err = run_cli("tune", "x86_64", "--model", str(m), "--trials", "0", "--json", "-q")
    assert code == 0 and json.loads(out)["stopped"] == "already tuned", (out, err)

    # Timings fixed, so that what make does does not depend on this machine's noise.
    rules = json.loads((db_path / tuning.RULES).read_text())
    rules[shash] = {**entry, "knobs": {"rows": 2, "pixels": 14}, "secs": 1e-6, "default_secs": 1e-3}
    (db_path / tuning.RULES).write_text(json.dumps(rules))
    forget_checks(db_path)
    made = api.make("x86_64", m, out_dir=tmp_path / "a", run_verify=True)
    t = made.manifest.tuning
    assert (t["kernels"], t["kernels_tuned"], t["kernels_tuned_knobs"], t["kernels_defaulted"]) == (1, 1, 1, 0), t

    rules[shash] = {**entry, "knobs": {"rows": 2, "pixels": 14}, "secs": 1e-3, "default_secs": 1e-3}
    (db_path / tuning.RULES).write_text(json.dumps(rules))
    default_times(db_path, 1e-3)
    plain = api.make("x86_64", m, out_dir=tmp_path / "b", run_verify=True)
    t = plain.manifest.tuning
    assert (t["kernels_tuned_knobs"], t["kernels_defaulted"]) == (0, 1), t
    so = [f for f in made.manifest.files if f.path.endswith("model.so")]
    so2 = [f for f in plain.manifest.files if f.path.endswith("model.so")]
    assert so and so2 and so[0].sha256 != so2[0].sha256       # another kernel, not a cache hit


def _threads_here() -> str:
    import tvm

    return f"{os.environ.get('TVM_NUM_THREADS')}/{tvm.get_global_func('runtime.NumThreads')()}"


def test_the_local_runner_measures_with_the_bundles_threads(tmp_path):
    """Candidates are timed with the threads the bundle runs with (service.threads), not TVM's
    default of one per core, whatever this process's environment says. (One thread: TVM caps the
    count at the machine's cores, and the machines running this have two or more.)"""
    board = tmp_path / "one.toml"
    board.write_text('format = 1\nextends = "x86_64"\n[service]\nthreads = 1\n')
    _builder, runner, where = rpc.measure_setup(recipe.load(str(board)), None)
    assert where == "local"
    try:
        assert runner.pool.submit(_threads_here).result(timeout=120) == "1/1"
    finally:
        tuning._shutdown(runner.pool)


@pytest.mark.slow
def test_knobs_found_for_aarch64_compute_what_onnxruntime_computes_under_qemu(tmp_path):
    """Knobs for a NEON target (4 lanes: other tile choices than this machine's) in the aarch64
    board's database, as `tune` on a board would leave them (written here: timings under qemu mean
    nothing, so which knobs win there is chance): make schedules the kernel with them, and the
    bundle's selftest under qemu-aarch64 agrees with onnxruntime."""
    from bundler.compile import prepared as prepared_mod
    from bundler.compile.schedules import kernel_key

    m = depthwise(tmp_path / "dw.onnx", seed=6)
    r = recipe.load("aarch64")
    p = prepared_mod.prepare(m, None)
    tasks, weights = tuning.extract_with_weights(p, m, r)
    (task,) = tasks
    shash = tuning._describe(task)["workload"]
    store = tuning.open_store(tuning.board_target(r), runtime.compiler_versions())
    store.add_defaults({shash: 1e-3})
    store.add_rule_schedules({shash: {"key": kernel_key(task.dispatched[0]["main"]), "rule": "Conv2D",
                                      "knobs": {"rows": 2, "pixels": 14}, "secs": 1e-4, "default_secs": 1e-3}})
    made = api.make("aarch64", m, out_dir=tmp_path / "dist")
    t = made.manifest.tuning
    assert (t["kernels"], t["kernels_tuned_knobs"], t["kernels_defaulted"]) == (1, 1, 0), t
    assert made.verified and made.verified.ok, made.verified
    plain = api.make("aarch64", m, out_dir=tmp_path / "plain", tuned=False, run_verify=False)

    def model_so(res):
        return next(f.sha256 for f in res.manifest.files if f.path.endswith("model.so"))

    assert model_so(made) != model_so(plain)       # the knobs changed the kernel (7 rows, 7 pixels alone)
