"""Getting an ONNX model ready for TVM: fixed input shapes, shape arithmetic folded away.

Exporters (torch.onnx, tf2onnx) leave graphs that compute shapes at run time
(Shape -> Gather -> Concat -> Reshape) and carry symbolic dims.  Once the input
shapes are fixed, all of that is constant: folding it turns a graph TVM imports
badly or slowly into one it imports in well under a second.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelError, UserError, did_you_mean

# Folding evaluates nodes on the build host; a result larger than this stays a computation.
FOLD_LIMIT_ELEMENTS = 1 << 20
_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"}
_SHAPE_RE = re.compile(r"^\s*([A-Za-z_][\w.:/-]*)\s*=\s*(\d+(?:\s*,\s*\d+)*)\s*$")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str              # numpy dtype name
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]))


@dataclass(frozen=True)
class PreparedModel:
    model: onnx.ModelProto
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    folded_nodes: int
    source_sha256: str


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"x=1,3,224,224"`` -> ``("x", (1, 3, 224, 224))``."""
    m = _SHAPE_RE.match(text)
    if not m or any(int(d) <= 0 for d in m.group(2).split(",")):
        raise UserError(f"--input-shape: {text!r} is not allowed; expected NAME=D0,D1,... with positive "
                        "integers, e.g. input=1,3,224,224")
    return m.group(1), tuple(int(d) for d in m.group(2).split(","))


def load(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None


def _np_dtype(elem_type: int, what: str, path: Path) -> str:
    try:
        dt = helper.tensor_dtype_to_np_dtype(elem_type)
    except Exception:
        dt = None
    if dt is None or elem_type in (TensorProto.BFLOAT16, TensorProto.STRING, TensorProto.UNDEFINED) \
            or np.dtype(dt).kind == "c":
        name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else elem_type
        raise ModelError(f"{path}: {what} has element type {name}, which tvmbundle does not support; "
                         "expected a float, integer or bool type")
    return np.dtype(dt).name


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def prepare(path: Path, input_shapes: Mapping[str, Sequence[int]] | None = None) -> PreparedModel:
    """Fix the input shapes, fold what is constant, and describe inputs and outputs."""
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    model = load(path)
    inputs = _graph_inputs(model)
    names = [i.name for i in inputs]
    given = dict(input_shapes or {})
    for name in given:
        if name not in names:
            raise ModelError(f"{path}: --input-shape names {name!r}, which is not an input of the model"
                             f"{did_you_mean(name, names)}; its inputs are: {', '.join(names)}")

    specs = []
    for vi in inputs:
        dims = _dims(vi)
        dtype = _np_dtype(vi.type.tensor_type.elem_type, f"input {vi.name!r}", path)
        if vi.name in given:
            shape = tuple(int(d) for d in given[vi.name])
            if dims and len(dims) != len(shape):
                raise ModelError(f"{path}: input {vi.name!r} has rank {len(dims)} ({_fmt_dims(dims)}), "
                                 f"the given shape {list(shape)} has rank {len(shape)}")
            for i, (d, s) in enumerate(zip(dims, shape)):
                if isinstance(d, int) and d > 0 and d != s:
                    raise ModelError(f"{path}: input {vi.name!r} dim {i} is fixed to {d} by the model, "
                                     f"the given shape says {s}")
        else:
            dynamic = [(i, d) for i, d in enumerate(dims) if not (isinstance(d, int) and d > 0)]
            if dynamic or not vi.type.tensor_type.HasField("shape"):
                suggestion = ",".join(str(d) if isinstance(d, int) and d > 0 else "1" for d in dims) or "1"
                where = ", ".join(f"dim {i} ({d!r})" if d else f"dim {i} (unknown)" for i, d in dynamic) \
                    or "its shape is unknown"
                raise ModelError(f"{path}: input {vi.name!r} has dynamic dims: {where}; fix them with "
                                 f"--input-shape {vi.name}={suggestion} (or [model] input_shapes in the recipe)")
            shape = tuple(int(d) for d in dims)  # type: ignore[arg-type]
        specs.append(TensorSpec(vi.name, dtype, shape))
        _set_shape(vi, shape)

    model, folded = fold(model, path)
    out_specs = []
    inferred = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.output]}
    for out in model.graph.output:
        vi = inferred.get(out.name, out)
        dims = _dims(vi)
        if not dims and vi.type.tensor_type.HasField("shape"):
            dims = []
        if any(not (isinstance(d, int) and d >= 0) for d in dims) or not vi.type.tensor_type.HasField("shape"):
            raise ModelError(f"{path}: output {out.name!r} has no static shape ({_fmt_dims(dims)}) even with "
                             "the inputs fixed; tvmbundle needs static output shapes")
        dtype = _np_dtype(vi.type.tensor_type.elem_type, f"output {out.name!r}", path)
        out_specs.append(TensorSpec(out.name, dtype, tuple(int(d) for d in dims)))  # type: ignore[arg-type]
    return PreparedModel(model, tuple(specs), tuple(out_specs), folded, hashlib.sha256(data).hexdigest())


