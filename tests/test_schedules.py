"""The default CPU schedules (bundler/compile/schedules): each rule matches the kernels it is
written for and computes what onnxruntime computes, on shapes chosen to hit the edges (extents
no tile or vector divides, stride 2, padding, dilation, groups, depthwise, batch > 1, fused
epilogues), on this machine natively for a generic x86-64 and for its own CPU (AVX-512 here),
cross-compiled for every board's CPU, and (slow) through a real bundle under qemu-user: rpi4's
with PyPI's aarch64 runtime, rpi3-armhf's and visionfive2's with a runtime built from the TVM tree
in TVMBUNDLE_TEST_TVM_SOURCE (skipped without one).

The models are a few ONNX nodes each, built here with onnx.helper and seeded weights, so every
compile takes a fraction of a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")
import tvm_ffi
from tvm.s_tir.stmt import SBlock
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.relax.frontend.onnx import from_onnx

from bundler.compile import lowering, pipeline, schedules
from bundler.compile.deconv import non_overlapping_deconv
from bundler.compile.schedules.cpu import describe

REPO = Path(__file__).resolve().parent.parent
OPSET = 17

HOST_CPU = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()
TARGETS = {
    "x86-64": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "num-cores": 2},            # SSE2: 4 lanes
    "native": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": HOST_CPU, "num-cores": 2},
}


# --- models --------------------------------------------------------------------------------

def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    """``outputs``: names (shapes left to inference) or (name, shape)."""
    outputs = [(o, None) if isinstance(o, str) else o for o in outputs]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    # Outputs get the shapes ONNX infers (tvmbundle needs static ones); a wiring mistake fails here.
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    onnx.checker.check_model(m, full_check=True)
    return m


def _w(rng, name, shape, scale=None):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    s = scale if scale is not None else (2.0 / max(fan_in, 1)) ** 0.5
    return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)


def conv(n=1, c=8, hw=10, oc=32, k=3, stride=1, pad=1, groups=1, dilation=1, epilogue="relu", transpose=False):
    """One Conv (or ConvTranspose) with a bias and an elementwise epilogue FuseOps fuses in."""
    rng = np.random.default_rng(hash((n, c, hw, oc, k, stride, pad, groups, dilation)) % 2**32)
    wshape = (c, oc // groups, k, k) if transpose else (oc, c // groups, k, k)
    inits = [_w(rng, "w", wshape), _w(rng, "b", (oc,), 0.5)]
    op = "ConvTranspose" if transpose else "Conv"
    nodes = [helper.make_node(op, ["x", "w", "b"], ["c"], pads=[pad] * 4, strides=[stride] * 2, group=groups,
                              dilations=[dilation] * 2)]
    out = "c"
    if epilogue == "relu":
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
        out = "y"
    elif epilogue == "clip":      # ReLU6 as torch exports it
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"]))
        out = "y"
    elif epilogue == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["c"], ["y"]))
        out = "y"
    elif epilogue == "residual":  # conv + bias + a second input + relu
        nodes += [helper.make_node("Add", ["c", "r"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
        out = "y"
    inputs = [("x", [n, c, hw, hw])]
    if epilogue == "residual":
        assert stride == 1 and 2 * pad == (k - 1) * dilation
        inputs.append(("r", [n, oc, hw, hw]))
    return _model(nodes, inputs, [out], inits)


def expand_depthwise(n=1, c=8, e=48, hw=15, k=3, stride=2, pad=1, dilation=1, stem=False, uses=1):
    """MobileNet's inverted-residual front: a convolution (1x1, or a 3x3 stride-2 stem) with
    ReLU6, then a depthwise one with ReLU6; ``uses`` 2 reads the first one's output twice."""
    rng = np.random.default_rng(hash((n, c, e, hw, k, stride, pad, dilation, stem)) % 2**32)
    kw = dict(pads=[1] * 4, strides=[2, 2]) if stem else {}
    inits = [_w(rng, "w1", (e, c, 3, 3) if stem else (e, c, 1, 1)), _w(rng, "b1", (e,), 0.5),
             _w(rng, "w2", (e, 1, k, k)), _w(rng, "b2", (e,), 0.5),
             numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], **kw), helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], group=e, pads=[pad] * 4, strides=[stride] * 2,
                              dilations=[dilation] * 2),
             helper.make_node("Clip", ["c2", "lo", "hi"], ["y"])]
    outputs = ["y"]
    if uses == 2:
        nodes.append(helper.make_node("Relu", ["r1"], ["z"]))
        outputs.append("z")
    return _model(nodes, [("x", [n, c, hw, hw])], outputs, inits)


def gemm(m=1, k=64, n=1000, trans_b=True, const_b=True, relu=False):
    rng = np.random.default_rng(m * 7 + k * 3 + n)
    inits = [_w(rng, "b", (n,), 0.5)]
    inputs = [("a", [m, k])]
    if const_b:
        inits.append(_w(rng, "w", (n, k) if trans_b else (k, n)))
    else:
        inputs.append(("w", [n, k] if trans_b else [k, n]))
    nodes = [helper.make_node("Gemm", ["a", "w", "b"], ["g"], transB=int(trans_b))]
    if relu:
        nodes.append(helper.make_node("Relu", ["g"], ["y"]))
    return _model(nodes, inputs, ["y" if relu else "g"], inits)


