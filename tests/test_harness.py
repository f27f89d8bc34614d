"""The deploy harness's command line: every bad input gets a one-line error and its exit code.

Exit codes: 0 ok, 1 selftest mismatch, 2 usage or bad input, 3 model or runtime failure.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests import models
from tests.bundletools import perturb_expected, unpacked


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return unpacked(tmp_path_factory, "x86_64", models.multi_io, "multi")


@pytest.fixture(scope="module")
def int_release(tmp_path_factory) -> Path:
    return unpacked(tmp_path_factory, "x86_64", models.int_model, "ints")


def deploy(top: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(top / "bin" / "tvm-deploy"), *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_help_and_version(release):
    res = deploy(release, "--help")
    assert res.returncode == 0 and "selftest" in res.stdout and "serve" in res.stdout
    assert deploy(release, "--version").stdout.startswith("tvm-deploy ")
    res = deploy(release, "frobnicate")
    assert res.returncode == 2 and "unknown command 'frobnicate'" in res.stderr


def test_info_text_and_json(release):
    m = json.loads((release / "manifest.json").read_text())
    text = deploy(release, "info").stdout
    assert m["bundle_id"] in text and "input    image float32(1,3,8,8)" in text
    info = json.loads(deploy(release, "info", "--json").stdout)
    assert info["runtime"]["apache-tvm"] == m["runtime"]["apache-tvm"]
    assert info["outputs"][1] == {"name": "embedding", "dtype": "float32", "shape": [1, 16]}


def test_bench_reports_latency_and_threads(release):
    res = deploy(release, "--threads", "1", "bench", "--warmup", "1", "--repeat", "5", "--json")
    assert res.returncode == 0, res.stderr
    b = json.loads(res.stdout)
    assert b["repeat"] == 5 and b["threads"] == 1
    assert 0 < b["min_ms"] <= b["p50_ms"] <= b["p90_ms"] <= b["max_ms"]
    text = deploy(release, "bench", "--repeat", "3").stdout
    assert "p50" in text and "threads" in text
    res = deploy(release, "bench", "--repeat", "zero")
    assert res.returncode == 2 and "--repeat" in res.stderr


def test_run_named_inputs_and_output_files(release, tmp_path):
    m = json.loads((release / "manifest.json").read_text())
    res = deploy(release, "run", "--output-dir", str(tmp_path / "o"),
                 f"vector={release / m['selftest']['inputs'][1]}", f"image={release / m['selftest']['inputs'][0]}")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["embedding.npy", "scores.npy"]
    np.testing.assert_allclose(np.load(tmp_path / "o" / "scores.npy"),
                               np.load(release / m["selftest"]["expected"][0]), rtol=1e-5, atol=1e-6)


def test_non_float_dtypes_run_and_compare_exactly(int_release, tmp_path):
    assert deploy(int_release, "selftest").returncode == 0
    x = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    np.save(tmp_path / "px.npy", x)
    res = deploy(int_release, "run", "--output-dir", str(tmp_path), str(tmp_path / "px.npy"))
    assert res.returncode == 0, res.stderr
    assert np.load(tmp_path / "total.npy") == x.sum()
    np.testing.assert_allclose(np.load(tmp_path / "scaled.npy"), x / 255.0, rtol=1e-6)
    np.save(tmp_path / "wrong.npy", x.astype(np.int8))
    res = deploy(int_release, "run", str(tmp_path / "wrong.npy"))
    assert res.returncode == 2 and "dtype int8 does not match the model's uint8" in res.stderr


@pytest.mark.parametrize("case, message", [
    ("missing", "cannot open"),
    ("garbage", "not an .npy file"),
    ("truncated", "truncated"),
    ("shape", "shape (1,3,8,9) does not match the model's (1,3,8,8)"),
    ("dtype", "dtype float64 does not match the model's float32"),
    ("fortran", "Fortran-order"),
    ("count", "the model takes 2 input(s), got 1"),
    ("unknown-name", "unknown input 'imgae'; the model's inputs are: image, vector"),
])
def test_run_rejects_bad_inputs_with_exit_2(release, tmp_path, case, message):
    m = json.loads((release / "manifest.json").read_text())
    image = np.load(release / m["selftest"]["inputs"][0])
    vector = str(release / m["selftest"]["inputs"][1])
    p = tmp_path / "in.npy"
    args = [str(p), vector]
    if case == "garbage":
        p.write_bytes(b"hello, not numpy")
    elif case == "truncated":
        np.save(p, image)
        p.write_bytes(p.read_bytes()[:-7])
    elif case == "shape":
        np.save(p, np.zeros((1, 3, 8, 9), np.float32))
    elif case == "dtype":
        np.save(p, image.astype(np.float64))
    elif case == "fortran":
        np.save(p, np.asfortranarray(np.zeros((1, 3, 8, 8), np.float32).transpose(3, 2, 1, 0)).T)
        p.write_bytes(p.read_bytes().replace(b"'fortran_order': False", b"'fortran_order': True "))
    elif case == "count":
        np.save(p, image)
        args = [str(p)]
    elif case == "unknown-name":
        np.save(p, image)
        args = [f"imgae={p}", f"vector={vector}"]
    res = deploy(release, "run", "--output-dir", str(tmp_path), *args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_corrupt_or_missing_model_is_exit_3(release, tmp_path):
    broken = tmp_path / "b"
    shutil.copytree(release, broken)
    (broken / "model" / "model.so").write_bytes(b"\x7fELF" + b"\x00" * 100)
    res = deploy(broken, "selftest")
    assert res.returncode == 3 and "model/model.so: cannot load the model" in res.stderr
    (broken / "model" / "model.so").unlink()
    res = deploy(broken, "selftest")
    assert res.returncode == 3 and "model/model.so: cannot open" in res.stderr
    (broken / "manifest.json").write_text("{not json")
    res = deploy(broken, "info")
    assert res.returncode == 3 and "manifest.json: not valid JSON" in res.stderr


def test_selftest_mismatch_is_exit_1_with_the_worst_difference(release, tmp_path):
    bad = tmp_path / "b"
    shutil.copytree(release, bad)
    perturb_expected(bad, index=1, at=3, by=0.5)
    res = deploy(bad, "selftest", "--json")
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert report["passed"] is False
    emb = report["outputs"][1]
    assert emb["name"] == "embedding" and not emb["passed"] and emb["worst_index"] == 3
    assert abs(emb["max_abs_diff"] - 0.5) < 1e-3
    assert report["outputs"][0]["passed"] is True