def _fmt_dims(dims: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"


def _set_shape(vi: onnx.ValueInfoProto, shape: tuple[int, ...]) -> None:
    t = vi.type.tensor_type
    t.ClearField("shape")
    for d in shape:
        t.shape.dim.add().dim_value = d


def _infer(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:
        raise ModelError(f"{path}: ONNX shape inference failed: {str(e).strip().splitlines()[-1][:300]}") from None


def fold(model: onnx.ModelProto, path: Path) -> tuple[onnx.ModelProto, int]:
    """Constant-fold until nothing changes; returns the model and how many nodes went away."""
    model = _infer(model, path)
    graph = model.graph
    before = len(graph.node)
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    shapes = {vi.name: _dims(vi) for vi in [*graph.input, *graph.value_info, *graph.output]}
    keep: list[onnx.NodeProto] = []
    new_inits: dict[str, np.ndarray] = {}
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        value = _try_fold(node, consts, shapes, model)
        if value is None:
            keep.append(node)
            continue
        for name, arr in zip(node.output, value):
            consts[name] = arr
            new_inits[name] = arr
    if len(keep) == before:
        return model, 0
    # A graph output must stay produced by a node or be an initializer; both are fine for ONNX.
    used = {i for n in keep for i in n.input} | outputs
    for n in keep:
        for attr in n.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                used |= {i for sn in attr.g.node for i in sn.input}
    old_inits = [i for i in graph.initializer if i.name in used]
    added = [numpy_helper.from_array(arr, name) for name, arr in new_inits.items() if name in used]
    del graph.node[:]
    graph.node.extend(keep)
    del graph.initializer[:]
    graph.initializer.extend(old_inits + added)
    del graph.value_info[:]
    model = _infer(model, path)
    model, more = fold(model, path)
    return model, before - len(keep) + more


def _try_fold(node: onnx.NodeProto, consts: Mapping[str, np.ndarray], shapes: Mapping[str, list],
              model: onnx.ModelProto) -> list[np.ndarray] | None:
    if node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC:
        return None
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return None
    if node.op_type == "Shape":
        dims = shapes.get(node.input[0])
        if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
            return None
        start, end = 0, None
        for a in node.attribute:
            if a.name == "start":
                start = a.i
            elif a.name == "end":
                end = a.i
        return [np.array(dims[start:end], dtype=np.int64)]
    if node.op_type == "Size":
        dims = shapes.get(node.input[0])
        if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
            return None
        return [np.array(int(np.prod(dims)), dtype=np.int64)]
    if node.op_type == "Constant":
        pass
    elif not node.input or not all((not i) or i in consts for i in node.input):
        return None
    try:
        from onnx.reference import ReferenceEvaluator

        opset = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
        ins = [helper.make_tensor_value_info(i, TensorProto.UNDEFINED, None) for i in node.input if i]
        outs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output if o]
        single = helper.make_model(helper.make_graph([node], "fold", ins, outs), opset_imports=opset,
                                   ir_version=model.ir_version)
        feeds = {i: consts[i] for i in node.input if i}
        results = ReferenceEvaluator(single).run(None, feeds)
    except Exception:
        return None   # not foldable here; TVM will compute it
    arrays = [np.asarray(r) for r in results]
    if any(a.size > FOLD_LIMIT_ELEMENTS for a in arrays) and node.op_type != "Constant":
        return None
    return arrays


def check_supported(model: onnx.ModelProto, path: Path) -> None:
    """Fail early, naming every node whose operator TVM's ONNX frontend cannot convert."""
    try:
        from tvm.relax.frontend.onnx import onnx_frontend
    except ImportError:  # pragma: no cover - TVM is a dependency
        return
    table = onnx_frontend._get_convert_map()
    missing = [n for n in model.graph.node if n.domain in ("", "ai.onnx") and n.op_type not in table]
    if missing:
        shown = "; ".join(f"node {n.name or '(unnamed)'!r} op {n.op_type}" for n in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), "?")
        raise ModelError(f"{path}: TVM's ONNX frontend has no converter for: {shown}{more} (opset {opset})")
