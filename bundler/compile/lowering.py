"""The TIR lowering every kernel is built with: TVM's own (``s_tir``'s default pipeline), then
strided vector loads turned into a contiguous load and a shuffle.

Why the extra pass: TVM's LLVM code generator makes a vector load only of a stride-1 ``Ramp``
index; a vector load of every other element (a stride-2 depthwise convolution or pooling, whose
output pixels are in the vector lanes) it emits lane by lane, one scalar load and one insert per
lane. Loading the contiguous span from the first lane's element to the last lane's and keeping
every other element gives LLVM a shuffle it lowers to the target's deinterleave (``vpermt2ps`` on
AVX-512, ``uzp1`` on aarch64, ``vuzp`` on NEON). The span ends at the last element the strided
load reads, so nothing past what the kernel read before is touched.

Registered as a named TIR pipeline (TVM's own extension point: ``tvm.compile(tir_pipeline=NAME)``,
``tvm.tirx.build(pipeline=NAME)``). This module imports only TVM: tuning's builder workers
(bundler.compile.candidates) use it too, so candidates are measured as `make` builds them.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.expr import TensorLoad  # what a TIR buffer load is in TVM 0.27

NAME = "tvmbundle"

# Strides worth a shuffle: the span loaded is (lanes - 1) * stride + 1 elements.
MAX_STRIDE = 4


def _contiguous(load):
    index = load.indices[0] if len(load.indices) == 1 else None     # flattened buffers only
    if not isinstance(index, tirx.Ramp) or not isinstance(index.stride, tirx.IntImm):
        return load
    if not isinstance(index.lanes, (int, tirx.IntImm)):       # scalable vectors: not ours to rewrite
        return load
    stride, lanes = index.stride.value, int(index.lanes)
    if not 2 <= stride <= MAX_STRIDE or lanes < 2:
        return load
    span = tirx.BufferLoad(load.source, [tirx.Ramp(index.base, 1, (lanes - 1) * stride + 1)])
    return tirx.Shuffle([span], [tirx.IntImm("int32", i * stride) for i in range(lanes)])


@tirx.transform.prim_func_pass(opt_level=0, name="tvmbundle.StridedLoadsToShuffles")
def strided_loads_to_shuffles(func, _mod, _ctx):
    return func.with_body(tvm_ffi.structural_map(func.body, [(TensorLoad, _contiguous)]))


def _factory(**_kwargs):
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    lower, host, device = default_s_tir_pipeline()
    # After the whole of it: the vector loads are final there (vectorized, unrolled, simplified),
    # their Ramp indices still written out in place.
    return tvm.transform.Sequential([lower, strided_loads_to_shuffles], name=NAME), host, device


def register() -> str:
    """Register the pipeline (once per process) and return its name."""
    from tvm.tirx.compilation_pipeline import PIPELINE_MAP, register_tir_pipeline

    if NAME not in PIPELINE_MAP:
        register_tir_pipeline(NAME, _factory)
    return NAME
