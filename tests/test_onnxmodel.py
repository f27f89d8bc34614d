"""Preparing ONNX models: fixed shapes, folded shape arithmetic, clear errors."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from bundler import onnxmodel
from bundler.errors import ModelError, UserError
from tests import models


def test_folding_keeps_the_results(tmp_path):
    path = models.dynamic_batch(tmp_path / "d.onnx")
    p = onnxmodel.prepare(path, {"input": (3, 3, 8, 8)})
    assert p.folded_nodes >= 4
    assert not {"Shape", "Gather", "Concat", "Unsqueeze"} & {n.op_type for n in p.model.graph.node}
    assert p.outputs[0].shape == (3, 10)
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = ort.InferenceSession(p.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_prepare_is_deterministic(tmp_path):
    path = models.dynamic_batch(tmp_path / "d.onnx")
    a = onnxmodel.prepare(path, {"input": (1, 3, 8, 8)}).model.SerializeToString(deterministic=True)
    b = onnxmodel.prepare(path, {"input": (1, 3, 8, 8)}).model.SerializeToString(deterministic=True)
    assert a == b


def test_dynamic_dims_need_a_shape(tmp_path):
    path = models.dynamic_batch(tmp_path / "d.onnx")
    with pytest.raises(ModelError) as e:
        onnxmodel.prepare(path)
    assert str(e.value) == (f"{path}: input 'input' has dynamic dims: dim 0 ('N'); fix them with "
                            "--input-shape input=1,3,8,8 (or [model] input_shapes in the recipe)")


def test_shape_errors(tmp_path):
    path = models.dynamic_batch(tmp_path / "d.onnx")
    with pytest.raises(ModelError, match=r"names 'inptu', which is not an input of the model \(did you mean 'input'\?\)"):
        onnxmodel.prepare(path, {"inptu": (1, 3, 8, 8)})
    with pytest.raises(ModelError, match="input 'input' dim 1 is fixed to 3 by the model, the given shape says 4"):
        onnxmodel.prepare(path, {"input": (1, 4, 8, 8)})
    with pytest.raises(ModelError, match=r"has rank 4 \(\[N, 3, 8, 8\]\), the given shape \[1, 3\] has rank 2"):
        onnxmodel.prepare(path, {"input": (1, 3)})


@pytest.mark.parametrize("text, ok", [("x=1,3,224,224", ("x", (1, 3, 224, 224))), ("in:0=1", ("in:0", (1,))),
                                      ("x=1,0", None), ("x=", None), ("=1,2", None), ("x=1;2", None)])
def test_parse_input_shape(text, ok):
    if ok:
        assert onnxmodel.parse_input_shape(text) == ok
    else:
        with pytest.raises(UserError, match="expected NAME=D0,D1,..."):
            onnxmodel.parse_input_shape(text)


def test_unsupported_op_names_node_and_op(tmp_path):
    path = models.unsupported_op(tmp_path / "u.onnx")
    p = onnxmodel.prepare(path)
    with pytest.raises(ModelError, match="no converter for: node 'celu_1' op Celu"):
        onnxmodel.check_supported(p.model, path)


def test_resnet18_prepares_and_imports(tmp_path):
    from tvm.relax.frontend.onnx import from_onnx

    path = models.resnet18(tmp_path / "r.onnx", size=64)
    p = onnxmodel.prepare(path)
    assert p.inputs[0].shape == (1, 3, 64, 64) and p.outputs[0].shape == (1, 1000)
    from_onnx(p.model, keep_params_in_input=False)
