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
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler import cache
from bundler.errors import UserError

# Part of the cache key: bump when this module changes what it stores.
PREPARED_VERSION = 1
GRAPH = "prepared.onnx"


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: its name, numpy dtype name and static shape."""

    name: str
    dtype: str              # numpy dtype name: "float32", "int64", "uint8", "bool", ...
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]))


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


_SHAPE_FORM = "expected NAME=D0,D1,... with positive integer dims, e.g. input=1,3,224,224"


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"x=1,3,224,224"`` -> ``("x", (1, 3, 224, 224))``, for ``--input-shape``.

    The name is everything before the last ``=`` (ONNX names may hold ``:``, ``/``, ``.``).
    """
    name, eq, dims = text.rpartition("=")
    name = name.strip()
    if not eq:
        problem = "no '='"
    elif not name:
        problem = "no input name before '='"
    elif not dims.strip():
        problem = "no dims after '='"
    else:
        bad = [d.strip() for d in dims.split(",") if not (re.fullmatch(r"[0-9]+", d.strip()) and int(d) > 0)]
        problem = f"{bad[0]!r} is not a positive integer" if bad else ""
    if problem:
        raise UserError(f"--input-shape {text!r}: {problem}; {_SHAPE_FORM}")
    return name, tuple(int(d) for d in dims.split(","))


def _code_identity() -> str:
    """The preparation code's version: the hash of onnxmodel.py itself, read without importing it
    (which would load onnx), so any change to how models are prepared misses the cache."""
    return cache.sha256_file(Path(__file__).with_name("onnxmodel.py"))


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
