"""Depthwise convolutions that read their input in channel blocks (NCHW{c}c), written so by the
convolution before them, after FuseTIR.

A depthwise convolution in NCHW has nothing to put in vector lanes but pixels of one channel,
and at stride 2 those are every other pixel: each vector of taps is a load and a shuffle. With
the channels in blocks of one vector (``[N, C/c, H, W, c]``) every tap is one contiguous load and
one multiply-add, at any stride; this is how onnxruntime's MLAS runs MobileNet's depthwise
layers (its NCHWc transformer), and where tvmbundle's lost the most against it (MobileNetV2,
2 threads, AVX-512: 1.1 ms of depthwise layers against 0.69).

The layout is changed on the tensor between the two kernels only, and only where it is that
convolution's one use: the producer (a convolution, which keeps its output channels in vector
lanes anyway) writes the blocks instead of rows, the depthwise kernel reads them; nothing else
in the model sees a different tensor. Both kernels stay the legalized computations with one
buffer's layout changed (a TIR transform_layout of the parameter), so the schedule rules match
them as before and tuning extracts them as they are compiled.
"""

from __future__ import annotations

from typing import NamedTuple

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.s_tir.stmt import SBlock
from tvm.relax.expr_functor import PyExprMutator, mutator

from bundler.compile.relaxfuncs import mutate_functions
from bundler.compile.schedules.base import column_stride
from bundler.compile.schedules.conv import Conv2D, channel_blocked
from bundler.compile.schedules.cpu import describe


def _static(shape) -> list[int] | None:
    try:
        return [int(s) for s in shape]
    except (TypeError, ValueError):
        return None


def _reductions(func: tirx.PrimFunc) -> list:
    found = []

    def visit(block):
        if any(iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars):
            found.append(block)

    tvm_ffi.structural_walk(func.body, [(SBlock, visit)])
    return found


class Depthwise(NamedTuple):
    data: int          # the index of its data parameter
    stride: int        # along its columns
    pixels: int        # of its output map


def depthwise(func: tirx.PrimFunc) -> Depthwise | None:
    """What a depthwise convolution kernel is (``[N, C, H, W]`` data read through its padding,
    ``[C, 1, KH, KW]`` weights, one reduction), or None for any other kernel."""
    reds = _reductions(func)
    if len(reds) != 1:
        return None
    (red,) = reds
    if len(red.reads) != 2 or len(red.writes) != 1:
        return None
    shapes = [_static(p.shape) for p in func.params]
    weights = [i for i, s in enumerate(shapes) if s is not None and len(s) == 4 and s[1] == 1
               and any(r.source.same_as(func.params[i]) for r in red.reads)]
    if len(weights) != 1:
        return None
    c = shapes[weights[0]][0]
    out = _static(red.writes[0].source.shape)
    if out is None or len(out) != 4 or out[1] != c or c == 1:
        return None
    # The data: read by the reduction itself, or by the one stage before it (topi's padding).
    (read,) = [r for r in red.reads if not r.source.same_as(func.params[weights[0]])]
    src = read.source
    x = red.writes[0].region[3].min
    stride = column_stride(read.region[3].min, x) if isinstance(x, tirx.Var) else None
    writers = []
    tvm_ffi.structural_walk(func.body, [(SBlock, lambda b: writers.append(b) if any(
        w.source.same_as(src) for w in b.writes) else None)])
    # Only through a padding stage (which the depthwise schedule lays out in blocks too).
    if len(writers) != 1 or writers[0] is red or len(writers[0].reads) != 1:
        return None
    src = writers[0].reads[0].source
    data = [i for i, p in enumerate(func.params[:-1]) if p.same_as(src)]
    if len(data) != 1 or shapes[data[0]] is None or len(shapes[data[0]]) != 4 or shapes[data[0]][1] != c or not stride:
        return None
    return Depthwise(data[0], stride, out[2] * out[3])


def _blocked(func: tirx.PrimFunc, index: int, c: int) -> tirx.PrimFunc:
    """``func`` with parameter ``index`` ([N, C, H, W]) laid out as [N, C/c, H, W, c]."""
    buf = func.params[index]
    sch = s_tir.Schedule(func)
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(b)
        for kind, regions in (("write", stmt.writes), ("read", stmt.reads)):
            for i, r in enumerate(regions):
                if r.source.same_as(buf):
                    sch.transform_layout(b, (kind, i), channel_blocked(c))
                    return sch.mod["main"]
    raise ValueError(f"kernel parameter {index} is not accessed")    # not a pair the plan makes


