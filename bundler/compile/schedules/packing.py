"""Running the weight repacking at compile time without compiling it.

Relax's FoldConstant evaluates a packing kernel (split out of a kernel by
SplitLayoutRewritePreproc) by building it with LLVM and running it: some 50 ms per distinct
weight shape, a second for a ResNet-18, most of what the default schedules add to a model's
compile time. A packing kernel is one block, ``packed[f(i...)] = weight[i...]`` with ``f`` of
floor divisions and remainders, which numpy evaluates in milliseconds. Anything else is left
for FoldConstant.
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.ir.expr import Constant, TensorLoad  # a Relax constant and a TIR load in TVM 0.27
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.s_tir.stmt import SBlock

from bundler.compile.relaxfuncs import mutate_functions

_OPS = {tirx.Add: np.add, tirx.Sub: np.subtract, tirx.Mul: np.multiply,
        tirx.FloorDiv: np.floor_divide, tirx.FloorMod: np.mod}


def _eval(expr, env):
    if isinstance(expr, tirx.IntImm):
        return np.int64(expr.value)
    if isinstance(expr, tirx.Var):
        return next(v for k, v in env if k.same_as(expr))
    op = _OPS.get(type(expr))
    if op is None:
        raise ValueError(f"not an index expression numpy evaluates: {type(expr).__name__}")
    return op(_eval(expr.a, env), _eval(expr.b, env))


def packing(func: tirx.PrimFunc):
    """A function computing the packed array from the weight, for a one-block packing kernel
    with one input and one output; None for anything else."""
    if len(func.params) != 2:
        return None
    blocks = []
    tvm_ffi.structural_walk(func.body, [(SBlock, blocks.append)], order="post")
    inner = [b for b in blocks if b.iter_vars]
    if len(inner) != 1:
        return None
    block = inner[0]
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, TensorLoad):
        return None
    load = store.value
    ivs = [iv.var for iv in block.iter_vars]
    if len(load.indices) != len(ivs) or not all(isinstance(e, tirx.Var) and e.same_as(v)
                                                 for e, v in zip(load.indices, ivs)):
        return None
    src, dst = func.params
    if not (load.source.same_as(src) and store.buffer.same_as(dst)):
        return None
    out_shape = [int(s) for s in dst.ty.shape]
    dtype = str(dst.ty.dtype)

    def run(weight: np.ndarray) -> np.ndarray:
        grids = np.indices(weight.shape, sparse=True)
        env = list(zip(ivs, grids))
        index = np.broadcast_arrays(*[_eval(e, env) for e in store.indices])
        out = np.zeros(out_shape, dtype=dtype)
        out[tuple(index)] = weight
        return out

    return run


@mutator
class _Fold(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, runs: dict) -> None:
        super().__init__(mod)
        self.mod = mod
        self.runs = runs
        self.call_tir = tvm.ir.Op.get("relax.call_tir")

    def transform(self) -> tvm.IRModule:
        return mutate_functions(self, self.mod)

    def visit_call_(self, call: relax.Call):
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(self.call_tir)):
            return call
        gv, args = call.args[0], call.args[1]
        run = self.runs.get(gv.name_hint) if isinstance(gv, tvm.ir.GlobalVar) else None
        if run is None or not isinstance(args, relax.Tuple) or len(args.fields) != 1 \
                or not isinstance(args.fields[0], Constant):
            return call
        try:
            return relax.const(run(args.fields[0].value.numpy()))
        except (ValueError, IndexError, StopIteration):  # not what it looked like: FoldConstant's
            return call


@tvm.transform.module_pass(opt_level=0, name="tvmbundle.FoldWeightPacking")
def fold_weight_packing(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    runs = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and gv.name_hint.endswith("_weight_prepack"):
            run = packing(func)
            if run is not None:
                runs[gv.name_hint] = run
    return _Fold(mod, runs).transform() if runs else mod
