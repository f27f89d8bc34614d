"""Getting an ONNX model ready for TVM: fixed input shapes, shape arithmetic folded away.

Exporters (torch.onnx, tf2onnx) leave graphs that compute shapes at run time
(Shape -> Gather -> Unsqueeze -> Concat -> Reshape) and carry symbolic dims.
Once the input shapes are fixed all of that is constant, and folding it turns a
graph TVM imports badly or slowly into one it imports in well under a second.

:func:`prepare` does, in order:

1. read the file (its sha256 is the source's identity), inline local functions
   (TVM's frontend does not look into them) and drop initializers from the
   graph inputs (they are weights, not inputs, for a deployed model);
2. fix the input shapes: the model's static dims, completed by the shapes the
   user gives (``--input-shape`` or the recipe's ``[model] input_shapes``);
3. shape inference (strict when the model allows it, with data propagation);
4. constant folding until nothing changes: Constant nodes become
   initializers, Shape/Size of tensors with a static shape become constants,
   and any deterministic standard-domain node whose inputs are all constant is
   evaluated with ONNX's reference evaluator and replaced by an initializer;
5. dead nodes, unused initializers and stale value_info are dropped, shapes
   are inferred once more and the outputs must have static shapes.

What is never folded: random operators, nodes with subgraphs (If, Loop, Scan),
nodes outside the standard domain, and results larger than
:data:`FOLD_LIMIT_ELEMENTS` elements unless they are no bigger than their
constant inputs (a Transpose or Cast of a weight): a folded result is stored in
the model, and an ``Expand`` of a scalar to a huge tensor would bloat it.

The result is deterministic: the same file and shapes give a byte-identical
``model.SerializeToString()``.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from bundler.errors import ModelError, UserError, did_you_mean

#: A folded result with more elements than this stays a computation in the graph, unless it
#: is no larger (in bytes) than the constant inputs it replaces.
FOLD_LIMIT_ELEMENTS = 1 << 20

# Operators whose results are not a function of their inputs.
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                               "Multinomial", "Bernoulli", "Dropout"})
_STANDARD_DOMAINS = ("", "ai.onnx")
# Element types a bundle can carry (the deploy harness reads and writes these as .npy).
_DTYPES = {
    TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64", TensorProto.FLOAT16: "float16",
    TensorProto.INT8: "int8", TensorProto.INT16: "int16", TensorProto.INT32: "int32", TensorProto.INT64: "int64",
    TensorProto.UINT8: "uint8", TensorProto.UINT16: "uint16", TensorProto.UINT32: "uint32",
    TensorProto.UINT64: "uint64", TensorProto.BOOL: "bool",
}
# Initializers up to this many elements go into shape inference with their values (shape
# arithmetic needs them); bigger ones (weights) go in as typed inputs, which is much faster.
_INFER_VALUE_LIMIT = 4096
_SHAPE_FORM = "expected NAME=D0,D1,... with positive integer dims, e.g. input=1,3,224,224"


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
class PreparedModel:
    model: onnx.ModelProto          # shapes fixed, shape subgraphs folded, ready for from_onnx
    inputs: tuple[TensorSpec, ...]  # graph inputs that are not initializers, in graph order
    outputs: tuple[TensorSpec, ...] # graph outputs in order, static shapes
    folded_nodes: int               # how many nodes folding (and dead-node removal) took away
    source_sha256: str              # sha256 of the file's bytes


# --- the command line's --input-shape ---------------------------------------------------

def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"x=1,3,224,224"`` -> ``("x", (1, 3, 224, 224))``.

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


# --- reading ------------------------------------------------------------------------------

def load(path: Path) -> onnx.ModelProto:
    """The model in ``path``, with its external data; a :class:`ModelError` naming the file if
    it is missing, not ONNX or damaged."""
    return _read(Path(path))[1]


def _read(path: Path) -> tuple[bytes, onnx.ModelProto]:
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"{path}: not a file; expected an ONNX model file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelError(f"{path}: cannot read the model: {e.strerror or e}") from None
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ModelError(f"{path}: not an ONNX model (it does not parse as one: {_last_line(e)})") from None
    if not data or model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        what = "the file is empty" if not data else "it has no IR version, opset or graph"
        raise ModelError(f"{path}: not an ONNX model ({what})")
    if not model.graph.output:
        raise ModelError(f"{path}: the model's graph has no outputs")
    if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as e:
            raise ModelError(f"{path}: cannot load the model's external data (beside the file): "
                             f"{_last_line(e)}") from None
    return data, model


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[-1] if text else type(e).__name__)[:300]


# --- prepare ------------------------------------------------------------------------------

def prepare(path: Path, input_shapes: Mapping[str, Sequence[int]] | None = None) -> PreparedModel:
    """Fix the input shapes, fold what is constant, and describe the inputs and outputs."""
    path = Path(path)
    data, model = _read(path)
    if model.functions:
        model = _inline(model, path)
    _drop_initializer_inputs(model)
    specs = _fix_inputs(model, dict(input_shapes or {}), path)
    before = len(model.graph.node)
    strict_error = _fold(model, path)
    outputs = _output_specs(model, path, strict_error)
    return PreparedModel(model, specs, outputs, before - len(model.graph.node), hashlib.sha256(data).hexdigest())


def _inline(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    import onnx.inliner

    try:
        return onnx.inliner.inline_local_functions(model)
    except Exception as e:
        raise ModelError(f"{path}: cannot inline the model's local functions: {_last_line(e)}") from None


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Inputs backed by an initializer are weights with a default: for a deployed model they
    are constants (TVM treats them so too).  IR 4 lets initializers be absent from the inputs."""
    inits = {i.name for i in model.graph.initializer}
    if not any(i.name in inits for i in model.graph.input):
        return
    _replace(model.graph.input, [i for i in model.graph.input if i.name not in inits])
    model.ir_version = max(model.ir_version, 4)


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """The dims of a tensor value: an int when static, the symbol or None when not; None for
    an unknown rank."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
            for d in t.shape.dim]


def _is_static(dims: Sequence[Any] | None) -> bool:
    return dims is not None and all(isinstance(d, int) for d in dims)


def _fmt_dims(dims: Sequence[Any] | None) -> str:
    if dims is None:
        return "unknown rank"
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _dtype(vi: onnx.ValueInfoProto, what: str, path: Path) -> str:
    if not vi.type.HasField("tensor_type"):
        kind = vi.type.WhichOneof("value") or "untyped value"
        raise ModelError(f"{path}: {what} is a {kind.replace('_type', '')}, not a tensor; "
                         "tvmbundle supports tensor inputs and outputs only")
    elem = vi.type.tensor_type.elem_type
    if elem not in _DTYPES:
        name = TensorProto.DataType.Name(elem) if elem in TensorProto.DataType.values() else str(elem)
        raise ModelError(f"{path}: {what} has element type {name}, which tvmbundle does not support; "
                         f"supported: {', '.join(sorted(set(_DTYPES.values())))}")
    return _DTYPES[elem]


def _fix_inputs(model: onnx.ModelProto, given: dict[str, Sequence[int]], path: Path) -> tuple[TensorSpec, ...]:
    """Check the given shapes against the model, then write the static shapes into the inputs."""
    inputs = list(model.graph.input)
    names = [i.name for i in inputs]
    weights = {i.name for i in model.graph.initializer}
    for name in given:
        if name not in names:
            what = "a weight (an initializer)" if name in weights else "not an input of the model"
            raise ModelError(f"{path}: --input-shape names {name!r}, which is {what}"
                             f"{did_you_mean(name, names)}; its inputs are: {', '.join(names) or '(none)'}")

    specs: list[TensorSpec] = []
    missing: list[tuple[onnx.ValueInfoProto, list[int | str | None] | None]] = []
    for vi in inputs:
        dtype = _dtype(vi, f"input {vi.name!r}", path)
        dims = _dims(vi)
        if vi.name in given:
            shape = _given_shape(vi.name, given[vi.name], dims, path)
        elif _is_static(dims) and all(d > 0 for d in dims):  # type: ignore[union-attr, operator]
            shape = tuple(dims)  # type: ignore[arg-type]
        else:
            missing.append((vi, dims))
            continue
        specs.append(TensorSpec(vi.name, dtype, shape))
    if missing:
        raise _dynamic_inputs_error(missing, path)

    for vi, spec in zip(inputs, specs):
        t = vi.type.tensor_type
        t.ClearField("shape")
        t.shape.SetInParent()      # rank 0 keeps an (empty) shape: a scalar, not an unknown rank
        for d in spec.shape:
            t.shape.dim.add().dim_value = d
    return tuple(specs)


def _given_shape(name: str, value: Sequence[int], dims: list[int | str | None] | None,
                 path: Path) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in value)
        ok = all(int(d) == d for d in value)
    except (TypeError, ValueError):
        ok = False
    if not ok or any(d <= 0 for d in shape):
        shown = list(value) if isinstance(value, (list, tuple)) else value
        raise ModelError(f"{path}: the shape given for input {name!r} is {shown!r}; "
                         "expected positive integer dims")
    if dims is not None and len(dims) != len(shape):
        raise ModelError(f"{path}: input {name!r} has rank {len(dims)} ({_fmt_dims(dims)}), "
                         f"the given shape {list(shape)} has rank {len(shape)}")
    for i, (d, s) in enumerate(zip(dims or (), shape)):
        if isinstance(d, int) and d > 0 and d != s:
            raise ModelError(f"{path}: input {name!r} dim {i} is fixed to {d} by the model "
                             f"({_fmt_dims(dims)}), the given shape {list(shape)} says {s}")
    return shape


def _dynamic_inputs_error(missing: list[tuple[onnx.ValueInfoProto, Any]], path: Path) -> ModelError:
    parts, fixes = [], []
    for vi, dims in missing:
        if dims is None:
            parts.append(f"input {vi.name!r} has no shape in the model (unknown rank)")
            fixes.append(f"--input-shape {vi.name}=D0,D1,...")
            continue
        dyn = [f"dim {i} ({d!r})" if isinstance(d, str) else f"dim {i} (unknown)"
               for i, d in enumerate(dims) if not (isinstance(d, int) and d > 0)]
        parts.append(f"input {vi.name!r} {_fmt_dims(dims)} has dynamic dims: {', '.join(dyn)}")
        fixes.append(f"--input-shape {vi.name}=" + ",".join(str(d) if isinstance(d, int) and d > 0 else "1"
                                                           for d in dims))
    return ModelError(f"{path}: {'; '.join(parts)}; fix {'them' if len(missing) > 1 else 'it'} with "
                      f"{' '.join(fixes)} (or [model] input_shapes in the recipe)")


# --- shape inference ----------------------------------------------------------------------

def _infer(model: onnx.ModelProto, path: Path) -> str:
    """Infer the shapes of every value into ``model`` (value_info and outputs), in place.

    Runs on a skeleton of the model whose big initializers are typed inputs: inference then
    neither copies nor reads the weights.  Strict first; if the model does not pass strict
    inference, non-strict, and the strict error is returned for later messages.
    """
    g = model.graph
    skel = onnx.ModelProto(ir_version=max(model.ir_version, 4), opset_import=model.opset_import,
                           functions=model.functions)
    sg = skel.graph
    sg.name = g.name
    sg.node.extend(g.node)
    sg.input.extend(g.input)
    sg.output.extend(g.output)
    sg.sparse_initializer.extend(g.sparse_initializer)
    for t in g.initializer:
        if _numel(t.dims) <= _INFER_VALUE_LIMIT:
            sg.initializer.append(t)
        else:
            sg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    strict_error = ""
    try:
        inferred = onnx.shape_inference.infer_shapes(skel, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        strict_error = _last_line(e)
        # Declared output dims may be what strict inference tripped over: let inference say.
        for out in sg.output:
            if out.type.HasField("tensor_type") and out.type.tensor_type.HasField("shape"):
                for d in out.type.tensor_type.shape.dim:
                    d.Clear()
        try:
            inferred = onnx.shape_inference.infer_shapes(skel, check_type=False, strict_mode=False,
                                                         data_prop=True)
        except Exception as e2:
            raise ModelError(f"{path}: ONNX shape inference fails on the model with the input shapes fixed: "
                             f"{_last_line(e2)}") from None
    del g.value_info[:]
    g.value_info.extend(inferred.graph.value_info)
    del g.output[:]
    g.output.extend(inferred.graph.output)
    return strict_error


def _numel(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


# --- folding ------------------------------------------------------------------------------

def fold(model: onnx.ModelProto, path: Path) -> tuple[onnx.ModelProto, int]:
    """Constant-fold ``model`` in place until nothing changes; returns it and how many nodes went."""
    before = len(model.graph.node)
    _fold(model, Path(path))
    return model, before - len(model.graph.node)


def _fold(model: onnx.ModelProto, path: Path) -> str:
    g = model.graph
    opsets = {o.domain or "": o.version for o in model.opset_import}
    opsets.setdefault("", opsets.get("ai.onnx", 1))
    folder = _Folder(g, opsets)
    folder.constants_to_initializers()
    strict_error = _infer(model, path)
    while folder.run():                 # each round folds at least one node, so this ends
        _prune(g)
        strict_error = _infer(model, path)   # folded shapes make more shapes static
    if _prune(g):                       # what was dead from the start
        strict_error = _infer(model, path)
    return strict_error


class _Folder:
    """One graph's constants (as TensorProtos, decoded to numpy on demand) and its folding."""

    def __init__(self, graph: onnx.GraphProto, opsets: dict[str, int]):
        self.g = graph
        self.opsets = opsets
        self.tensors: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
        self.arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = numpy_helper.to_array(self.tensors[name])
        return self.arrays[name]

    def constants_to_initializers(self) -> bool:
        """Constant nodes of the main graph -> initializers, without evaluating anything."""
        keep, changed = [], False
        for node in self.g.node:
            t = _constant_tensor(node) if node.op_type == "Constant" and node.domain in _STANDARD_DOMAINS else None
            if t is None:
                keep.append(node)
                continue
            self.g.initializer.append(t)
            self.tensors[t.name] = self.g.initializer[-1]
            changed = True
        if changed:
            _set_nodes(self.g, keep)
        return changed

    def run(self) -> bool:
        """One pass in graph (topological) order; True when some node was folded."""
        values = {vi.name: vi for vi in [*self.g.input, *self.g.value_info, *self.g.output]}
        self.tensors = {t.name: t for t in self.g.initializer}     # pruning may have dropped some
        keep: list[onnx.NodeProto] = []
        for node in self.g.node:
            results = self._evaluate(node, values)
            if results is None:
                keep.append(node)
                continue
            for name, arr in results.items():
                t = numpy_helper.from_array(arr, name)
                self.g.initializer.append(t)
                self.tensors[name] = self.g.initializer[-1]
                self.arrays[name] = arr
        if len(keep) == len(self.g.node):
            return False
        _set_nodes(self.g, keep)
        return True

    def _evaluate(self, node: onnx.NodeProto, values: Mapping[str, onnx.ValueInfoProto]
                  ) -> dict[str, np.ndarray] | None:
        if node.domain not in _STANDARD_DOMAINS or node.op_type in _NONDETERMINISTIC:
            return None
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            return None
        outs = [o for o in node.output if o]
        if not outs:
            return None
        if node.op_type in ("Shape", "Size") and node.input and node.input[0] in values:
            dims = _dims(values[node.input[0]])
            if not _is_static(dims):
                return None
            if node.op_type == "Size":
                return {outs[0]: np.array(_numel(dims), dtype=np.int64)}  # type: ignore[arg-type]
            attrs = {a.name: a.i for a in node.attribute}
            start, end = attrs.get("start", 0), attrs.get("end", len(dims))  # type: ignore[arg-type]
            return {outs[0]: np.array(dims[start:end], dtype=np.int64)}  # type: ignore[index]
        ins = list(dict.fromkeys(i for i in node.input if i))
        if not all(i in self.tensors for i in ins):
            return None
        in_bytes = sum(_numel(self.tensors[i].dims) * _itemsize(self.tensors[i].data_type) for i in ins)
        # Refuse a huge result before computing it, when inference already knows its shape.
        expected = {o: values[o] for o in outs if o in values}
        known = [_dims(vi) for vi in expected.values()]
        if len(known) == len(outs) and all(_is_static(d) for d in known):
            size = sum(_numel(d) for d in known)  # type: ignore[arg-type]
            nbytes = sum(_numel(d) * _itemsize(vi.type.tensor_type.elem_type)  # type: ignore[arg-type]
                         for d, vi in zip(known, expected.values()))
            if size > FOLD_LIMIT_ELEMENTS and nbytes > in_bytes:
                return None
        try:
            from onnx.reference import ReferenceEvaluator

            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                # A graph, not the bare node: only then does the evaluator pick the operator's
                # version from the opsets (a bare node always gets the newest).
                graph = helper.make_graph(
                    [node], "fold", [helper.make_tensor_value_info(i, TensorProto.UNDEFINED, None) for i in ins],
                    [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outs])
                results = ReferenceEvaluator(graph, opsets=self.opsets).run(None, {i: self.array(i) for i in ins})
        except Exception:  # the reference evaluator lacks the op or this use of it: TVM computes it
            return None
        if len(results) != len(outs):
            return None
        arrays: dict[str, np.ndarray] = {}
        for name, r in zip(outs, results):
            if not isinstance(r, (np.ndarray, np.generic)):      # sequences, optionals, maps
                return None
            a = np.asarray(r)
            if a.dtype.kind not in "biuf":
                return None
            vi = expected.get(name)
            if vi is not None and vi.type.HasField("tensor_type"):
                elem = vi.type.tensor_type.elem_type
                if elem and helper.np_dtype_to_tensor_dtype(a.dtype) != elem:
                    return None                 # the evaluator disagrees with the graph's types
                dims = _dims(vi)
                if _is_static(dims) and tuple(dims) != a.shape:  # type: ignore[arg-type]
                    return None
            arrays[name] = a
        if sum(a.size for a in arrays.values()) > FOLD_LIMIT_ELEMENTS and \
                sum(a.nbytes for a in arrays.values()) > in_bytes:
            return None
        return arrays


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except Exception:
        return 8


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The value of a Constant node as a TensorProto named after its output, or None for the
    kinds left to TVM (sparse and string values)."""
    if len(node.output) != 1 or len(node.attribute) != 1:
        return None
    a, name = node.attribute[0], node.output[0]
    if a.name == "value" and a.type == AttributeProto.TENSOR and a.t.data_type != TensorProto.STRING:
        t = TensorProto()
        t.CopyFrom(a.t)
        t.name = name
        return t
    if a.name == "value_float":
        return helper.make_tensor(name, TensorProto.FLOAT, [], [a.f])
    if a.name == "value_floats":
        return helper.make_tensor(name, TensorProto.FLOAT, [len(a.floats)], list(a.floats))
    if a.name == "value_int":
        return helper.make_tensor(name, TensorProto.INT64, [], [a.i])
    if a.name == "value_ints":
        return helper.make_tensor(name, TensorProto.INT64, [len(a.ints)], list(a.ints))
    return None


def _set_nodes(g: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    _replace(g.node, nodes)


def _replace(field: Any, items: list[Any]) -> None:
    """Make the repeated message ``field`` hold (copies of) ``items``, which may be its own elements."""
    copies = [type(i)() for i in items]
    for c, i in zip(copies, items):
        c.CopyFrom(i)
    del field[:]
    field.extend(copies)


def _subgraph_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """Every name the subgraphs of ``node`` read (outer-scope names among them), recursively."""
    for a in node.attribute:
        graphs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs) if a.type == AttributeProto.GRAPHS else []
        for sub in graphs:
            for n in sub.node:
                yield from n.input
                yield from _subgraph_inputs(n)
            for o in sub.output:
                yield o.name


def _prune(g: onnx.GraphProto) -> bool:
    """Drop nodes no output depends on, unused initializers and stale value_info; True if any."""
    needed = {o.name for o in g.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
            needed.update(_subgraph_inputs(node))
    keep.reverse()
    inits = [t for t in g.initializer if t.name in needed]
    if len(keep) == len(g.node) and len(inits) == len(g.initializer):
        return False
    if len(keep) != len(g.node):
        _set_nodes(g, keep)
    if len(inits) != len(g.initializer):
        kept_names = {t.name for t in inits}
        for i in reversed(range(len(g.initializer))):
            if g.initializer[i].name not in kept_names:
                del g.initializer[i]
    produced = {o for n in g.node for o in n.output}
    vis = [vi for vi in g.value_info if vi.name in produced]
    if len(vis) != len(g.value_info):
        _replace(g.value_info, vis)
    return True


# --- outputs ------------------------------------------------------------------------------

def _output_specs(model: onnx.ModelProto, path: Path, strict_error: str) -> tuple[TensorSpec, ...]:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    specs = []
    for out in g.output:
        if out.name in inits and out.type.HasField("tensor_type"):    # folded to a constant
            t = out.type.tensor_type
            t.elem_type = inits[out.name].data_type
            t.ClearField("shape")
            t.shape.SetInParent()
            for d in inits[out.name].dims:
                t.shape.dim.add().dim_value = d
        dtype = _dtype(out, f"output {out.name!r}", path)
        dims = _dims(out)
        if not _is_static(dims):
            why = f"; ONNX shape inference reports: {strict_error}" if strict_error else ""
            raise ModelError(f"{path}: output {out.name!r} has no static shape ({_fmt_dims(dims)}) even with "
                             f"the input shapes fixed{why}; tvmbundle needs static output shapes")
        specs.append(TensorSpec(out.name, dtype, tuple(dims)))  # type: ignore[arg-type]
    return tuple(specs)


# --- what TVM can import ------------------------------------------------------------------

def check_supported(model: onnx.ModelProto, path: Path | str) -> None:
    """Fail early, naming every operator TVM's ONNX frontend has no converter for, with its
    domain, the model's opset for that domain and the nodes that use it.

    Like the frontend, this looks operators up by type alone (it ignores domains), and also
    looks into the branches of If nodes, which the frontend converts too.
    """
    import tvm
    from tvm.relax.frontend.onnx import onnx_frontend

    known = set(onnx_frontend._get_convert_map()) | {"Constant", "If"}   # the last two: built in
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    missing: dict[tuple[str, str], list[str]] = {}
    for node in _all_nodes(model.graph):
        if node.op_type not in known:
            label = repr(node.name) if node.name else f"(unnamed, output {node.output[0]!r})" if node.output \
                else "(unnamed)"
            missing.setdefault((node.domain or "ai.onnx", node.op_type), []).append(label)
    if not missing:
        return
    parts = []
    for (domain, op), nodes in missing.items():
        shown = ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
        parts.append(f"{op} (domain {domain}, opset {opsets.get(domain, '?')}) "
                     f"at node{'s' if len(nodes) > 1 else ''} {shown}")
    count = f"{len(missing)} operators: " if len(missing) > 1 else ""
    raise ModelError(f"{path}: TVM's ONNX frontend (apache-tvm {tvm.__version__}) has no converter for "
                     f"{count}{'; '.join(parts)}",
                     hint="express these operators with supported ones before export, or try a newer apache-tvm")


def _all_nodes(g: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in g.node:
        yield node
        for a in node.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _all_nodes(sub)
