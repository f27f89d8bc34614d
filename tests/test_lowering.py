"""The TIR lowering kernels are built with (bundler/compile/lowering.py): strided vector loads
become one contiguous load of the span they cover and a shuffle, and compute the same numbers.
Each kernel reads its buffer up to its very last element, so a span one element too long would
read past it."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import te, tirx
import tvm.s_tir as s_tir

from bundler.compile import lowering

LANES = 8
HOST = {"kind": "llvm"}


def strided_copy(stride: int, offset: int = 3):
    """B[i] = A[i * stride + offset] for 8 lanes, vectorized; A ends at the last element read."""
    size = (LANES - 1) * stride + offset + 1
    a = te.placeholder((size,), name="A")
    b = te.compute((LANES,), lambda i: a[i * stride + offset], name="B")
    sch = s_tir.Schedule(te.create_prim_func([a, b]))
    (i,) = sch.get_loops(sch.get_sblock("B"))
    sch.vectorize(i)
    return tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), size


def lowered(mod, target: dict = HOST) -> str:
    """The module's functions as the pipeline leaves them, before code generation (TVMScript)."""
    t = tvm.target.Target(target)
    lower = tvm.tirx.get_tir_pipeline(lowering.register())[0]
    return "".join(f.script() for _, f in lower(tirx.transform.BindTarget(t.with_host(t))(mod)).functions_items())


def run(mod, size: int) -> np.ndarray:
    lib = tvm.tirx.build(mod, target=tvm.target.Target(HOST), pipeline=lowering.register())
    out = tvm.runtime.tensor(np.zeros(LANES, "float32"))
    lib["main"](tvm.runtime.tensor(np.arange(size, dtype="float32")), out)
    return out.numpy()


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_a_strided_vector_load_becomes_its_span_and_a_shuffle(stride):
    mod, size = strided_copy(stride)
    span = (LANES - 1) * stride + 1
    picks = ", ".join(str(i * stride) for i in range(LANES))
    assert f"T.Shuffle([A_1[T.Ramp(3, 1, {span})]], [{picks}])" in lowered(mod)
    np.testing.assert_array_equal(run(mod, size), np.arange(size, dtype="float32")[3::stride])


@pytest.mark.parametrize("stride", [1, lowering.MAX_STRIDE + 1])
def test_contiguous_and_wide_strides_are_left_as_they_are(stride):
    mod, size = strided_copy(stride)
    assert "T.Shuffle" not in lowered(mod)
    np.testing.assert_array_equal(run(mod, size), np.arange(size, dtype="float32")[3::stride])


def test_registering_twice_keeps_one_pipeline():
    assert lowering.register() == lowering.register() == lowering.NAME
