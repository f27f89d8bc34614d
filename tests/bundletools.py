"""Changing built bundles in tests: the faults verify, deploy and serve must catch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bundler.package import bundle


def repack(src: Path, dest_dir: Path, mutate, *, fix_manifest: bool = True) -> Path:
    """Unpack ``src``, let ``mutate(top)`` change it, optionally re-record the checksums, pack again."""
    work = dest_dir / "work"
    top = bundle.extract(src, work)
    mutate(top)
    if fix_manifest:
        manifest = json.loads((top / "manifest.json").read_text())
        rels = sorted(p.relative_to(top).as_posix() for p in top.rglob("*")
                      if p.is_file() and p.name != "manifest.json")
        manifest["files"] = [bundle.file_entry(top, r).to_json() for r in rels]
        (top / "manifest.json").write_text(json.dumps(manifest, indent=2))
    out = dest_dir / src.name
    bundle.write_tarball(top, top.name, out, bundle.DEFAULT_EPOCH)
    return out


def perturb_expected(top: Path, index: int = 0, at: int = 0, by: float = 1.0) -> None:
    """Shift one element of a bundled expected output, so the bundle's selftest must fail."""
    p = top / "selftest" / f"expected_{index}.npy"
    a = np.load(p)
    a.flat[at] += by
    np.save(p, a)