def matmul(a_shape, b_shape, const_b=True, bias=True):
    rng = np.random.default_rng(sum(a_shape) + sum(b_shape))
    inits, inputs = [], [("a", list(a_shape))]
    if const_b:
        inits.append(_w(rng, "w", b_shape))
    else:
        inputs.append(("w", list(b_shape)))
    nodes = [helper.make_node("MatMul", ["a", "w"], ["mm"])]
    out = "mm"
    if bias:
        inits.append(_w(rng, "bias", (b_shape[-1],), 0.5))
        nodes += [helper.make_node("Add", ["mm", "bias"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
        out = "y"
    return _model(nodes, inputs, [out], inits)


def single(op, shape, outputs=1, inits=(), extra_inputs=(), **attrs):
    names = [f"y{i}" for i in range(outputs)]
    return _model([helper.make_node(op, ["x", *extra_inputs], names, **attrs)], [("x", list(shape))], names, inits)


def layer_norm(shape):
    rng = np.random.default_rng(3)
    d = shape[-1]
    inits = [_w(rng, "g", (d,), 1.0), _w(rng, "b", (d,), 0.5)]
    return _model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)],
                  [("x", list(shape))], ["y"], inits)


def elementwise():
    rng = np.random.default_rng(4)
    inits = [_w(rng, "s", (1, 3, 1, 1), 1.0), _w(rng, "t", (1, 3, 1, 1), 1.0)]
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 3, 1])]
    return _model(nodes, [("x", [2, 3, 17, 19])], ["y"], inits)


def resize_concat():
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["u"], mode="nearest"),
             helper.make_node("Concat", ["u", "z"], ["y"], axis=1)]
    return _model(nodes, [("x", [1, 5, 7, 9]), ("z", [1, 3, 14, 18])], ["y"], [scales])


def _i64(name, v):
    return numpy_helper.from_array(np.array(v, np.int64), name)


