"""Preparing ONNX models: fixed shapes, folded shape arithmetic, clear errors; real onnx,
onnxruntime and TVM throughout."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bundler.compile import onnxmodel
from bundler.compile.signature import TensorSpec, parse_input_shape
from bundler.errors import ModelError, UserError
from tests import models

REPO = Path(__file__).resolve().parent.parent
SHAPE_OPS = {"Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Range", "ConstantOfShape", "Expand",
             "Constant"}


def run_ort(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


def seeded_inputs(specs: tuple[TensorSpec, ...], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: (rng.standard_normal(s.shape).astype(s.dtype) if np.dtype(s.dtype).kind == "f"
                     else rng.integers(0, 255, s.shape).astype(s.dtype)) for s in specs}


def save(tmp_path: Path, name: str, nodes, inputs, outputs, inits=(), *, opset=17, ir=8, check=True) -> Path:
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    if check:
        onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def from_onnx(model: onnx.ModelProto):
    from tvm.relax.frontend.onnx import from_onnx as convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # "Renaming name ..." for names that are not identifiers
        return convert(model, keep_params_in_input=False)


# --- static models ------------------------------------------------------------------------

@pytest.mark.parametrize("factory, inputs, outputs", [
    (models.conv_net, [("input", "float32", (1, 3, 16, 16))], [("probs", "float32", (1, 10))]),
    (models.multi_io, [("image", "float32", (1, 3, 8, 8)), ("vector", "float32", (1, 16))],
     [("scores", "float32", (1, 5)), ("embedding", "float32", (1, 16))]),
    (models.int_model, [("pixels", "uint8", (1, 4, 4))], [("scaled", "float32", (1, 4, 4)), ("total", "int64", ())]),
])
def test_static_models_are_described_and_left_alone(tmp_path, factory, inputs, outputs):
    path = factory(tmp_path / "m.onnx")
    p = onnxmodel.prepare(path)
    assert p.inputs == tuple(TensorSpec(*i) for i in inputs)
    assert p.outputs == tuple(TensorSpec(*o) for o in outputs)
    assert p.folded_nodes == 0
    assert [n.op_type for n in p.model.graph.node] == [n.op_type for n in onnx.load(path).graph.node]
    assert p.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for spec in p.inputs + p.outputs:
        assert TensorSpec.from_json(spec.to_json()) == spec
    feeds = seeded_inputs(p.inputs)
    for got, want in zip(run_ort(p.model, feeds), run_ort(path, feeds)):
        np.testing.assert_array_equal(got, want)


def test_tensor_spec_json():
    spec = TensorSpec("x", "uint8", (1, 3))
    assert spec.to_json() == {"name": "x", "dtype": "uint8", "shape": [1, 3]}
    assert TensorSpec.from_json({"name": "x", "dtype": "uint8", "shape": [1, 3]}) == spec
    assert TensorSpec.from_json({"name": "s", "dtype": "int64", "shape": []}).shape == ()


# --- dynamic dims and folding -------------------------------------------------------------

def test_dynamic_dims_need_a_shape(tmp_path):
    path = models.dynamic_batch(tmp_path / "d.onnx")
    with pytest.raises(ModelError) as e:
        onnxmodel.prepare(path)
    assert str(e.value) == (f"{path}: input 'input' [N, 3, 8, 8] has dynamic dims: dim 0 ('N'); fix it with "
                            "--input-shape input=1,3,8,8 (or [model] input_shapes in the recipe)")


def test_every_dynamic_input_is_named_with_its_fix(tmp_path):
    vi = helper.make_tensor_value_info
    path = save(tmp_path, "two", [helper.make_node("Add", ["a", "b"], ["c"])],
                [vi("a", TensorProto.FLOAT, None), vi("b", TensorProto.FLOAT, ["N", None, 3])],
                [vi("c", TensorProto.FLOAT, ["N", 4, 3])], check=False)   # an unknown rank fails the checker
    with pytest.raises(ModelError) as e:
        onnxmodel.prepare(path)
    assert str(e.value) == (f"{path}: input 'a' has no shape in the model (unknown rank); input 'b' [N, ?, 3] has "
                            "dynamic dims: dim 0 ('N'), dim 1 (unknown); fix them with --input-shape a=D0,D1,... "
                            "--input-shape b=1,1,3 (or [model] input_shapes in the recipe)")
    p = onnxmodel.prepare(path, {"a": (2, 4, 3), "b": [2, 4, 3]})
    assert [s.shape for s in p.inputs + p.outputs] == [(2, 4, 3)] * 3


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_folds_the_shape_subgraph(tmp_path, batch):
    path = models.dynamic_batch(tmp_path / "d.onnx")
    p = onnxmodel.prepare(path, {"input": (batch, 3, 8, 8)})
    g = p.model.graph
    assert [n.op_type for n in g.node] == ["Conv", "Relu", "Reshape", "Gemm"]
    assert p.folded_nodes == 4
    reshape = g.node[2]
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    assert consts[reshape.input[1]].tolist() == [batch, -1]
    assert {"zero", "axes0", "minus_one"}.isdisjoint(consts)         # used only by the folded nodes
    assert p.inputs == (TensorSpec("input", "float32", (batch, 3, 8, 8)),)
    assert p.outputs == (TensorSpec("logits", "float32", (batch, 10)),)
    onnx.checker.check_model(p.model, full_check=True)
    x = {"input": np.random.default_rng(batch).standard_normal((batch, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(p.model, x)[0], run_ort(path, x)[0])


def test_exporter_shape_arithmetic_folds_without_changing_results(tmp_path):
    path = models.shape_arith(tmp_path / "s.onnx")
    original = onnx.load(path)
    p = onnxmodel.prepare(path, {"x": (2, 6, 5)})
    g = p.model.graph
    assert not SHAPE_OPS & {n.op_type for n in g.node}, [n.op_type for n in g.node]
    assert "dead_relu" not in {n.name for n in g.node}
    assert p.folded_nodes == len(original.graph.node) - len(g.node) > 10
    # the weight transposed at run time is now a transposed initializer, the old one is gone
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    w_t = numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == "w_t"))
    np.testing.assert_array_equal(consts["w"], w_t.T)
    assert "w_t" not in consts
    # outputs keep their names and order; one became a constant
    assert [o.name for o in g.output] == ["y", "pos"]
    assert p.outputs == (TensorSpec("y", "float32", (2, 5, 6)), TensorSpec("pos", "int64", (2, 5)))
    assert consts["pos"].tolist() == [list(range(5))] * 2
    onnx.checker.check_model(p.model, full_check=True)
    for seed in range(3):
        feeds = seeded_inputs(p.inputs, seed)
        for got, want in zip(run_ort(p.model, feeds), run_ort(path, feeds)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_folding_stops_at_huge_results(tmp_path):
    vi = helper.make_tensor_value_info
    shape = [2048, 1024]                                  # 2M elements, past FOLD_LIMIT_ELEMENTS
    assert shape[0] * shape[1] > onnxmodel.FOLD_LIMIT_ELEMENTS
    path = save(tmp_path, "big", [
        helper.make_node("ConstantOfShape", ["s"], ["ones"], name="ones",
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Add", ["x", "ones"], ["y"], name="add")],
        [vi("x", TensorProto.FLOAT, shape)], [vi("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.array(shape, np.int64), "s")])
    p = onnxmodel.prepare(path)
    assert [n.op_type for n in p.model.graph.node] == ["ConstantOfShape", "Add"] and p.folded_nodes == 0
    assert p.model.ByteSize() < 10_000


def test_random_ops_are_not_folded(tmp_path):
    vi = helper.make_tensor_value_info
    path = save(tmp_path, "rand", [
        helper.make_node("RandomUniform", [], ["r"], name="rand", shape=[4], seed=1.0),
        helper.make_node("Add", ["x", "r"], ["y"], name="add")],
        [vi("x", TensorProto.FLOAT, [4])], [vi("y", TensorProto.FLOAT, [4])])
    p = onnxmodel.prepare(path)
    assert [n.op_type for n in p.model.graph.node] == ["RandomUniform", "Add"]


def test_initializers_listed_as_inputs_are_weights(tmp_path):
    vi = helper.make_tensor_value_info
    path = save(tmp_path, "ir3", [helper.make_node("Mul", ["x", "w"], ["y"])],
                [vi("x", TensorProto.FLOAT, [4]), vi("w", TensorProto.FLOAT, [4])], [vi("y", TensorProto.FLOAT, [4])],
                [numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")], opset=9, ir=3)
    p = onnxmodel.prepare(path)
    assert p.inputs == (TensorSpec("x", "float32", (4,)),)
    assert [i.name for i in p.model.graph.input] == ["x"]
    x = {"x": np.ones(4, np.float32)}
    np.testing.assert_array_equal(run_ort(p.model, x)[0], [0, 1, 2, 3])
    with pytest.raises(ModelError, match=r"names 'w', which is a weight \(an initializer\); its inputs are: x"):
        onnxmodel.prepare(path, {"w": (4,)})


# --- errors -------------------------------------------------------------------------------

def test_unknown_input_name_gets_did_you_mean(tmp_path):
    path = models.multi_io(tmp_path / "m.onnx")
    with pytest.raises(ModelError) as e:
        onnxmodel.prepare(path, {"imgae": (1, 3, 8, 8)})
    assert str(e.value) == (f"{path}: --input-shape names 'imgae', which is not an input of the model "
                            "(did you mean 'image'?); its inputs are: image, vector")


def test_conflicting_shapes_are_rejected(tmp_path):
    path = models.dynamic_batch(tmp_path / "d.onnx")
    with pytest.raises(ModelError) as e:
        onnxmodel.prepare(path, {"input": (1, 4, 8, 8)})
    assert str(e.value) == (f"{path}: input 'input' dim 1 is fixed to 3 by the model ([N, 3, 8, 8]), "
                            "the given shape [1, 4, 8, 8] says 4")
    with pytest.raises(ModelError, match=r"input 'input' has rank 4 \(\[N, 3, 8, 8\]\), the given shape \[1, 3\] "
                                         "has rank 2"):
        onnxmodel.prepare(path, {"input": (1, 3)})
    with pytest.raises(ModelError, match=r"the shape given for input 'input' is \[0, 3, 8, 8\]; expected positive"):
        onnxmodel.prepare(path, {"input": (0, 3, 8, 8)})
    # a static input may be given its own shape
    static = models.conv_net(tmp_path / "c.onnx")
    assert onnxmodel.prepare(static, {"input": (1, 3, 16, 16)}).inputs[0].shape == (1, 3, 16, 16)
    with pytest.raises(ModelError, match="dim 0 is fixed to 1 by the model"):
        onnxmodel.prepare(static, {"input": (2, 3, 16, 16)})


def test_output_without_static_shape_is_named(tmp_path):
    vi = helper.make_tensor_value_info
    path = save(tmp_path, "nz", [helper.make_node("NonZero", ["x"], ["idx"], name="nonzero")],
                [vi("x", TensorProto.FLOAT, [4])], [vi("idx", TensorProto.INT64, [1, "K"])])
    with pytest.raises(ModelError) as e:
        onnxmodel.prepare(path)
    assert str(e.value) == (f"{path}: output 'idx' has no static shape ([1, K]) even with the input shapes fixed; "
                            "tvmbundle needs static output shapes")


def test_unsupported_element_type(tmp_path):
    vi = helper.make_tensor_value_info
    path = save(tmp_path, "bf16", [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
                [vi("x", TensorProto.BFLOAT16, [3])], [vi("y", TensorProto.FLOAT, [3])])
    with pytest.raises(ModelError, match=r"bf16.onnx: input 'x' has element type BFLOAT16, which tvmbundle does "
                                         r"not support; supported: bool, float16, float32"):
        onnxmodel.prepare(path)


@pytest.mark.parametrize("content, problem", [
    (None, "model file not found: "),
    (b"", "not an ONNX model (the file is empty)"),
    (b"\x00garbage" * 10, "not an ONNX model (it does not parse as one: "),
    ("truncated", "not an ONNX model (it does not parse as one: "),
    ("dir", "not a file; expected an ONNX model file"),
])
def test_missing_and_corrupt_files_are_named(tmp_path, content, problem):
    path = tmp_path / "broken.onnx"
    if content == "truncated":
        data = models.conv_net(tmp_path / "good.onnx").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    for call in (onnxmodel.load, onnxmodel.prepare):
        with pytest.raises(ModelError) as e:
            call(path)
        assert problem in str(e.value) and str(path) in str(e.value)


def test_weights_in_an_external_file(tmp_path):
    model = onnx.load(models.conv_net(tmp_path / "inline.onnx"))
    path = tmp_path / "ext" / "net.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="net.bin",
              size_threshold=0)
    p = onnxmodel.prepare(path)
    assert p.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    x = seeded_inputs(p.inputs)
    np.testing.assert_array_equal(run_ort(p.model, x)[0], run_ort(tmp_path / "inline.onnx", x)[0])
    (path.parent / "net.bin").unlink()
    with pytest.raises(ModelError, match=re.escape(f"{path}: cannot load the model's external data")):
        onnxmodel.prepare(path)


def test_check_supported_names_node_op_and_opset(tmp_path):
    path = models.unsupported_op(tmp_path / "u.onnx")
    p = onnxmodel.prepare(path)
    assert run_ort(p.model, {"x": np.ones((1, 8), np.float32)})[0].shape == (1, 8)    # a valid model, only TVM lacks it
    with pytest.raises(ModelError) as e:
        onnxmodel.check_supported(p.model, path)
    assert str(e.value).startswith(f"{path}: TVM's ONNX frontend (apache-tvm ")
    assert e.value.message.endswith("has no converter for Celu (domain ai.onnx, opset 17) at node 'celu_1'")
    # several operators, an unnamed node, a custom domain, a node inside an If branch
    vi = helper.make_tensor_value_info
    then_branch = helper.make_graph([helper.make_node("Swish", ["x"], ["t"], name="swish_in_then")], "then", [],
                                    [vi("t", TensorProto.FLOAT, [3])])
    else_branch = helper.make_graph([helper.make_node("Relu", ["x"], ["e"], name="relu_in_else")], "else", [],
                                    [vi("e", TensorProto.FLOAT, [3])])
    model = helper.make_model(helper.make_graph([
        helper.make_node("Celu", ["x"], ["a"], name="c1"),
        helper.make_node("Celu", ["a"], ["b"]),
        helper.make_node("If", ["flag"], ["c"], name="if", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Twice", ["b"], ["y"], domain="my.ops", name="twice")],
        "g", [vi("x", TensorProto.FLOAT, [3]), vi("flag", TensorProto.BOOL, [])],
        [vi("y", TensorProto.FLOAT, [3]), vi("c", TensorProto.FLOAT, [3])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 2)])
    with pytest.raises(ModelError) as e:
        onnxmodel.check_supported(model, "g.onnx")
    assert e.value.message.endswith(
        "has no converter for 3 operators: Celu (domain ai.onnx, opset 17) at nodes 'c1', (unnamed, output 'b'); "
        "Swish (domain ai.onnx, opset 17) at node 'swish_in_then'; "
        "Twice (domain my.ops, opset 2) at node 'twice'")
    for factory in (models.conv_net, models.multi_io, models.int_model, models.shape_arith):
        good = factory(tmp_path / f"{factory.__name__}.onnx")
        onnxmodel.check_supported(onnxmodel.load(good), good)


# --- TVM imports what prepare makes ---------------------------------------------------------

@pytest.mark.parametrize("factory, shapes", [
    (models.conv_net, None), (models.multi_io, None), (models.int_model, None),
    (models.dynamic_batch, {"input": (2, 3, 8, 8)}), (models.shape_arith, {"x": (1, 6, 7)}),
])
def test_prepared_models_import_into_tvm(tmp_path, factory, shapes):
    p = onnxmodel.prepare(factory(tmp_path / "m.onnx"), shapes)
    mod = from_onnx(p.model)
    main = mod["main"]
    assert [(tuple(int(d) for d in v.ty.shape), v.ty.dtype) for v in main.params] == \
        [(s.shape, s.dtype) for s in p.inputs]
    rets = list(main.ret_ty.fields) if len(p.outputs) > 1 else [main.ret_ty]
    assert [(tuple(int(d) for d in r.shape), r.dtype) for r in rets] == [(s.shape, s.dtype) for s in p.outputs]


def test_resnet18_prepares_and_imports_fast(tmp_path):
    path = models.resnet18(tmp_path / "r.onnx")
    assert 40e6 < path.stat().st_size < 50e6
    assert sum(int(np.prod(t.dims)) for t in onnx.load(path).graph.initializer) == 11_684_712
    from_onnx(onnxmodel.prepare(models.conv_net(tmp_path / "warm.onnx")).model)      # TVM's import cost
    start = time.monotonic()
    p = onnxmodel.prepare(path)
    prepared = time.monotonic() - start
    from_onnx(p.model)
    imported = time.monotonic() - start - prepared
    assert p.inputs[0].shape == (1, 3, 224, 224) and p.outputs[0].shape == (1, 1000)
    assert prepared < 5 and imported < 10, (prepared, imported)     # about 0.05 s and 0.15 s here


def test_resnet18_with_a_symbolic_batch(tmp_path):
    path = models.resnet18(tmp_path / "r.onnx", batch="N", size=32)
    with pytest.raises(ModelError, match=r"--input-shape input=1,3,32,32 "):
        onnxmodel.prepare(path)
    p = onnxmodel.prepare(path, {"input": (2, 3, 32, 32)})
    assert p.outputs == (TensorSpec("logits", "float32", (2, 1000)),)
    x = seeded_inputs(p.inputs)
    np.testing.assert_allclose(run_ort(p.model, x)[0], run_ort(path, x)[0], rtol=1e-5, atol=1e-5)


# --- determinism --------------------------------------------------------------------------

def test_prepare_is_deterministic(tmp_path):
    path = models.shape_arith(tmp_path / "s.onnx")
    a = onnxmodel.prepare(path, {"x": (1, 6, 4)}).model.SerializeToString()
    b = onnxmodel.prepare(path, {"x": (1, 6, 4)}).model.SerializeToString()
    assert a == b
    # another process, another hash seed: still the same bytes
    script = ("import hashlib, sys; from bundler.compile import onnxmodel; "
              "m = onnxmodel.prepare(sys.argv[1], {'x': (1, 6, 4)}).model; "
              "print(hashlib.sha256(m.SerializeToString()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert out == hashlib.sha256(a).hexdigest()
    # a model built again from the same seed is the same file, and prepares to the same bytes
    again = models.shape_arith(tmp_path / "again.onnx")
    assert onnxmodel.prepare(again, {"x": (1, 6, 4)}).model.SerializeToString() == a


# --- --input-shape ------------------------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [
    ("x=1,3,224,224", ("x", (1, 3, 224, 224))),
    ("in:0=1", ("in:0", (1,))),
    ("serving_default/input.1 = 2, 3", ("serving_default/input.1", (2, 3))),
])
def test_parse_input_shape(text, parsed):
    assert parse_input_shape(text) == parsed


@pytest.mark.parametrize("text, problem", [
    ("x=1,0", "'0' is not a positive integer"), ("x=1,a", "'a' is not a positive integer"),
    ("x=1,,2", "'' is not a positive integer"), ("x=-1,2", "'-1' is not a positive integer"),
    ("x=", "no dims after '='"), ("=1,2", "no input name before '='"), ("x", "no '='"),
    ("x=1;2", "'1;2' is not a positive integer"),
])
def test_parse_input_shape_rejects(text, problem):
    with pytest.raises(UserError) as e:
        parse_input_shape(text)
    assert str(e.value) == (f"--input-shape {text!r}: {problem}; expected NAME=D0,D1,... with positive integer "
                            "dims, e.g. input=1,3,224,224")
