"""Each extra's commands in a virtual environment that has only that extra, made from Debian's own
python3, as scripts/setup makes it: a dependency a command needs but pyproject does not declare
(cloudpickle for tune, once) fails here and not on a user's machine.

Slow: each environment installs apache-tvm (from pip's cache after the first time).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = Path("/usr/bin/python3")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DEBIAN_PYTHON.exists(), reason="needs Debian's /usr/bin/python3"),
              pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (scripts/setup installs it)")]


def venv(tmp_path: Path, extra: str) -> Path:
    env_dir = tmp_path / f"venv-{extra or 'base'}"
    subprocess.run([str(DEBIAN_PYTHON), "-m", "venv", str(env_dir)], check=True, timeout=300)
    spec = f"{REPO}[{extra}]" if extra else str(REPO)
    res = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", spec], capture_output=True, text=True, timeout=1800,
                         env=_env(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    return env_dir


def _env(tmp_path: Path) -> dict[str, str]:
    """The tests' isolated environment, but pip's download cache of the real user, so that each
    environment does not download apache-tvm again."""
    home = pwd.getpwuid(os.getuid()).pw_dir
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.setdefault("PIP_CACHE_DIR", os.environ.get("PIP_CACHE_DIR") or f"{home}/.cache/pip")
    return env


def run(env_dir: Path, tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(env_dir / "bin" / "tvmbundle"), *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=1800, env=_env(tmp_path))


def test_make_works_with_no_extra(tmp_path):
    env_dir = venv(tmp_path, "")
    model = REPO / "examples" / "tinycnn.onnx"
    res = run(env_dir, tmp_path, "make", "x86_64", "--model", str(model), "--out", str(tmp_path / "dist"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert list((tmp_path / "dist").glob("tinycnn-x86_64-*.tar.gz"))


def test_tune_works_with_only_the_tune_extra(tmp_path):
    env_dir = venv(tmp_path, "tune")
    model = REPO / "examples" / "tinycnn.onnx"
    res = run(env_dir, tmp_path, "tune", "x86_64", "--model", str(model), "--trials", "2", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "ModuleNotFoundError" not in res.stderr