# (case id, model factory, kernel name fragment, rule that must schedule it)
CASES = [
    ("conv3x3", lambda: conv(), "conv2d", "Conv2D"),
    ("conv3x3-odd-stride2-batch2", lambda: conv(n=2, c=5, hw=13, oc=12, stride=2), "conv2d", "Conv2D"),
    ("conv3x3-dilation2", lambda: conv(c=6, hw=11, oc=16, pad=2, dilation=2), "conv2d", "Conv2D"),
    ("conv-stem-7x7-stride2", lambda: conv(c=3, hw=23, oc=16, k=7, stride=2, pad=3), "conv2d", "Conv2D"),
    ("conv-residual-epilogue", lambda: conv(c=16, hw=9, oc=24, epilogue="residual"), "conv2d", "Conv2D"),
    ("conv-grouped", lambda: conv(c=16, hw=9, oc=32, groups=4), "conv2d", "Conv2D"),
    ("conv-grouped-narrow", lambda: conv(c=12, hw=8, oc=6, groups=3), "conv2d", "Conv2D"),
    ("depthwise", lambda: conv(c=24, hw=15, oc=24, groups=24, epilogue="clip"), "conv2d", "Conv2D"),
    ("depthwise-stride2", lambda: conv(c=24, hw=15, oc=24, groups=24, stride=2, epilogue="clip"), "conv2d", "Conv2D"),
    ("depthwise-5x5-7x7map", lambda: conv(c=40, hw=7, oc=40, k=5, pad=2, groups=40), "conv2d", "Conv2D"),
    # written and read in channel blocks (compile/channelblocks.py): odd maps, stride 2, batch 2,
    # dilation, a 5x5 window, a stem convolution as the producer, channels that are a multiple of
    # SSE's 4 lanes but not of AVX-512's 16 (blocked for one target, not the other)
    ("blocks-pointwise-depthwise-stride2", lambda: expand_depthwise(), "conv2d", "Conv2D"),
    ("blocks-batch2-odd-map-stride1", lambda: expand_depthwise(n=2, c=5, e=32, hw=9, stride=1), "conv2d", "Conv2D"),
    ("blocks-dilation2-5x5", lambda: expand_depthwise(c=8, e=16, hw=11, k=5, stride=1, pad=4, dilation=2), "conv2d", "Conv2D"),
    ("blocks-stem-producer", lambda: expand_depthwise(c=3, e=32, hw=29, stem=True), "conv2d", "Conv2D"),
    ("blocks-channels-of-4-not-16", lambda: expand_depthwise(c=6, e=20, hw=14), "conv2d", "Conv2D"),
    ("pointwise", lambda: conv(c=24, hw=16, oc=40, k=1, pad=0, epilogue="residual"), "conv2d", "Conv2D"),
    ("pointwise-odd-map", lambda: conv(c=24, hw=9, oc=40, k=1, pad=0), "conv2d", "Conv2D"),
    # 7x7: no pixel tile of whole vectors divides it; rows and columns fused into one pixel axis
    ("pointwise-7x7-batch2-residual", lambda: conv(n=2, c=20, hw=7, oc=32, k=1, pad=0, epilogue="residual"), "conv2d", "Conv2D"),
    ("pointwise-stride2", lambda: conv(c=16, hw=14, oc=32, k=1, pad=0, stride=2, epilogue="none"), "conv2d", "Conv2D"),
    ("conv-one-channel-head", lambda: conv(c=16, hw=12, oc=1, epilogue="sigmoid"), "conv2d", None),
    # kernel == stride: rewritten to a 1x1 convolution and a depth-to-space shuffle (compile/deconv.py)
    ("conv-transpose-2x2-stride2", lambda: conv(c=8, hw=6, oc=8, k=2, stride=2, pad=0, transpose=True), "conv2d", "Conv2D"),
    ("conv-transpose-head-1-channel-batch2", lambda: conv(n=2, c=16, hw=10, oc=1, k=2, stride=2, pad=0, transpose=True,
                                                          epilogue="sigmoid"), "conv2d", None),
    ("conv-transpose-3x3-stride3-odd", lambda: conv(c=5, hw=7, oc=6, k=3, stride=3, pad=0, transpose=True), "conv2d", None),
    # overlapping windows and padding: left to topi's conv2d_transpose
    ("conv-transpose-3x3-stride2-pad1", lambda: conv(c=8, hw=6, oc=8, k=3, stride=2, pad=1, transpose=True),
     "conv2d_transpose", None),
    ("gemv", lambda: gemm(), "matmul", "Matmul"),
    ("gemm-small-odd", lambda: gemm(m=5, k=33, n=19, trans_b=False, relu=True), "matmul", "Matmul"),
    ("gemm-nonconst-transposed", lambda: gemm(m=6, k=20, n=24, const_b=False), "matmul", "Matmul"),
    ("matmul-batch-epilogue", lambda: matmul((2, 7, 33), (33, 50)), "matmul", "Matmul"),
    ("batch-matmul-activations", lambda: matmul((2, 3, 17, 9), (2, 3, 9, 20), const_b=False, bias=False), "matmul", "Matmul"),
    ("maxpool-3x3-stride2-pad", lambda: single("MaxPool", (1, 8, 15, 15), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
     "pool", "WindowReduction"),
    ("avgpool-2x2", lambda: single("AveragePool", (2, 5, 10, 10), kernel_shape=[2, 2], strides=[2, 2]), "pool", "WindowReduction"),
    ("global-avgpool", lambda: single("GlobalAveragePool", (2, 40, 7, 7)), "mean", "Reduction"),
    ("global-avgpool-28x28", lambda: single("GlobalAveragePool", (1, 24, 28, 28)), "mean", "Reduction"),
    ("reduce-sum-last-axis", lambda: single("ReduceSum", (2, 6, 50), inits=[_i64("ax", [-1])], extra_inputs=["ax"], keepdims=0),
     "sum", "Reduction"),
    ("reduce-max-prime-row", lambda: single("ReduceMax", (3, 37), axes=[-1], keepdims=0), "max", "Reduction"),
    ("softmax", lambda: single("Softmax", (2, 5, 37), axis=-1), "softmax", "Reduction"),
    ("softmax-rows-of-48", lambda: single("Softmax", (2, 3, 5, 48), axis=-1), "softmax", "Reduction"),
    # over channels (a segmentation head's classes): rows that are not contiguous
    ("softmax-over-channels", lambda: single("Softmax", (2, 19, 5, 6), axis=1), "softmax", None),
    ("layernorm", lambda: layer_norm((3, 10, 48)), "layer_norm", "Reduction"),
    ("reduce-sum-middle-axis", lambda: single("ReduceSum", (4, 30, 6), inits=[_i64("ax", [1])], extra_inputs=["ax"], keepdims=0),
     "sum", None),
    ("elementwise-broadcast-transpose", elementwise, "", "Elementwise"),
    ("resize-concat", resize_concat, "", "Elementwise"),
    ("cumsum-falls-back", lambda: single("CumSum", (3, 37), inits=[_i64("ax", 1)], extra_inputs=["ax"]), "cumsum", "Fallback"),
]


# --- compiling ------------------------------------------------------------------------------

def _pre_passes():
    """What make runs before scheduling: the pipeline's own list, so the two cannot drift."""
    return pipeline._pre_tuning_passes()


def lower(model: onnx.ModelProto, target: dict, schedule_pass=None):
    """The model's fused kernels, scheduled; and a pipeline that finishes compiling them."""
    t = tvm.target.Target(target)
    mod = from_onnx(model, keep_params_in_input=False)
    with t:
        mod = tvm.transform.Sequential([*_pre_passes(), schedule_pass or schedules.default_schedule_pass(t)])(mod)
    return t, mod


def build(model: onnx.ModelProto, target: dict, schedule_pass=None):
    t, mod = lower(model, target, schedule_pass)

    @tvm.transform.module_pass(opt_level=0, name="rest")
    def rest(m, _ctx):
        with t:
            return tvm.transform.Sequential(cpu_pipeline.dataflow_lower_passes(t) + cpu_pipeline.finalize_passes(t))(m)

    return tvm.compile(mod, target=t, relax_pipeline=rest, tir_pipeline=lowering.register()), mod


def inputs_for(model: onnx.ModelProto, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.uniform(-1, 1, [d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


def run_tvm(ex, feeds) -> list[np.ndarray]:
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in feeds.values()])
    return [o.numpy() for o in out] if not hasattr(out, "numpy") else [out.numpy()]


def run_onnxruntime(model, feeds) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_close(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * max(1.0, float(np.max(np.abs(w)))))


# --- the CPU description ---------------------------------------------------------------------

def _recipe_target(name: str) -> dict:
    import tomllib

    data = tomllib.loads((REPO / "recipes" / f"{name}.toml").read_text())
    t = dict(data.get("tvm", {}).get("target", {}))
    if "extends" in data:
        base = _recipe_target(data["extends"])
        base.update(t)
        t = base
    t["num-cores"] = data.get("service", {}).get("threads", 4)
    return t


@pytest.mark.parametrize("target, bits, registers", [
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}, 128, 16),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}, 256, 16),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mattr": ["+avx2", "+fma"]}, 256, 16),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}, 512, 32),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}, 512, 32),
    ("rpi4", 128, 32),
    ("rpi3-armhf", 128, 16),
    ("visionfive2", 0, 32),
])
def test_cpu_is_read_from_the_target_not_the_build_host(target, bits, registers):
    t = _recipe_target(target) if isinstance(target, str) else target
    cpu = describe(tvm.target.Target(t))
    assert (cpu.vector_bits, cpu.vector_registers) == (bits, registers)
    assert cpu.lanes(32) == max(1, bits // 32)
    assert cpu.threads == t.get("num-cores", 1)


# --- each rule: its kernels, and the numbers -------------------------------------------------

@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("case, factory, kernel, rule", CASES, ids=[c[0] for c in CASES])
def test_rule_matches_and_agrees_with_onnxruntime(case, factory, kernel, rule, target):
    model = factory()
    ex, mod = build(model, TARGETS[target])
    by = schedules.scheduled_by(mod)
    if rule is not None:
        mine = {k: v for k, v in by.items() if kernel in k}
        assert mine and set(mine.values()) == {rule}, by
    feeds = inputs_for(model)
    assert_close(run_tvm(ex, feeds), run_onnxruntime(model, feeds))


def test_weights_are_packed_at_compile_time():
    """The packing kernels SplitLayoutRewritePreproc splits out are folded into constants: none
    is left for the bundle to run."""
    _, mod = lower(conv(c=16, hw=8, oc=32), TARGETS["native"])
    names = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any(n.endswith("_prepacked") for n in names), names
    called = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: called.append(e.args[0].name_hint) if (
        isinstance(e, relax.Call) and e.op.same_as(tvm.ir.Op.get("relax.call_tir"))) else None)
    assert called and not any("weight_prepack" in c for c in called), called


