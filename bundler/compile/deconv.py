"""Transposed convolutions whose kernel equals their stride, as a 1x1 convolution and a
depth-to-space shuffle, before legalization.

Such a ConvTranspose (the 2x2 stride-2 upsampling of DBNet, U-Net and FPN heads) writes each
output pixel from exactly one input pixel: ``out[n, o, y*s + i, x*s + j] = sum_c in[n, c, y, x] *
w[c, o, i, j]``. topi's ``conv2d_transpose_nchw`` computes it as a convolution over the input with
zeros inserted between its pixels, multiplying s*s times more terms than there are, three
quarters of them zeros at stride 2: on the DBNet-style detector of scripts/bench-model its two
upsampling kernels took 1.35 ms of 4.35 (onnxruntime: 0.23 ms). As a 1x1 convolution to O*s*s
channels (the weights reordered once, here, at compile time), which the default Conv2D rule
schedules as a matrix product, and a reshape-transpose-reshape that the bias and activation
fuse into, it does only the products there are.

Other transposed convolutions (overlapping windows, padding, groups, dilation, output padding)
are left to topi.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant  # a Relax constant in TVM 0.27
from tvm.relax.expr_functor import PyExprMutator, mutator

from bundler.compile.relaxfuncs import mutate_functions


def _ints(xs) -> list[int]:
    return [int(x) for x in xs]


def _static_shape(expr) -> list[int] | None:
    shape = getattr(getattr(expr, "ty", None), "shape", None)    # its TensorType's (struct info's) shape
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return [int(v) for v in shape.values]
    except (TypeError, ValueError):       # a symbolic dimension
        return None


def _rewrite(call: relax.Call):
    """The replacement of ``call`` (a relax.nn.conv2d_transpose), or None when it is not the
    non-overlapping kind."""
    attrs = call.attrs
    data, weight = call.args
    if not isinstance(weight, Constant):
        return None
    if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NCHW", "IOHW", "NCHW"):
        return None
    strides, padding = _ints(attrs.strides), _ints(attrs.padding)
    if int(attrs.groups) != 1 or any(_ints(attrs.output_padding)) or any(padding) or _ints(attrs.dilation) != [1, 1]:
        return None
    w = weight.value.numpy()
    shape = _static_shape(data)
    if w.ndim != 4 or shape is None or len(shape) != 4 or [w.shape[2], w.shape[3]] != strides:
        return None
    if attrs.out_dtype and str(attrs.out_dtype) not in ("", str(w.dtype)):
        return None
    n, c, h, wd = shape
    ci, o, sh, sw = w.shape
    if ci != c:
        return None
    # [C, O, sh, sw] -> [O*sh*sw, C, 1, 1]: output channel (o, i, j) of the 1x1 convolution is
    # output pixel (y*sh + i, x*sw + j) of channel o.
    w1 = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(o * sh * sw, c, 1, 1))
    op = relax.op
    y = op.nn.conv2d(data, relax.const(w1), strides=1, padding=0, data_layout="NCHW", kernel_layout="OIHW")
    y = op.reshape(y, [n, o, sh, sw, h, wd])
    y = op.permute_dims(y, [0, 1, 4, 2, 5, 3])
    return op.reshape(y, [n, o, h * sh, wd * sw])


@mutator
class _Deconv(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod
        self.op = tvm.ir.Op.get("relax.nn.conv2d_transpose")

    def transform(self) -> tvm.IRModule:
        return mutate_functions(self, self.mod)

    def visit_call_(self, call: relax.Call):
        call = super().visit_call_(call)
        if isinstance(call, relax.Call) and call.op.same_as(self.op):
            new = _rewrite(call)
            if new is not None:
                return new
        return call


@tvm.transform.module_pass(opt_level=0, name="tvmbundle.NonOverlappingDeconv")
def non_overlapping_deconv(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    if not any(isinstance(f, relax.Function) for _gv, f in mod.functions_items()):
        return mod
    return _Deconv(mod).transform()
