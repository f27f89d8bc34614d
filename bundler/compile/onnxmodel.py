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
   then, once that is at a fixed point, each main-graph If whose condition is
   now a constant is replaced by the branch it takes (its nodes and
   initializers inlined, renamed where names clash, nested subgraphs' outer
   references renamed with them; nested Ifs are folded in turn), and each
   LSTM, GRU and RNN node with static shapes is unrolled over its sequence
   length into MatMul/Add/Split/activations/Where/Concat... (TVM 0.27's
   frontend has no converter for them); shapes are inferred again and folding
   goes on;
5. dead nodes, unused initializers and stale value_info are dropped, shapes
   are inferred once more and the outputs must have static shapes (the error
   names the output, and the If nodes left that it depends on).

What is never folded: random operators, Loop and Scan, If nodes whose
condition is not constant, nodes outside the standard domain, and results larger than
:data:`FOLD_LIMIT_ELEMENTS` elements unless they are no bigger than their
constant inputs (a Transpose or Cast of a weight): a folded result is stored in
the model, and an ``Expand`` of a scalar to a huge tensor would bloat it.

The result is deterministic: the same file and shapes give a byte-identical
``model.SerializeToString()``.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from bundler.compile.signature import TensorSpec
from bundler.errors import ModelError, did_you_mean, last_line

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