def test_kernels_scheduled_before_are_left_alone():
    """A kernel a tuning database scheduled (tirx.is_scheduled) keeps its schedule."""
    t, mod = lower(conv(), TARGETS["native"], schedule_pass=tvm.transform.Sequential([]))
    marked = {gv: f.with_attr("tirx.is_scheduled", True) for gv, f in mod.functions_items()
              if isinstance(f, tvm.tirx.PrimFunc)}
    for gv, f in marked.items():
        mod[gv] = f
    with t:
        out = schedules.default_schedule_pass(t)(mod)
    assert schedules.scheduled_by(out) == {}
    # (The Relax passes around the rules may rename a kernel and mark its constant parameters
    # as layout-free, so compare bodies.)
    after = [f for _, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(after) == len(marked)
    for f in marked.values():
        assert any(tvm_ffi.structural_equal(f.body, g.body) for g in after)


# --- a whole model: nothing left unscheduled ---------------------------------------------------

def small_net() -> onnx.ModelProto:
    """A bit of everything FuseOps makes kernels of: stem conv, depthwise and pointwise convs with
    ReLU6, a residual add, max pooling, an upsample and concat, a transposed conv, global
    average pooling, a dense layer, softmax, layer norm, and a scan no rule is written for."""
    rng = np.random.default_rng(11)
    f32 = lambda n, v: numpy_helper.from_array(np.array(v, np.float32), n)
    inits = [_w(rng, "w0", (16, 3, 3, 3)), _w(rng, "b0", (16,), 0.5),
             _w(rng, "wd", (16, 1, 3, 3)), _w(rng, "bd", (16,), 0.5),
             _w(rng, "wp", (16, 16, 1, 1)), _w(rng, "bp", (16,), 0.5),
             _w(rng, "wt", (16, 8, 2, 2)), _w(rng, "bt", (8,), 0.5),
             _w(rng, "fc", (24, 10)), _w(rng, "fcb", (10,), 0.5),
             _w(rng, "lg", (10,), 1.0), _w(rng, "lb", (10,), 0.5),
             f32("lo", 0.0), f32("hi", 6.0), numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc"),
             _i64("ax", 1)]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], strides=[2, 2]), n("Clip", ["c0", "lo", "hi"], ["r0"]),
        n("Conv", ["r0", "wd", "bd"], ["c1"], pads=[1, 1, 1, 1], group=16), n("Clip", ["c1", "lo", "hi"], ["r1"]),
        n("Conv", ["r1", "wp", "bp"], ["c2"]), n("Add", ["c2", "r0"], ["s2"]),
        n("MaxPool", ["s2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        n("Resize", ["p", "", "sc"], ["u"], mode="nearest"), n("Concat", ["u", "s2"], ["cat"], axis=1),
        n("Slice", ["cat", "st", "en", "axs"], ["half"]),
        n("ConvTranspose", ["half", "wt", "bt"], ["t"], strides=[2, 2]), n("Sigmoid", ["t"], ["ts"]),
        n("GlobalAveragePool", ["cat"], ["g"]), n("Flatten", ["g"], ["f"]),
        n("Slice", ["f", "st1", "en1", "ax1"], ["f24"]),
        n("MatMul", ["f24", "fc"], ["mm"]), n("Add", ["mm", "fcb"], ["logits"]),
        n("Softmax", ["logits"], ["probs"], axis=-1),
        n("LayerNormalization", ["logits", "lg", "lb"], ["ln"], axis=-1),
        n("CumSum", ["ln", "ax"], ["cs"]),
    ]
    inits += [_i64("st", [0]), _i64("en", [16]), _i64("axs", [1]), _i64("st1", [0]), _i64("en1", [24]), _i64("ax1", [1])]
    return _model(nodes, [("x", [1, 3, 32, 32])], ["probs", "cs", "ts"], inits)


def test_every_kernel_of_a_model_gets_a_schedule():
    model = small_net()
    ex, mod = build(model, TARGETS["native"])
    kernels = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    unscheduled = [k for k, f in kernels.items() if not (f.attrs and f.attrs.get("tirx.is_scheduled", False))]
    assert not unscheduled
    by = schedules.scheduled_by(mod)
    assert set(by) == set(kernels)
    # Only the scan needs the fallback; everything else has its own rule.
    fallback = {k for k, r in by.items() if r == "Fallback"}
    assert fallback and all("cumsum" in k for k in fallback), by
    for rule in ("Conv2D", "Matmul", "WindowReduction", "Reduction", "Elementwise"):
        assert rule in by.values(), by
    feeds = inputs_for(model)
    assert_close(run_tvm(ex, feeds), run_onnxruntime(model, feeds))


def test_fallback_alone_schedules_any_kernel():
    """With no other rule, the fallback still schedules (and parallelizes) every kernel, and
    the numbers stay right."""
    model = small_net()
    ex, mod = build(model, TARGETS["native"], schedule_pass=schedules.ApplySchedules(schedules.Fallback()))
    by = schedules.scheduled_by(mod)
    assert by and set(by.values()) == {"Fallback"}
    assert all(f.attrs.get("tirx.is_scheduled", False) for _, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc))
    assert "T.parallel" in "".join(f.script() for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    feeds = inputs_for(model)
    assert_close(run_tvm(ex, feeds), run_onnxruntime(model, feeds))


# --- every board's CPU: the kernels compile and link ---------------------------------------

BOARDS = {"rpi4": "aarch64-linux-gnu-g++", "rpi5": "aarch64-linux-gnu-g++", "rpi3-armhf": "arm-linux-gnueabihf-g++", "visionfive2": "riscv64-linux-gnu-g++"}
ELF_MACHINE = {"rpi4": "AArch64", "rpi5": "AArch64", "rpi3-armhf": "ARM", "visionfive2": "RISC-V"}


@pytest.mark.parametrize("board", list(BOARDS))
def test_every_rule_cross_compiles_for_the_board(board, tmp_path):
    """Codegen and link for each board's target of one module holding every case's kernels
    (one export, so one LLVM run per board). The numbers on each board's CPU are checked by the
    slow bundle test below (armv7's and riscv64's only given a TVM tree: PyPI ships no runtime
    for them)."""
    cxx = BOARDS[board]
    if shutil.which(cxx) is None:
        pytest.skip(f"needs {cxx} (scripts/setup installs it)")
    from tvm.support import cc

    target = _recipe_target(board)
    lanes = describe(tvm.target.Target(target)).lanes()
    kernels, rules_seen = {}, set()
    for case, factory, _kernel, _rule in CASES:
        _, mod = lower(factory(), target)
        rules_seen |= set(schedules.scheduled_by(mod).values())
        for gv, f in mod.functions_items():
            if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint in schedules.scheduled_by(mod):
                kernels[f"{case}_{gv.name_hint}".replace("-", "_")] = f
    assert {"Conv2D", "Matmul", "WindowReduction", "Reduction", "Elementwise", "Fallback"} <= rules_seen
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in kernels.items()})
    lib = tvm.compile(mod, target=tvm.target.Target(target), tir_pipeline=lowering.register())
    so = tmp_path / "kernels.so"
    lib.export_library(str(so), fcompile=cc.cross_compiler(cxx))
    header = subprocess.run(["readelf", "-h", str(so)], capture_output=True, text=True, check=True).stdout
    assert ELF_MACHINE[board] in header
    if lanes == 1:
        # No vector unit (rv64gc): loops stay scalar, still parallel.
        assert "T.vectorized" not in "".join(f.script() for f in kernels.values())
    else:
        # The stride-2 depthwise pixels load as contiguous vectors and shuffles (uzp/vuzp on NEON).
        from tests.test_lowering import lowered

        dw = {n: mod[n] for n in kernels if n.startswith("depthwise_stride2")}
        assert "T.Shuffle" in lowered(tvm.IRModule(dw), target)
    assert "T.parallel" in "".join(f.script() for f in kernels.values())


