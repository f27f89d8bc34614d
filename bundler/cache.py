"""A content-addressed cache of build steps.

Every step that costs time (runtime download, harness build, model compile,
selftest vectors) stores its output under ``<root>/<kind>/<key>/`` where the
key hashes everything the output depends on.  Entries are written into a
temporary sibling and renamed into place, so a crash or Ctrl-C never leaves a
half-written entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_DONE = ".complete.json"


def root() -> Path:
    env = os.environ.get("TVMBUNDLE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tvmbundle"


def key(*parts: Any) -> str:
    """A stable hash of JSON-able parts (dict keys sorted)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: Path) -> str:
    """Hash of a directory's relative file names and contents."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
            h.update(sha256_file(p).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Entry:
    kind: str
    key: str
    path: Path
    hit: bool           # True when the entry was already there
    meta: dict[str, Any]


def lookup(kind: str, key_: str) -> Entry | None:
    """The entry for (kind, key) if it is complete, without building it."""
    final = root() / kind / key_
    done = final / _DONE
    if done.is_file():
        return Entry(kind, key_, final, True, json.loads(done.read_text()))
    return None


def get(kind: str, key_: str, build: Callable[[Path], dict[str, Any] | None]) -> Entry:
    """The entry for (kind, key), calling ``build(tmpdir)`` to fill it on a miss.

    ``build`` writes its files into the directory it is given and may return
    metadata, stored beside them and handed back on later hits.
    """
    final = root() / kind / key_
    done = final / _DONE
    if done.is_file():
        return Entry(kind, key_, final, True, json.loads(done.read_text()))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key_}.", dir=final.parent))
    try:
        meta = build(tmp) or {}
        meta = {"created": time.time(), **meta}
        (tmp / _DONE).write_text(json.dumps(meta, sort_keys=True, indent=1))
        if final.exists():          # a stale, incomplete entry from an interrupted run
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:             # another process finished the same entry first
            if not done.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Entry(kind, key_, final, False, meta)


@dataclass(frozen=True)
class Listed:
    kind: str
    key: str
    path: Path
    size: int
    created: float
    meta: dict[str, Any]


def entries() -> Iterator[Listed]:
    base = root()
    if not base.is_dir():
        return
    for kind_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        for e in sorted(kind_dir.iterdir()):
            done = e / _DONE
            if not done.is_file():
                continue
            meta = json.loads(done.read_text())
            size = sum(f.stat().st_size for f in e.rglob("*") if f.is_file())
            yield Listed(kind_dir.name, e.name, e, size, float(meta.get("created", 0)), meta)


def prune(older_than_days: float | None = None, kind: str | None = None) -> list[Listed]:
    """Remove entries (all, or those older than N days, or of one kind); returns what was removed."""
    now = time.time()
    removed = []
    for e in entries():
        if kind and e.kind != kind:
            continue
        if older_than_days is not None and now - e.created < older_than_days * 86400:
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e)
    return removed