@mutator
class _ChannelBlocks(PyExprMutator):
    """Rewrites the pairs it finds, except kernels in ``refused`` ((name, parameter index)):
    each blocked variant of a kernel is made once, however many calls share it."""

    def __init__(self, mod: tvm.IRModule, lanes: int, refused: frozenset = frozenset()) -> None:
        super().__init__(mod)
        self.mod = mod
        self.lanes = lanes
        self.refused = refused
        self.call_tir = tvm.ir.Op.get("relax.call_tir")
        self.made: dict[tuple[str, int], tvm.ir.GlobalVar] = {}
        self.plan: dict[relax.Var, tuple[relax.Call, int]] = {}   # binding -> (its call, the blocked parameter)

    def transform(self) -> tvm.IRModule:
        for _gv, func in self.mod.functions_items():
            if isinstance(func, relax.Function):
                self._plan(func)
        return mutate_functions(self, self.mod) if self.plan else self.mod

    def _kernel(self, call) -> tirx.PrimFunc | None:
        if not (isinstance(call, relax.Call) and call.op.same_as(self.call_tir)):
            return None
        f = self.mod[call.args[0]]
        return f if isinstance(f, tirx.PrimFunc) else None

    def _plan(self, func: relax.Function) -> None:
        bound, uses = {}, {}

        def count(e):
            # Every occurrence (post_order_visit would see a shared node once).
            if isinstance(e, relax.Var):
                uses[e] = uses.get(e, 0) + 1
            elif isinstance(e, relax.Tuple):
                for x in e.fields:
                    count(x)
            elif isinstance(e, relax.Call):
                for x in e.args:
                    count(x)
            elif isinstance(e, relax.Expr):
                for v in relax.analysis.free_vars(e):
                    uses[v] = uses.get(v, 0) + 1

        for block in func.body.blocks:
            for b in block.bindings:
                if not isinstance(b, relax.VarBinding):
                    return          # a match binding: not the flat dataflow FuseTIR leaves
                bound[b.var] = b.value
                count(b.value)
        count(func.body.body)
        for var, call in bound.items():
            f = self._kernel(call)
            dw = depthwise(f) if f is not None else None
            # Not at stride 1 on a large map, where the pixels-in-lanes schedule reads whole rows
            # as vectors too, and ran faster alone (144 channels, 3x3, 2 threads, AVX-512: 56x56
            # 96 against 113 us, 112x112 278 against 430); at stride 2, and from 28x28 down, the
            # blocks won or tied alone (112x112 at stride 2: 305 against 178 us; 14x14 at stride 2:
            # 9.8 against 3.7) and won in the model.
            if dw is None or (dw.stride == 1 and dw.pixels > 28 * 28):
                continue
            src = call.args[1].fields[dw.data]
            producer = bound.get(src)
            pf = self._kernel(producer)
            shape = _static(f.params[dw.data].shape)
            if (pf is None or uses.get(src, 0) != 1 or shape[1] % self.lanes or str(f.params[dw.data].dtype) != "float32"
                    or not _convolution(pf)):
                continue
            pair = {src: (producer, len(pf.params) - 1), var: (call, dw.data)}
            if any((c.args[0].name_hint, i) in self.refused for c, i in pair.values()):
                continue
            self.plan.update(pair)

    def variant(self, gv: tvm.ir.GlobalVar, index: int) -> tvm.ir.GlobalVar:
        key = (gv.name_hint, index)
        if key not in self.made:
            f = _blocked(self.mod[gv], index, self.lanes).with_attr("tvmbundle.blocked_from", f"{gv.name_hint}:{index}")
            self.made[key] = self.builder_.add_func(f, f"{gv.name_hint}_nchw{self.lanes}c")
        return self.made[key]

    def visit_var_binding_(self, binding) -> None:
        if binding.var not in self.plan:
            return super().visit_var_binding_(binding)
        call, index = self.plan[binding.var]
        gv, args = call.args[0], [self.visit_expr(a) for a in call.args[1].fields]
        out = call.ty_args[0]
        if index == len(self.mod[gv].params) - 1:
            shape = tvm.tirx.IndexMap.from_func(channel_blocked(self.lanes), ndim=4).map_shape(list(out.shape.values))
            out = relax.TensorType([int(d) for d in shape], out.dtype)
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(relax.call_tir(self.variant(gv, index), args, out), binding.var.name))


def _convolution(func: tirx.PrimFunc) -> bool:
    """A convolution with an epilogue after it (the blocks are written by the epilogue: the
    Conv2D rule keeps the reduction's accumulators in registers)."""
    reds = _reductions(func)
    if len(reds) != 1 or len(reds[0].reads) != 2 or len(reds[0].writes) != 1:
        return False
    out = reds[0].writes[0].source
    return len(out.shape) == 4 and not any(out.same_as(p) for p in func.params)


def _refusals(mod: tvm.IRModule, target) -> frozenset:
    """The blocked kernels the Conv2D rule does not take, as (original name, parameter): those
    stay as they were rather than fall to a slower rule. (Checked on the kernels as the rules
    will see them: with their constant parameters marked, which AttachAttrLayoutFreeBuffers
    does from the call sites.)"""
    marked = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
    out = set()
    for _gv, f in marked.functions_items():
        if isinstance(f, tirx.PrimFunc) and f.attrs is not None and "tvmbundle.blocked_from" in f.attrs:
            if Conv2D().apply(f, target, False) is None:
                name, index = str(f.attrs["tvmbundle.blocked_from"]).rsplit(":", 1)
                out.add((name, int(index)))
    return frozenset(out)


@tvm.transform.module_pass(opt_level=0, name="tvmbundle.ChannelBlocks")
def channel_blocks(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return mod
    lanes = describe(target).lanes(32)
    if lanes < 4 or not any(isinstance(f, relax.Function) for _gv, f in mod.functions_items()):
        return mod
    out = _ChannelBlocks(mod, lanes).transform()
    if out is mod:
        return mod
    refused = _refusals(out, target)
    if refused:
        out = _ChannelBlocks(mod, lanes, refused).transform()
    # The mutator leaves each rewritten binding's old variable bound to the new one.
    return relax.transform.CanonicalizeBindings()(out)