# --- through a real bundle under qemu-user -----------------------------------------------------

# rpi4 runs on PyPI's aarch64 runtime wheel; PyPI has none for armv7 or riscv64, so those boards'
# bundles need a runtime built from a TVM checkout (with its submodules), which CI cannot clone.
TVM_TREE = os.environ.get("TVMBUNDLE_TEST_TVM_SOURCE")
QEMU_BOARDS = ["rpi4", "rpi3-armhf", "visionfive2"]
# The rules the edge model's kernels exercise (all but the fallback, which only a scan needs).
EDGE_RULES = {"Conv2D", "Matmul", "WindowReduction", "Reduction", "Elementwise"}


def _edge_model(path: Path) -> Path:
    """Every rule's edge cases in one model, so one bundle checks them all on the board."""
    rng = np.random.default_rng(5)
    f32 = lambda n, v: numpy_helper.from_array(np.array(v, np.float32), n)
    n = helper.make_node
    inits = [_w(rng, "w0", (12, 5, 3, 3)), _w(rng, "b0", (12,), 0.5),          # stride 2, odd
             _w(rng, "wg", (24, 3, 3, 3)), _w(rng, "bg", (24,), 0.5),          # groups 4
             _w(rng, "wd", (24, 1, 3, 3)), _w(rng, "bd", (24,), 0.5),          # depthwise, dilation 2
             _w(rng, "wp", (40, 24, 1, 1)), _w(rng, "bp", (40,), 0.5),         # pointwise
             _w(rng, "we", (40, 40, 1, 1)), _w(rng, "be", (40,), 0.5),         # pointwise into
             _w(rng, "ws", (40, 1, 3, 3)), _w(rng, "bs", (40,), 0.5),          # depthwise, stride 2, in channel blocks
             _w(rng, "wh", (1, 40, 3, 3)), _w(rng, "bh", (1,), 0.5),           # one-channel head
             _w(rng, "fc", (40, 19)), _w(rng, "fcb", (19,), 0.5),
             f32("lo", 0.0), f32("hi", 6.0)]
    nodes = [
        n("Conv", ["input", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], strides=[2, 2]), n("Relu", ["c0"], ["r0"]),
        n("Conv", ["r0", "wg", "bg"], ["c1"], pads=[1, 1, 1, 1], group=4), n("Clip", ["c1", "lo", "hi"], ["r1"]),
        n("Conv", ["r1", "wd", "bd"], ["c2"], pads=[2, 2, 2, 2], dilations=[2, 2], group=24),
        n("Conv", ["c2", "wp", "bp"], ["c3"]), n("Relu", ["c3"], ["r3"]),
        n("MaxPool", ["r3"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        n("Conv", ["r3", "we", "be"], ["e"]), n("Clip", ["e", "lo", "hi"], ["re"]),
        n("Conv", ["re", "ws", "bs"], ["s"], pads=[1, 1, 1, 1], strides=[2, 2], group=40),
        n("Clip", ["s", "lo", "hi"], ["rs"]), n("Add", ["p", "rs"], ["ps"]),
        n("Conv", ["ps", "wh", "bh"], ["h"], pads=[1, 1, 1, 1]), n("Sigmoid", ["h"], ["heat"]),
        n("GlobalAveragePool", ["r3"], ["g"]), n("Flatten", ["g"], ["f"]),
        n("MatMul", ["f", "fc"], ["mm"]), n("Add", ["mm", "fcb"], ["logits"]),
        n("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    model = _model(nodes, [("input", [2, 5, 19, 19])], [("probs", [2, 19]), ("heat", [2, 1, 5, 5])], inits)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("board, blocks", [("rpi4", [[2, 10, 10, 10, 4]]), ("rpi3-armhf", [[2, 10, 10, 10, 4]]),
                                           ("visionfive2", [])])
def test_edge_model_has_channel_blocks_where_the_board_has_vectors(board, blocks, tmp_path):
    """So that the qemu test below runs the channel-blocked kernels on NEON (rv64gc has no vector
    unit: nothing to block for)."""
    _t, mod = lower(onnx.load(str(_edge_model(tmp_path / "edges.onnx"))), _recipe_target(board))
    assert _blocked_tensors(mod) == blocks


@pytest.mark.slow
@pytest.mark.parametrize("board", QEMU_BOARDS)
def test_bundle_verifies_under_qemu(board, tmp_path):
    """make + the bundle's selftest under the board's qemu-user: the board's kernels (NEON on
    aarch64 and armv7, scalar on rv64gc) against the same model compiled for this machine; and
    the bundle's outputs against onnxruntime. rpi3-armhf and visionfive2 build their runtime
    from the TVM tree in TVMBUNDLE_TEST_TVM_SOURCE (TVMBUNDLE_TEST_TVM_MISMATCH=1 for a
    development tree near the installed release), and skip without one."""
    from bundler import api
    from bundler.config import recipe
    from bundler.package import verifier
    from tests.test_make import need, onnxruntime_outputs, unpack

    r = recipe.load(board)
    source = {}
    if r.runtime.from_source:
        if not TVM_TREE:
            pytest.skip(f"{board}: PyPI has no TVM runtime for it; set TVMBUNDLE_TEST_TVM_SOURCE to a TVM "
                        "checkout (with submodules) to build one (codegen and link are checked above)")
        source = {"runtime_source": TVM_TREE,
                  "allow_runtime_mismatch": True if os.environ.get("TVMBUNDLE_TEST_TVM_MISMATCH") else None}
    need(r.toolchain.cxx, r.qemu)

    model = _edge_model(tmp_path / "edges.onnx")
    # Every kernel of the model is scheduled, each of these rules by at least one, for this board.
    _, mod = lower(onnx.load(str(model)), _recipe_target(board))
    kernels = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    by = schedules.scheduled_by(mod)
    assert set(by) == set(kernels) and set(by.values()) == EDGE_RULES, by

    res = api.make(board, model, out_dir=tmp_path / "dist", tuned=False, run_verify=True, **source)
    assert res.verified is not None and res.verified.selftest.get("passed"), res.verified
    top = unpack(res.bundle, tmp_path / "x")
    x = np.random.default_rng(9).uniform(-1, 1, (2, 5, 19, 19)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    argv = verifier.harness_argv(top, verifier.BoardFacts.from_recipe(r), "run", "--output-dir",
                                 str(tmp_path / "out"), f"input={tmp_path / 'x.npy'}")
    run = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    want = onnxruntime_outputs(model, [x])
    got = [np.load(p) for p in sorted((tmp_path / "out").glob("*.npy"))]
    assert len(got) == 2
    by_shape = {g.shape: g for g in got}
    for w in want:
        assert_close([by_shape[w.shape]], [w])


# --- knobs: the choices `tune` varies ------------------------------------------------------------

KNOB_CASES = [c for c in CASES if c[3] in ("Conv2D", "Matmul", "WindowReduction")]


def _knob_spaces(model: onnx.ModelProto, t) -> dict[str, tuple[str, dict]]:
    """kernel_key -> (rule, knob space) of each kernel a rule with knobs schedules, as make's
    pipeline sees the kernel (weights marked)."""
    mod = from_onnx(model, keep_params_in_input=False)
    with t:
        mod = tvm.transform.Sequential([*_pre_passes(), relax.transform.AttachAttrLayoutFreeBuffers()])(mod)
        out = {}
        for _gv, f in mod.functions_items():
            if isinstance(f, tvm.tirx.PrimFunc):
                _s, rule, knobs = schedules.schedule_kernel(f, t, schedules.rules(t))
                if knobs is not None and knobs.space:
                    out[schedules.kernel_key(f)] = (rule, knobs.space)
    return out


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("case, factory, kernel, rule", KNOB_CASES, ids=[c[0] for c in KNOB_CASES])
def test_every_knob_value_agrees_with_onnxruntime(case, factory, kernel, rule, target):
    """Every value of every knob a rule offers `tune` (each one changed alone from the rule's own
    choice) schedules the kernel correctly, and make's pipeline applies it: the kernel carries
    the knobs it was scheduled with."""
    model = factory()
    t = tvm.target.Target(TARGETS[target])
    spaces = _knob_spaces(model, t)
    feeds = inputs_for(model)
    want = run_onnxruntime(model, feeds)
    tried = 0
    for key, (rule_name, space) in spaces.items():
        for name, (default, options) in space.items():
            for v in options:
                if v == default:
                    continue
                tuned = {key: {"rule": rule_name, "knobs": {name: v}}}
                ex, mod = build(model, TARGETS[target], schedules.default_schedule_pass(t, tuned))
                marks = [str(f.attrs[schedules.KNOBS_ATTR]) for _gv, f in mod.functions_items()
                         if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and schedules.KNOBS_ATTR in f.attrs]
                assert marks == [f"{name}={v}"], (name, v, marks)
                assert_close(run_tvm(ex, feeds), want)
                tried += 1
    if rule == "Conv2D" or case.startswith("gemm-small") or case.startswith("matmul") or case.endswith("-pad"):
        assert tried > 0, spaces


def test_knobs_without_a_value_are_the_rules_own_choices():
    """A kernel with no tuned knobs, or knobs for another rule, or values the rule does not offer,
    is scheduled exactly as the rule alone schedules it."""
    model = conv(c=24, hw=15, oc=24, groups=24)
    t = tvm.target.Target(TARGETS["native"])
    (key, (rule, space)), = _knob_spaces(model, t).items()
    _, plain = lower(model, TARGETS["native"])
    for tuned in ({key: {"rule": "Matmul", "knobs": {n: o[-1] for n, (_d, o) in space.items()}}},
                  {key: {"rule": rule, "knobs": {n: 999 for n in space}}},
                  {"0" * 16: {"rule": rule, "knobs": {n: o[-1] for n, (_d, o) in space.items()}}}):
        _, mod = lower(model, TARGETS["native"], schedules.default_schedule_pass(t, tuned))
        assert tvm_ffi.structural_equal(mod, plain), tuned


# --- transposed convolutions ------------------------------------------------------------------

def _ops(mod) -> set[str]:
    found = set()

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            found.add(e.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


@pytest.mark.parametrize("k, stride, pad, rewritten", [(2, 2, 0, True), (3, 3, 0, True), (4, 2, 1, False),
                                                        (3, 2, 0, False), (2, 2, 1, False)])
def test_only_non_overlapping_transposed_convolutions_are_rewritten(k, stride, pad, rewritten):
    """kernel == stride without padding becomes conv2d + reshape/transpose; any other stays
    conv2d_transpose (and both compute what onnxruntime computes: the CASES above)."""
    model = conv(c=4, hw=5, oc=3, k=k, stride=stride, pad=pad, transpose=True, epilogue="none")
    mod = non_overlapping_deconv(from_onnx(model, keep_params_in_input=False))
    ops = _ops(mod)
    assert ("relax.nn.conv2d_transpose" not in ops) == rewritten, ops
    assert ("relax.nn.conv2d" in ops) == rewritten, ops


def _blocks_under(mod, fragment: str, kind) -> list[list[str]]:
    """The names of the blocks inside each loop of ``kind`` of the kernel named like ``fragment``."""
    (func,) = [f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and fragment in gv.name_hint]
    loops = []
    tvm_ffi.structural_walk(func.body, [(tvm.tirx.For, lambda lp: loops.append(lp) if lp.kind == kind else None)])
    out = []
    for lp in loops:
        names = []
        tvm_ffi.structural_walk(lp.body, [(SBlock, lambda blk: names.append(blk.name_hint))])
        out.append(names)
    return out


def _padded_where_read(mod, fragment: str) -> bool:
    """Whether one parallel loop of the kernel computes both its padding and what reads it."""
    return any(any("pad" in n for n in names) and any("pad" not in n for n in names)
               for names in _blocks_under(mod, fragment, tvm.tirx.ForKind.PARALLEL))


@pytest.mark.parametrize("case, knob", [("depthwise", "pad_apart"), ("depthwise-stride2", "pad_apart"),
                                        ("maxpool-3x3-stride2-pad", "pad_apart"), ("conv3x3", "pad_rows")])
def test_padding_is_computed_where_it_is_read(case, knob):
    """Depthwise convolutions and pools pad each channel inside the parallel loop that reads it,
    instead of writing the whole padded input first; regular convolutions do so a few rows at
    a time with the pad_rows knob. The knob's other value restores the other."""
    (_c, factory, kernel, rule), = [c for c in CASES if c[0] == case]
    model = factory()
    t = tvm.target.Target(TARGETS["native"])
    (key, (rule_name, space)), = _knob_spaces(model, t).items()
    default, options = space[knob]
    other = max(o for o in options if o != default)
    got = []
    for v in (default, other):
        _t, mod = lower(model, TARGETS["native"], schedules.default_schedule_pass(t, {key: {"rule": rule_name, "knobs": {knob: v}}}))
        got.append(_padded_where_read(mod, kernel))
    assert got == ([True, False] if knob == "pad_apart" else [False, True]), got


def _window_vectorized(mod, fragment: str) -> bool:
    """Whether the kernel's window (its reduction's update block) sits in a vectorized loop."""
    return any(any(n.endswith("_update") for n in names)
               for names in _blocks_under(mod, fragment, tvm.tirx.ForKind.VECTORIZED))


@pytest.mark.parametrize("case, vectorized", [("global-avgpool", True), ("global-avgpool-28x28", True),
                                              ("reduce-sum-last-axis", True), ("softmax-rows-of-48", True),
                                              ("reduce-max-prime-row", False),  # no divisor of 37 to split it by
                                              ("softmax", False)])
def test_contiguous_rows_are_reduced_in_vectors(case, vectorized):
    """A reduction over its input's contiguous end (a global pool's H x W, softmax's max and sum)
    adds each row into a vector of partial sums first, instead of one chain of scalar additions."""
    (_c, factory, kernel, _rule), = [c for c in CASES if c[0] == case]
    _t, mod = lower(factory(), TARGETS["native"])
    assert _window_vectorized(mod, kernel) is vectorized


@pytest.mark.parametrize("case, vectorized, knob", [("depthwise", True, None),
                                                    ("depthwise-stride2", True, "unroll_strided"),
                                                    ("maxpool-3x3-stride2-pad", False, "vector_strided")])
def test_strided_windows_are_vectorized_where_the_shuffles_pay(case, vectorized, knob):
    """A depthwise convolution's stride-2 pixels are vectorized: their loads of every other input
    pixel become a contiguous load and a shuffle (bundler.compile.lowering). A stride-2 pool's are
    unrolled for LLVM's SLP vectorizer, which was faster there. A knob (strided windows only) gives
    the other choice; stride 1 is always vectorized."""
    (_c, factory, kernel, _rule), = [c for c in CASES if c[0] == case]
    model = factory()
    t = tvm.target.Target(TARGETS["native"])
    (key, (rule_name, space)), = _knob_spaces(model, t).items()
    _t, mod = lower(model, TARGETS["native"])
    assert _window_vectorized(mod, kernel) is vectorized
    assert {"unroll_strided", "vector_strided"} & set(space) == ({knob} if knob else set())
    if knob:
        tuned = {key: {"rule": rule_name, "knobs": {knob: 1}}}
        _t, mod = lower(model, TARGETS["native"], schedules.default_schedule_pass(t, tuned))
        assert _window_vectorized(mod, kernel) is not vectorized


def _blocked_tensors(mod) -> list[list[int]]:
    """The shapes of the 5-D tensors main's kernels pass each other (channel blocks)."""
    out = []
    for binding in (b for blk in mod["main"].body.blocks for b in blk.bindings):
        shape = getattr(binding.var.ty, "shape", None)
        # (calls only: SplitLayoutRewritePreproc leaves aliases of the prepacked kernels' outputs)
        if isinstance(binding.value, relax.Call) and shape is not None and len(shape) == 5:
            out.append([int(d) for d in shape])
    return out


@pytest.mark.parametrize("factory, target, blocks", [
    (lambda: expand_depthwise(e=48, hw=15), "native", [[1, 3, 15, 15, 16]]),
    (lambda: expand_depthwise(e=48, hw=15), "x86-64", [[1, 12, 15, 15, 4]]),
    (lambda: expand_depthwise(c=3, e=32, hw=29, stem=True), "native", [[1, 2, 15, 15, 16]]),
    (lambda: expand_depthwise(n=2, c=5, e=32, hw=9, stride=1), "native", [[2, 2, 9, 9, 16]]),
    # 20 channels: whole blocks of SSE's 4 lanes, not of AVX-512's 16
    (lambda: expand_depthwise(c=6, e=20, hw=14), "native", []),
    (lambda: expand_depthwise(c=6, e=20, hw=14), "x86-64", [[1, 5, 14, 14, 4]]),
    # the producer's output read by another kernel too: left as it is
    (lambda: expand_depthwise(e=48, hw=15, uses=2), "native", []),
    # stride 1 on a large map: pixels in lanes read whole rows already, and were faster
    (lambda: expand_depthwise(c=8, e=32, hw=56, stride=1), "native", []),
    (lambda: expand_depthwise(c=8, e=32, hw=56, stride=2), "native", [[1, 2, 56, 56, 16]]),
], ids=["stride2", "stride2-sse", "stem", "batch2-stride1-small-map", "channels-not-16", "channels-of-4-sse",
        "two-readers", "stride1-56x56", "stride2-56x56"])
def test_depthwise_reads_the_channel_blocks_its_producer_writes(factory, target, blocks):
    """Where the depthwise convolution is its producer's only reader and blocks pay, the tensor
    between them is [N, C/lanes, H, W, lanes], both kernels are scheduled by Conv2D, and the
    depthwise taps are vector loads without shuffles even at stride 2; the model still computes
    what onnxruntime does."""
    from tests.test_lowering import lowered

    model = factory()
    ex, mod = build(model, TARGETS[target])
    assert _blocked_tensors(mod) == blocks
    by = schedules.scheduled_by(mod)
    assert {r for k, r in by.items() if "conv2d" in k} == {"Conv2D"}, by
    if blocks:
        dw = {gv.name_hint: f.with_attr("global_symbol", gv.name_hint) for gv, f in mod.functions_items()
              if isinstance(f, tvm.tirx.PrimFunc) and any(len(p.shape) == 5 for p in f.params[:1])}
        assert len(dw) == 1, list(by)
        text = lowered(tvm.IRModule(dw), TARGETS[target])
        # (The write-back to NCHW may shuffle its accumulators; the taps' loads must not.)
        assert "pad_temp" in text and "T.Shuffle([pad_temp" not in text
    feeds = inputs_for(model)
    assert_close(run_tvm(ex, feeds), run_onnxruntime(model, feeds))