@dataclass(frozen=True)
class PreparedModel:
    model: onnx.ModelProto          # shapes fixed, shape subgraphs folded, ready for from_onnx
    inputs: tuple[TensorSpec, ...]  # graph inputs that are not initializers, in graph order
    outputs: tuple[TensorSpec, ...] # graph outputs in order, static shapes
    folded_nodes: int               # how many nodes folding (and dead-node removal) took away
    source_sha256: str              # sha256 of the file's bytes


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
        raise ModelError(f"{path}: not an ONNX model (it does not parse as one: {last_line(e, 300)})") from None
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
                             f"{last_line(e, 300)}") from None
    return data, model


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
        raise ModelError(f"{path}: cannot inline the model's local functions: {last_line(e, 300)}") from None


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
        strict_error = last_line(e, 300)
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
                             f"{last_line(e2, 300)}") from None
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
    # Each round removes at least one node (a folded one, an If, a recurrent node), so this ends.
    # Plain folding goes first, to a fixed point: an If's condition or a sequence_lens is then as
    # constant as it gets before the If is folded or the LSTM unrolled.
    while folder.run() or folder.fold_ifs() or _unroll_recurrent(model, folder, path):
        folder.constants_to_initializers()      # Constant nodes an inlined branch brought
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


    # --- If nodes with a constant condition ----------------------------------------------

    def fold_ifs(self) -> bool:
        """Replace each If of the main graph whose condition is a constant by the nodes of the
        branch it takes; True if any.  Nested Ifs come up to the main graph this way and are
        folded in a later round, once their own conditions are folded."""
        self.tensors = {t.name: t for t in self.g.initializer}
        changed, k = False, 0
        while k < len(self.g.node):
            node = self.g.node[k]
            k += 1
            if node.op_type != "If" or node.domain not in _STANDARD_DOMAINS or not node.input \
                    or node.input[0] not in self.tensors:
                continue
            cond = self.array(node.input[0])
            if cond.size != 1:
                continue
            branches = {a.name: a.g for a in node.attribute if a.type == AttributeProto.GRAPH}
            branch = branches.get("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
            if branch is None or branch.sparse_initializer or len(branch.output) < len(node.output):
                continue
            inlined, inits = _inline_branch(self.g, node, branch)
            for t in inits:
                self.g.initializer.append(t)
                self.tensors[t.name] = self.g.initializer[-1]
            nodes = list(self.g.node)
            _set_nodes(self.g, nodes[:k - 1] + inlined + nodes[k:])
            k -= 1              # the inlined nodes next: an If among them may be constant already
            changed = True
        return changed


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.g
        elif a.type == AttributeProto.GRAPHS:
            yield from a.graphs


def _local_defs(g: onnx.GraphProto) -> list[str]:
    """The names a graph defines in its own scope (inputs, initializers, node outputs), in order."""
    names = [i.name for i in g.input] + [t.name for t in g.initializer]
    names += [o for n in g.node for o in n.output if o]
    return names


def _all_defs(g: onnx.GraphProto, into: set[str], skip: onnx.NodeProto | None = None) -> set[str]:
    """Every name defined or declared in ``g`` and its subgraphs (but not those of ``skip``)."""
    into.update(_local_defs(g))
    into.update(o.name for o in g.output)
    into.update(vi.name for vi in g.value_info)
    for n in g.node:
        into.update(i for i in n.input if i)
        if n is not skip:
            for sub in _subgraphs(n):
                _all_defs(sub, into)
    return into


def _rename_refs(g: onnx.GraphProto, mapping: Mapping[str, str]) -> None:
    """Rename, in the subgraph ``g`` and its own subgraphs, the references to outer-scope names
    (a name ``g`` defines itself shadows the outer one)."""
    local = set(_local_defs(g))
    m = {k: v for k, v in mapping.items() if k not in local}
    if not m:
        return
    for n in g.node:
        for j, i in enumerate(n.input):
            if i in m:
                n.input[j] = m[i]
        for sub in _subgraphs(n):
            _rename_refs(sub, m)
    for o in g.output:
        if o.name in m:
            o.name = m[o.name]


def _inline_branch(g: onnx.GraphProto, node: onnx.NodeProto, branch: onnx.GraphProto
                   ) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """The nodes and initializers that compute the If ``node``'s outputs as ``branch`` does, in
    the scope of ``g``: the branch's values keep their names unless those are taken (then get a
    suffix), the values the branch outputs are named after the If's outputs."""
    taken = _all_defs(g, set(), skip=node)
    for n in branch.node:               # names of the branch's nested subgraphs stay as they are
        for sub in _subgraphs(n):
            _all_defs(sub, taken)
    produced = {o for n in branch.node for o in n.output if o}
    mapping: dict[str, str] = {}
    identities: list[tuple[str, str]] = []
    for bo, io in zip(branch.output, node.output):
        if not io:
            continue
        if bo.name in produced and bo.name not in mapping:
            mapping[bo.name] = io
        else:                           # an outer value, an initializer or a value output twice
            identities.append((bo.name, io))
    for name in _local_defs(branch):
        if name in mapping:
            continue
        new, k = name, 0
        while new in taken:
            k += 1
            new = f"{name}__{k}"
        taken.add(new)
        mapping[name] = new
    label = node.name or node.output[0]
    nodes = []
    for n in branch.node:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        for j, i in enumerate(c.input):
            if i in mapping:
                c.input[j] = mapping[i]
        for j, o in enumerate(c.output):
            if o in mapping:
                c.output[j] = mapping[o]
        for sub in _subgraphs(c):
            _rename_refs(sub, mapping)
        nodes.append(c)
    for src, io in identities:
        nodes.append(helper.make_node("Identity", [mapping.get(src, src)], [io], name=f"{label}/{io}"))
    inits = []
    for t in branch.initializer:
        c = TensorProto()
        c.CopyFrom(t)
        c.name = mapping[t.name]
        inits.append(c)
    return nodes, inits


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


# --- LSTM, GRU and RNN: unrolled over the (now static) sequence length ------------------

_RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
# How many of activation_alpha / activation_beta each activation takes, and their defaults
# (as onnxruntime reads them: in order, across the activations of every direction).
_ACTIVATION_ARGS: dict[str, tuple[int, int, float, float]] = {
    "relu": (0, 0, 0.0, 0.0), "tanh": (0, 0, 0.0, 0.0), "sigmoid": (0, 0, 0.0, 0.0),
    "softsign": (0, 0, 0.0, 0.0), "softplus": (0, 0, 0.0, 0.0),
    "affine": (1, 1, 1.0, 0.0), "scaledtanh": (1, 1, 1.0, 1.0), "hardsigmoid": (1, 1, 0.2, 0.5),
    "leakyrelu": (1, 0, 0.01, 0.0), "thresholdedrelu": (1, 0, 1.0, 0.0), "elu": (1, 0, 1.0, 0.0),
}


def _unroll_recurrent(model: onnx.ModelProto, folder: _Folder, path: Path) -> bool:
    """Replace the main graph's LSTM, GRU and RNN nodes whose shapes are static by the same
    computation unrolled over time in operators TVM imports (its frontend has no converter for
    them); True if any.  A node whose shapes are not static stays, for check_supported to name."""
    g = model.graph
    if not any(n.op_type in _RECURRENT_GATES and n.domain in _STANDARD_DOMAINS for n in g.node):
        return False
    values = {vi.name: vi for vi in [*g.input, *g.value_info, *g.output]}
    for t in g.initializer:
        values.setdefault(t.name, helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    opset = folder.opsets.get("", 1)
    taken = _all_defs(g, set())
    taken.update(n.name for n in g.node if n.name)
    nodes: list[onnx.NodeProto] = []
    changed = False
    for node in g.node:
        if node.op_type in _RECURRENT_GATES and node.domain in _STANDARD_DOMAINS:
            unrolled = _Unroller(node, values, folder, opset, taken, path).build()
            if unrolled is not None:
                new_nodes, inits = unrolled
                nodes.extend(new_nodes)
                for t in inits:
                    g.initializer.append(t)
                    folder.tensors[t.name] = g.initializer[-1]
                changed = True
                continue
        nodes.append(node)
    if changed:
        _set_nodes(g, nodes)
    return changed


class _Unroller:
    """One LSTM / GRU / RNN node as ONNX operators of the model's opset, time step by time step
    (the formulas of the ONNX operator specification, checked against onnxruntime)."""

    def __init__(self, node: onnx.NodeProto, values: Mapping[str, onnx.ValueInfoProto], folder: _Folder,
                 opset: int, taken: set[str], path: Path):
        self.node, self.values, self.folder, self.opset, self.taken, self.path = \
            node, values, folder, opset, taken, path
        self.label = node.name or (node.output[0] if node.output else node.op_type)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    # helpers ------------------------------------------------------------------------------

    def _fail(self, why: str) -> ModelError:
        return ModelError(f"{self.path}: cannot unroll {self.node.op_type} node {self.label!r} "
                          f"(TVM's ONNX frontend has no converter for {self.node.op_type}): {why}")

    def fresh(self, hint: str) -> str:
        base = f"{self.label}/{hint}"
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def const(self, value: Any, dtype: Any, hint: str = "c") -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.tobytes(), arr.shape)
        if key not in self.consts:
            name = self.fresh(hint)
            self.inits.append(numpy_helper.from_array(arr, name))
            self.consts[key] = name
        return self.consts[key]

    def op(self, op_type: str, inputs: Sequence[str], hint: str, outputs: int | Sequence[str] = 1,
           **attrs: Any) -> Any:
        outs = [self.fresh(f"{hint}_{i}" if outputs > 1 else hint) for i in range(outputs)] \
            if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(f"{op_type}_{hint}"),
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs

    def unsqueeze(self, x: str, axes: Sequence[int], hint: str, out: str | None = None) -> str:
        outputs = [out] if out else 1
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const(list(axes), np.int64, "axes")], hint, outputs)
        return self.op("Unsqueeze", [x], hint, outputs, axes=list(axes))

    def split(self, x: str, sizes: Sequence[int], axis: int, hint: str) -> list[str]:
        if self.opset >= 13:
            return self.op("Split", [x, self.const(list(sizes), np.int64, "split")], hint, len(sizes), axis=axis)
        return self.op("Split", [x], hint, len(sizes), axis=axis, split=list(sizes))

    def concat(self, xs: Sequence[str], axis: int, hint: str, out: str | None = None) -> str:
        if len(xs) == 1:
            return self.op("Identity", xs, hint, [out]) if out else xs[0]
        return self.op("Concat", xs, hint, [out] if out else 1, axis=axis)

    def take(self, x: str, index: int, hint: str) -> str:
        """``x[index]`` along axis 0 (a scalar Gather drops the axis)."""
        return self.op("Gather", [x, self.const(index, np.int64, "index")], hint, axis=0)

    def clip(self, x: str) -> str:
        if self.clip_value is None:
            return x
        c = self.clip_value
        if self.opset >= 11:
            return self.op("Clip", [x, self.const(-c, self.dtype, "clip_min"), self.const(c, self.dtype, "clip_max")],
                           "clip")
        return self.op("Clip", [x], "clip", min=-c, max=c)

    def activate(self, x: str, act: tuple[str, float, float], hint: str) -> str:
        name, alpha, beta = act
        x = self.clip(x)
        if name in ("relu", "tanh", "sigmoid", "softsign", "softplus"):
            return self.op({"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softsign": "Softsign",
                            "softplus": "Softplus"}[name], [x], hint)
        if name == "hardsigmoid":
            return self.op("HardSigmoid", [x], hint, alpha=alpha, beta=beta)
        if name == "leakyrelu":
            return self.op("LeakyRelu", [x], hint, alpha=alpha)
        if name == "elu":
            return self.op("Elu", [x], hint, alpha=alpha)
        if name == "affine":
            return self.op("Add", [self.op("Mul", [x, self.const(alpha, self.dtype)], hint),
                                   self.const(beta, self.dtype)], hint)
        if name == "scaledtanh":
            t = self.op("Tanh", [self.op("Mul", [x, self.const(beta, self.dtype)], hint)], hint)
            return self.op("Mul", [t, self.const(alpha, self.dtype)], hint)
        assert name == "thresholdedrelu"
        keep = self.op("Greater", [x, self.const(alpha, self.dtype)], hint)
        return self.op("Mul", [x, self.op("Cast", [keep], hint, to=self.elem)], hint)

    def static_dims(self, name: str) -> list[int] | None:
        vi = self.values.get(name)
        dims = _dims(vi) if vi is not None and vi.type.HasField("tensor_type") else None
        return dims if _is_static(dims) else None  # type: ignore[return-value]

    # the node ----------------------------------------------------------------------------

    def build(self) -> tuple[list[onnx.NodeProto], list[TensorProto]] | None:
        node, op = self.node, self.node.op_type
        ins = list(node.input) + [""] * (8 - len(node.input))
        x_name, w_name, r_name, b_name, lens_name, h0_name = ins[:6]
        c0_name, p_name = (ins[6], ins[7]) if op == "LSTM" else ("", "")
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x_dims, w_dims, r_dims = (self.static_dims(n) if n else None for n in (x_name, w_name, r_name))
        if x_dims is None or w_dims is None or r_dims is None or len(x_dims) != 3:
            return None                 # check_supported names it
        vi = self.values[x_name]
        self.elem = vi.type.tensor_type.elem_type
        if self.elem not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            raise self._fail(f"input X has element type {TensorProto.DataType.Name(self.elem)}")
        self.dtype = helper.tensor_dtype_to_np_dtype(self.elem)

        direction = attrs.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else str(direction)
        if direction not in ("forward", "reverse", "bidirectional"):
            raise self._fail(f"direction {direction!r} is not forward, reverse or bidirectional")
        num_dir = 2 if direction == "bidirectional" else 1
        layout = int(attrs.get("layout", 0))
        seq, batch = (x_dims[0], x_dims[1]) if layout == 0 else (x_dims[1], x_dims[0])
        gates = _RECURRENT_GATES[op]
        hidden = int(attrs.get("hidden_size", r_dims[-1]))
        if w_dims[0] != num_dir or r_dims != [num_dir, gates * hidden, hidden] or w_dims[1] != gates * hidden:
            raise self._fail(f"W {w_dims} and R {r_dims} do not fit {direction} with hidden_size {hidden}")
        self.clip_value = float(attrs["clip"]) if "clip" in attrs else None
        input_forget = bool(attrs.get("input_forget", 0))
        linear_before_reset = bool(attrs.get("linear_before_reset", 0))

        # activations: n per direction, their alphas and betas read in order
        n_act = len(_DEFAULT_ACTIVATIONS[op])
        names = [a.decode() if isinstance(a, bytes) else str(a) for a in attrs.get("activations", ())] \
            or list(_DEFAULT_ACTIVATIONS[op]) * num_dir
        if len(names) == n_act and num_dir == 2:
            names = names * 2
        if len(names) != n_act * num_dir:
            raise self._fail(f"{len(names)} activations given, {op} {direction} takes {n_act * num_dir}")
        alphas = list(attrs.get("activation_alpha", ()))
        betas = list(attrs.get("activation_beta", ()))
        acts = []
        for a in names:
            key = a.lower()
            if key not in _ACTIVATION_ARGS:
                raise self._fail(f"activation {a!r} is not one the ONNX specification defines for {op}")
            na, nb, da, db = _ACTIVATION_ARGS[key]
            alpha = float(alphas.pop(0)) if na and alphas else da
            beta = float(betas.pop(0)) if nb and betas else db
            acts.append((key, alpha, beta))

        # sequence_lens: a mask per step, unless every sequence is known to be full length
        masked = False
        if lens_name:
            if lens_name in self.folder.tensors:
                lens = self.folder.array(lens_name).reshape(-1)
                if lens.size != batch or (lens < 0).any() or (lens > seq).any():
                    raise self._fail(f"sequence_lens {lens.tolist()} does not fit batch {batch}, "
                                     f"sequence length {seq}")
                masked = bool((lens != seq).any())
            else:
                masked = True
        if masked and self.opset < 9:
            raise self._fail("sequence_lens that is not constant needs opset 9 or newer (Where)")
        lens_f = self.op("Cast", [lens_name], "lens", to=TensorProto.FLOAT) if masked else ""
        masks: dict[int, str] = {}

        def mask(t: int) -> str:
            if t not in masks:
                valid = self.op("Less", [self.const(float(t), np.float32, "step"), lens_f], f"valid{t}")
                masks[t] = self.unsqueeze(valid, [1], f"mask{t}")
            return masks[t]

        outs = list(node.output) + [""] * (3 - len(node.output))
        y_out, yh_out, yc_out = outs[0], outs[1], (outs[2] if op == "LSTM" else "")
        if not (y_out or yh_out or yc_out):
            return [], []

        x = x_name if layout == 0 else self.op("Transpose", [x_name], "x_tbi", perm=[1, 0, 2])
        states0 = {}
        for key, name in (("h", h0_name), ("c", c0_name)):
            if name and layout == 1:
                name = self.op("Transpose", [name], f"initial_{key}", perm=[1, 0, 2])
            states0[key] = name
        zeros = self.const(np.zeros((batch, hidden)), self.dtype, "zeros")
        one = self.const(1.0, self.dtype, "one")
        H = hidden

        ys, hs, cs = [], [], []
        for d in range(num_dir):
            reverse = direction == "reverse" or d == 1
            f_act, g_act, h_act = (acts[d * n_act:(d + 1) * n_act] + [None, None])[:3]
            w = self.op("Transpose", [self.take(w_name, d, f"w{d}")], f"w{d}_t", perm=[1, 0])     # [I, G*H]
            r = self.take(r_name, d, f"r{d}")                                                     # [G*H, H]
            if op == "GRU" and not linear_before_reset:
                r_zr, r_h = self.split(r, [2 * H, H], 0, f"r{d}")
                r_zr = self.op("Transpose", [r_zr], f"r{d}_zr_t", perm=[1, 0])
                r_h = self.op("Transpose", [r_h], f"r{d}_h_t", perm=[1, 0])
            else:
                r = self.op("Transpose", [r], f"r{d}_t", perm=[1, 0])
            xw = self.op("MatMul", [x, w], f"xw{d}")                                             # [T, B, G*H]
            rb_h = ""
            if b_name:
                wb, rb = self.split(self.take(b_name, d, f"b{d}"), [gates * H, gates * H], 0, f"b{d}")
                if op == "GRU" and linear_before_reset:       # R's h-gate bias goes inside r * (...)
                    rb_zr, rb_h = self.split(rb, [2 * H, H], 0, f"rb{d}")
                    rb = self.concat([rb_zr, self.const(np.zeros(H), self.dtype, "zeros_h")], 0, f"rb{d}")
                xw = self.op("Add", [xw, self.op("Add", [wb, rb], f"bias{d}")], f"xwb{d}")
            peep = self.split(self.take(p_name, d, f"p{d}"), [H, H, H], 0, f"p{d}") if p_name else None

            h = self.take(states0["h"], d, f"h0_{d}") if states0["h"] else zeros
            c = (self.take(states0["c"], d, f"c0_{d}") if states0["c"] else zeros) if op == "LSTM" else ""
            steps: list[str] = [""] * seq
            for t in (reversed(range(seq)) if reverse else range(seq)):
                s = f"d{d}t{t}"
                xt = self.take(xw, t, f"x_{s}")                                                   # [B, G*H]
                if op == "LSTM":
                    gi, go, gf, gc = self.split(self.op("Add", [xt, self.op("MatMul", [h, r], s)], s),
                                                [H] * 4, 1, f"gates_{s}")
                    if peep:
                        gi = self.op("Add", [gi, self.op("Mul", [peep[0], c], s)], s)
                        gf = self.op("Add", [gf, self.op("Mul", [peep[2], c], s)], s)
                    i_t = self.activate(gi, f_act, f"i_{s}")
                    f_t = self.op("Sub", [one, i_t], f"f_{s}") if input_forget else self.activate(gf, f_act, f"f_{s}")
                    c_new = self.op("Add", [self.op("Mul", [f_t, c], s),
                                            self.op("Mul", [i_t, self.activate(gc, g_act, f"c_{s}")], s)], f"cell_{s}")
                    if peep:
                        go = self.op("Add", [go, self.op("Mul", [peep[1], c_new], s)], s)
                    o_t = self.activate(go, f_act, f"o_{s}")
                    h_new = self.op("Mul", [o_t, self.activate_unclipped(c_new, h_act, f"hc_{s}")], f"h_{s}")
                elif op == "GRU":
                    xz, xr, xh = self.split(xt, [H] * 3, 1, f"x_{s}")
                    if linear_before_reset:
                        hz, hr, hh = self.split(self.op("MatMul", [h, r], s), [H] * 3, 1, f"hr_{s}")
                        if rb_h:
                            hh = self.op("Add", [hh, rb_h], s)
                    else:
                        hz, hr = self.split(self.op("MatMul", [h, r_zr], s), [H] * 2, 1, f"hr_{s}")
                    z_t = self.activate(self.op("Add", [xz, hz], s), f_act, f"z_{s}")
                    r_t = self.activate(self.op("Add", [xr, hr], s), f_act, f"r_{s}")
                    if linear_before_reset:
                        pre = self.op("Add", [xh, self.op("Mul", [r_t, hh], s)], s)
                    else:
                        pre = self.op("Add", [xh, self.op("MatMul", [self.op("Mul", [r_t, h], s), r_h], s)], s)
                    cand = self.activate(pre, g_act, f"cand_{s}")
                    h_new = self.op("Add", [self.op("Mul", [self.op("Sub", [one, z_t], s), cand], s),
                                            self.op("Mul", [z_t, h], s)], f"h_{s}")
                else:
                    h_new = self.activate(self.op("Add", [xt, self.op("MatMul", [h, r], s)], s), f_act, f"h_{s}")
                    c_new = ""
                if masked:
                    m = mask(t)
                    steps[t] = self.op("Where", [m, h_new, zeros], f"y_{s}")
                    h = self.op("Where", [m, h_new, h], f"hm_{s}")
                    if op == "LSTM":
                        c = self.op("Where", [m, c_new, c], f"cm_{s}")
                else:
                    steps[t] = h = h_new
                    if op == "LSTM":
                        c = c_new
            if y_out:
                ys.append(self.concat([self.unsqueeze(y, [0, 1], f"y{d}_{t}") for t, y in enumerate(steps)],
                                      0, f"y{d}"))                                                # [T, 1, B, H]
            hs.append(h)
            cs.append(c)

        # outputs, in the layout asked for
        if y_out:
            if layout == 0:
                self.concat(ys, 1, "y", out=y_out)
            else:
                self.op("Transpose", [self.concat(ys, 1, "y")], "y", [y_out], perm=[2, 0, 1, 3])
        for out, states, key in ((yh_out, hs, "h"), (yc_out, cs, "c")):
            if not out:
                continue
            pieces = [self.unsqueeze(v, [0], f"{key}_last{d}") for d, v in enumerate(states)]
            if layout == 0:
                self.concat(pieces, 0, f"{key}_last", out=out)
            else:
                self.op("Transpose", [self.concat(pieces, 0, f"{key}_last")], f"{key}_last", [out], perm=[1, 0, 2])
        return self.nodes, self.inits

    def activate_unclipped(self, x: str, act: tuple[str, float, float], hint: str) -> str:
        saved, self.clip_value = self.clip_value, None
        try:
            return self.activate(x, act, hint)
        finally:
            self.clip_value = saved


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
            ifs = _ifs_upstream(g, out.name)
            if ifs:
                shown = ", ".join(ifs[:3]) + (f" and {len(ifs) - 3} more" if len(ifs) > 3 else "")
                why += (f"; it depends on If node{'s' if len(ifs) > 1 else ''} {shown}, whose condition is not "
                        "constant with the input shapes fixed")
            raise ModelError(f"{path}: output {out.name!r} has no static shape ({_fmt_dims(dims)}) even with "
                             f"the input shapes fixed{why}; tvmbundle needs static output shapes")
        specs.append(TensorSpec(out.name, dtype, tuple(dims)))  # type: ignore[arg-type]
    return tuple(specs)


