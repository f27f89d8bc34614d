"""Shared fixtures: every test runs with its own HOME, cache and working folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """A private HOME, no recipe path from the caller's shell, and no inherited SOURCE_DATE_EPOCH."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    for var in ("TVMBUNDLE_RECIPE_PATH", "SOURCE_DATE_EPOCH", "XDG_CACHE_HOME", "TVM_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    # The build cache is shared by the whole session on purpose (a runtime download or a model
    # compile is slow); tests that examine caching point TVMBUNDLE_CACHE at their own folder.
    monkeypatch.setenv("TVMBUNDLE_CACHE", str(session_cache(tmp_path_factory)))
    monkeypatch.chdir(REPO)
    yield


_CACHE: list[Path] = []


def session_cache(factory) -> Path:
    if os.environ.get("TVMBUNDLE_TEST_CACHE"):
        return Path(os.environ["TVMBUNDLE_TEST_CACHE"])
    if not _CACHE:
        _CACHE.append(factory.mktemp("cache"))
    return _CACHE[0]


@pytest.fixture
def run_cli(capsys):
    """Call the CLI in-process: returns (exit code, stdout, stderr)."""
    from bundler.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


# Devices with a real systemd (tests/devices.py): booted once per session from a cached root.
from tests.devices import device_root, devices  # noqa: E402,F401
