"""The bundle's manifest: one typed, validated record of what a bundle holds.

Every reader (verify, deploy, status, export, bench, the .deb) loads it through
:meth:`Manifest.load`, which checks it once against these dataclasses: every path must stay
inside the release, and every value that reaches a unit or a path on the device obeys the
same rules as the recipe that produced it (:mod:`bundler.config.values`). A crafted bundle is
refused before anything reads its files.

It is written in one canonical form (:meth:`Manifest.dumps`: sorted keys, fixed separators, a
final newline), so the same bundle gives the same bytes whatever the order in which the
build process happened to fill its dictionaries. docs/bundle-format.md documents each field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bundler.config import schema, values
from bundler.config.schema import field
from bundler.errors import UserError

FORMAT = 1
MANIFEST = "manifest.json"
LICENSE = "Apache-2.0"        # of what every bundle holds: the TVM runtime, tvm-ffi and the tvm-deploy harness


def _mode(v: str) -> str | None:
    return None if v in ("0755", "0644") else f"{v!r} is not allowed; expected '0755' or '0644'"


def _positive(v: int) -> str | None:
    return None if v >= 0 else f"expected a size of 0 or more, got {v}"


def _dtype(v: str) -> str | None:
    allowed = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
               "uint32", "uint64", "bool")
    return None if v in allowed else f"{v!r} is not allowed; expected one of {', '.join(allowed)}"


def _threads(v: int) -> str | None:
    return None if 1 <= v <= 1024 else f"expected an integer from 1 to 1024, got {v}"


@dataclass(frozen=True)
class FileEntry:
    path: str = field(check=values.release_path)
    sha256: str = field(check=values.sha256_hex)
    size: int = field(check=_positive)
    mode: str = field(check=_mode)

    def to_json(self) -> dict[str, Any]:
        return schema.dump(self)


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str = field(check=_dtype)
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Board:
    name: str = field(check=values.bundle_name)
    title: str
    cpu_family: str
    cpu: str
    triple: str
    glibc: str
    glibcxx: str | None = None
    float_abi: str | None = None
    base_libs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Model:
    file: str = field(check=values.release_path)
    source: str
    source_sha256: str = field(check=values.sha256_hex)
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


@dataclass(frozen=True)
class Selftest:
    inputs: tuple[str, ...] = field(check=values.each(values.release_path))
    expected: tuple[str, ...] = field(check=values.each(values.release_path))
    rtol: float
    atol: float
    seed: int
    reference: str


@dataclass(frozen=True)
class Install:
    prefix: str = field(check=values.install_prefix)


@dataclass(frozen=True)
class Service:
    listen: str = field(check=values.listen_address)
    threads: int = field(check=_threads)
    user: str = field(check=values.unix_user)
    environment: dict[str, str] = field(default={}, check=values.environment)


@dataclass(frozen=True)
class Manifest:
    format: int
    bundle_id: str = field(check=values.sha256_hex)
    name: str = field(check=values.bundle_name)
    created: str
    board: Board
    target: dict[str, Any]              # handed to tvm.target.Target as it is
    compiler: dict[str, str]            # apache-tvm and apache-tvm-ffi versions
    runtime: dict[str, Any]             # where the runtime came from: wheel or source build facts
    model: Model
    selftest: Selftest
    install: Install
    service: Service
    files: tuple[FileEntry, ...]
    tuning: dict[str, Any] | None = None

    # --- reading ---------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise UserError(f"{where}: format: {data.get('format')!r} is not allowed; "
                            f"this tvmbundle reads format {FORMAT}")
        m = schema.load(cls, data, where)
        seen: set[str] = set()
        for f in m.files:
            if f.path in seen:
                raise UserError(f"{where}: files: {f.path!r} is listed twice")
            if f.path == MANIFEST:
                raise UserError(f"{where}: files: {MANIFEST!r} cannot list itself")
            seen.add(f.path)
        for key, path in (("model.file", m.model.file), *(("selftest.inputs", p) for p in m.selftest.inputs),
                          *(("selftest.expected", p) for p in m.selftest.expected)):
            if path not in seen:
                raise UserError(f"{where}: {key}: {path!r} is not one of the bundle's files")
        return m

    @classmethod
    def load(cls, top: Path, origin: str) -> Manifest:
        """The manifest of the release unpacked at ``top``; ``origin`` names the bundle in errors."""
        where = f"{origin}: {MANIFEST}"
        try:
            data = json.loads((top / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{where}: unreadable: {e}") from None
        return cls.from_json(data, where)

    # --- writing ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return schema.dump(self)

    def dumps(self) -> str:
        return canonical_json(self.to_json())

    def identity(self) -> dict[str, Any]:
        """What the bundle id hashes besides the files: everything but format, id and files."""
        d = self.to_json()
        for k in ("format", "bundle_id", "files"):
            d.pop(k)
        return d

    def with_id(self, bundle_id: str) -> Manifest:
        return replace(self, bundle_id=bundle_id)

    # --- what readers ask ------------------------------------------------------------------

    @property
    def short_id(self) -> str:
        return self.bundle_id[:12]

    def agent_files(self) -> list[FileEntry]:
        """The files that run on the device for deploy and the fleet exports: the harness and its
        libraries (the "agent", the way Ansible ships its modules)."""
        return sorted((f for f in self.files if f.path == "bin/tvm-deploy" or f.path.startswith("lib/")),
                      key=lambda f: f.path)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


def agent_id(files: list[FileEntry]) -> str:
    """The agent's identity, what its folder on the device is named after: its files' contents."""
    return hashlib.sha256("".join(f"{f.sha256} {f.path}\n" for f in files).encode()).hexdigest()[:16]


def canonical_json(data: Any) -> str:
    """The one way tvmbundle writes JSON that is hashed or shipped: sorted keys, two-space indent,
    ASCII only, a final newline."""
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=True, separators=(",", ": ")) + "\n"