def _ifs_upstream(g: onnx.GraphProto, name: str) -> list[str]:
    """The If nodes (named as check_supported names nodes) that ``name`` depends on."""
    producer = {o: n for n in g.node for o in n.output if o}
    seen: set[str] = set()
    found: list[str] = []
    todo = [name]
    while todo:
        v = todo.pop()
        n = producer.get(v)
        if n is None or v in seen:
            continue
        seen.update(n.output)
        if n.op_type == "If":
            found.append(_node_label(n))
        todo.extend(i for i in n.input if i)
        todo.extend(_subgraph_inputs(n))
    return sorted(found)


def _node_label(node: onnx.NodeProto) -> str:
    return repr(node.name) if node.name else f"(unnamed, output {node.output[0]!r})" if node.output \
        else "(unnamed)"


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
            missing.setdefault((node.domain or "ai.onnx", node.op_type), []).append(_node_label(node))
    if not missing:
        return
    parts = []
    for (domain, op), nodes in missing.items():
        shown = ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
        note = (" (prepare unrolls these only in the main graph, with static shapes: not inside a Loop "
                "or an If whose condition is not constant)"
                if op in _RECURRENT_GATES and domain == "ai.onnx" else "")
        parts.append(f"{op} (domain {domain}, opset {opsets.get(domain, '?')}) "
                     f"at node{'s' if len(nodes) > 1 else ''} {shown}{note}")
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
