"""exp, sigmoid, softmax, tanh and erf as polynomials that vectorize, before legalization.

Legalized as they are, these call libm's ``expf`` (``tanhf``, ``erff``) once per element: LLVM
has no vector exp for the CPU targets, so a vectorized loop of them is scalar calls lane by
lane. The encoder's softmax (4x128x128) took 131 us that way against 42 with topi's
``fast_softmax``, a detector's sigmoid head (320x320) was onnxruntime's 35 us times five. topi's
``fast_exp``, ``fast_tanh`` and ``fast_erf`` (what Relay's FastMath pass used) are range
reduction plus a polynomial, within 4e-6 of exp's value (4e-7 for tanh and erf) over float32's
range, with exp(-inf) = 0, exp(inf) = inf and NaN kept; onnxruntime's MLAS computes these
the same way. This is TVM's ``relax.transform.FastMathTransform`` plus sigmoid (``1 / (1 +
exp(-x))``), which it leaves to libm, and erf keeping NaN (``fast_erf`` makes it 1).
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

from bundler.compile.relaxfuncs import mutate_functions


def _float32(x) -> bool:
    return str(getattr(getattr(x, "ty", None), "dtype", "")) == "float32"


def _sigmoid(x: te.Tensor) -> te.Tensor:
    e = topi.fast_exp(topi.negative(x))
    return te.compute(x.shape, lambda *i: tirx.const(1.0, "float32") / (tirx.const(1.0, "float32") + e(*i)),
                      name="T_fast_sigmoid", tag="elemwise")


def _erf(x: te.Tensor) -> te.Tensor:
    y = topi.fast_erf(x)
    return te.compute(x.shape, lambda *i: tirx.Select(tirx.isnan(x(*i)), x(*i), y(*i)), name="T_fast_erf",
                      tag="elemwise")


@mutator
class _FastMath(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod
        get = tvm.ir.Op.get
        self.rewrites = {
            get("relax.exp"): lambda call: (topi.fast_exp, call.args[0]),
            get("relax.sigmoid"): lambda call: (_sigmoid, call.args[0]),
            get("relax.tanh"): lambda call: (topi.fast_tanh, call.args[0]),
            get("relax.erf"): lambda call: (_erf, call.args[0]),
            get("relax.nn.softmax"): lambda call: (topi.nn.fast_softmax, call.args[0], int(call.attrs.axis)),
        }

    def transform(self) -> tvm.IRModule:
        return mutate_functions(self, self.mod)

    def visit_call_(self, call: relax.Call):
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
            return call
        rewrite = next((r for op, r in self.rewrites.items() if call.op.same_as(op)), None)
        # float32 only: topi's polynomials are written for it (fast_exp leaves other types to exp).
        if rewrite is None or not _float32(call.args[0]):
            return call
        return self.builder_.call_te(*rewrite(call))


@tvm.transform.module_pass(opt_level=0, name="tvmbundle.FastMath")
def fast_math(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    if not any(isinstance(f, relax.Function) for _gv, f in mod.functions_items()):
        return mod
    return _FastMath(mod).transform()
