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


def manifest_data(name: str = "net", **sections) -> dict:
    """A complete, valid manifest (format 1) of a made-up bundle, with ``sections`` replaced."""
    sha = "ab" * 32
    data = {
        "format": 1, "bundle_id": "cd" * 32, "name": name, "created": "1980-01-01T00:00:00Z",
        "board": {"name": "rpi4", "title": "Raspberry Pi 4 Model B", "cpu_family": "aarch64",
                  "cpu": "cortex-a72", "triple": "aarch64-linux-gnu", "glibc": "2.36"},
        "target": {"kind": "llvm"}, "compiler": {"apache-tvm": "0.27.0"}, "runtime": {"origin": "wheel"},
        "model": {"file": "model/model.so", "source": f"{name}.onnx", "source_sha256": sha,
                  "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3]}],
                  "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 3]}]},
        "selftest": {"inputs": ["selftest/input_0.npy"], "expected": ["selftest/expected_0.npy"],
                     "rtol": 1e-3, "atol": 1e-4, "seed": 0, "reference": "test"},
        "install": {"prefix": "/opt/tvmbundle"},
        "service": {"listen": "127.0.0.1:8470", "threads": 4, "user": "tvmbundle", "environment": {}},
        "files": [{"path": p, "sha256": sha, "size": 1, "mode": m} for p, m in (
            ("bin/tvm-deploy", "0755"), ("model/model.so", "0755"), ("selftest/input_0.npy", "0644"),
            ("selftest/expected_0.npy", "0644"))],
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return data


def built(factory, board: str, make_model, name: str = "net") -> Path:
    """A bundle (not verified) for ``board`` of the model ``make_model(path)`` writes, in a fresh
    folder of the pytest tmp_path_factory ``factory``; the build cache is the session's."""
    from bundler import api

    d = factory.mktemp(name)
    make_model(d / f"{name}.onnx")
    return api.make(board, d / f"{name}.onnx", out_dir=d / "dist", run_verify=False).bundle


def unpacked(factory, board: str, make_model, name: str = "net") -> Path:
    """:func:`built`, unpacked: the release's top folder."""
    path = built(factory, board, make_model, name)
    return bundle.extract(path, path.parent.parent / "x")


def model_update(factory, board: str = "x86_64") -> tuple[Path, Path]:
    """Two bundles of the same graph with other weights: the second is a model-only update of the first."""
    from bundler import api
    from tests import models

    d = factory.mktemp("bundles")
    models.conv_net(d / "net.onnx", seed=0)
    a = api.make(board, d / "net.onnx", out_dir=d / "a", run_verify=False).bundle
    models.conv_net(d / "net.onnx", seed=1)
    b = api.make(board, d / "net.onnx", out_dir=d / "b", run_verify=False).bundle
    return a, b
