"""The prepared model as a cached build step, so that a make with nothing changed is instant.

Preparing a model (fixing shapes, folding, checking every operator against TVM's frontend)
loads onnx and TVM and walks the whole graph: seconds for a real model. Its result depends
only on the file's bytes, the requested shapes and the preparation code, so it is cached under
exactly that key, and a hit needs neither onnx nor TVM: the signature and the prepared graph's
identity (``model_id``, what the compile and selftest steps are keyed by) come from the cache
entry's metadata. The graph itself is loaded only when a later step has to build.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler import cache
from bundler.compile.signature import TensorSpec
from bundler.errors import UserError

# Part of the cache key: bump when this module changes what it stores.
PREPARED_VERSION = 1
GRAPH = "prepared.onnx"


@dataclass(frozen=True)
class Prepared:
    source: Path
    source_sha256: str
    model_id: str                     # sha256 of the prepared graph: what compile and vectors are keyed by
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    folded_nodes: int
    graph: Path                       # the prepared graph, in the cache
    cached: bool

    def load(self):
        """The prepared graph as an ``onnx.ModelProto``, for the steps that build."""
        import onnx  # a quarter of a second to import: a warm make does not pay it

        return onnx.load(str(self.graph))


def _code_identity() -> list[str]:
    """The preparation code's version: the hashes of the modules that prepare a model, read
    without importing them (which would load onnx), so any change to how models are prepared
    misses the cache."""
    here = Path(__file__).parent
    return [cache.sha256_file(here / name) for name in ("onnxmodel.py", "signature.py")]


def _sha256(path: Path) -> str:
    try:
        return cache.sha256_file(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such model file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected an ONNX model file") from None


def prepare(source: Path | str, input_shapes: Mapping[str, Sequence[int]] | None = None) -> Prepared:
    """The model at ``source`` prepared for TVM with ``input_shapes``, from the cache when it can."""
    source = Path(source)
    digest = _sha256(source)
    shapes = {k: [int(d) for d in v] for k, v in sorted((input_shapes or {}).items())}
    key = cache.key("prepared", digest, shapes, PREPARED_VERSION, _code_identity(),
                    {d: md.version(d) for d in ("onnx", "apache-tvm")})

    def build(tmp: Path) -> dict[str, Any]:
        from bundler.compile import (
            onnxmodel,  # onnx and TVM load only when a model is prepared
        )

        p = onnxmodel.prepare(source, shapes or None)
        onnxmodel.check_supported(p.model, source)
        data = p.model.SerializeToString(deterministic=True)
        (tmp / GRAPH).write_bytes(data)
        return {"model_id": hashlib.sha256(data).hexdigest(), "source_sha256": p.source_sha256,
                "inputs": [s.to_json() for s in p.inputs], "outputs": [s.to_json() for s in p.outputs],
                "folded_nodes": p.folded_nodes}

    entry = cache.get("prepared", key, build)
    m = entry.meta
    return Prepared(source, m["source_sha256"], m["model_id"],
                    tuple(TensorSpec.from_json(s) for s in m["inputs"]),
                    tuple(TensorSpec.from_json(s) for s in m["outputs"]),
                    int(m["folded_nodes"]), entry.path / GRAPH, entry.hit)
