"""exp, sigmoid, tanh, erf and softmax compile to vectorizable polynomials, not libm calls
(bundler/compile/fastmath.py), and agree with onnxruntime, at the edges of float32 too."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from onnx import helper

from tests.test_schedules import TARGETS, assert_close, build, run_onnxruntime, run_tvm, single

LIBM = ("T.exp(", "T.tanh(", "T.erf(", "T.sigmoid(")

# Large magnitudes (exp's overflow to inf and underflow to 0, sigmoid's and tanh's saturation)
# and a zero, besides ordinary values.
EDGES = np.array([-1e4, -100.0, -88.0, -20.0, -1.0, 0.0, 1e-8, 1.0, 20.0, 88.0, 100.0, 1e4], np.float32)


def _feeds(shape, edges=True):
    x = np.random.default_rng(0).uniform(-6, 6, shape).astype(np.float32)
    if edges:
        x.reshape(-1)[: EDGES.size] = EDGES
    return {"x": x}


def _kernel_sources(mod) -> str:
    return "".join(f.script() for _gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("op, attrs", [("Exp", {}), ("Sigmoid", {}), ("Tanh", {}), ("Erf", {}),
                                       ("Softmax", {"axis": -1})])
def test_transcendentals_are_polynomials_that_agree_with_onnxruntime(op, attrs, target):
    shape = (2, 3, 64)
    model = single(op, shape, **attrs)
    ex, mod = build(model, TARGETS[target])
    src = _kernel_sources(mod)
    assert not any(f in src for f in LIBM), src
    # Softmax of a row with 1e4 in it is one-hot in both; exp's inf stays inf.
    feeds = _feeds(shape)
    got, want = run_tvm(ex, feeds), run_onnxruntime(model, feeds)
    finite = [np.where(np.isfinite(w), w, 0) for w in want]
    assert all(np.array_equal(np.isinf(g), np.isinf(w)) for g, w in zip(got, want))
    assert_close([np.where(np.isfinite(g), g, 0) for g in got], finite)


def test_erf_keeps_nan_and_exp_of_minus_infinity_is_zero():
    """topi's fast_erf makes NaN 1.0: the rewrite keeps NaN, as erf does."""
    model = single("Erf", (1, 4))
    ex, _ = build(model, TARGETS["native"])
    (got,) = run_tvm(ex, {"x": np.array([[np.nan, -np.inf, np.inf, 0.5]], np.float32)})
    assert np.isnan(got[0, 0]) and got[0, 1] == -1.0 and got[0, 2] == 1.0
    model = single("Exp", (1, 3))
    ex, _ = build(model, TARGETS["native"])
    (got,) = run_tvm(ex, {"x": np.array([[-np.inf, np.nan, np.inf]], np.float32)})
    assert got[0, 0] == 0.0 and np.isnan(got[0, 1]) and np.isinf(got[0, 2])


def test_other_dtypes_keep_libm():
    """The polynomials are float32's; a float64 exp is left to libm."""
    from tests.test_schedules import _model

    g = _model([helper.make_node("Cast", ["x"], ["d"], to=11), helper.make_node("Exp", ["d"], ["e"]),
                helper.make_node("Cast", ["e"], ["y"], to=1)], [("x", [1, 8])], ["y"])
    ex, mod = build(g, TARGETS["native"])
    assert "T.exp(" in _kernel_sources(mod)
    feeds = _feeds((1, 8), edges=False)
    assert_close(run_tvm(ex, feeds), run_onnxruntime(g, feeds))
