"""ONNX models the tests and benchmark scripts build themselves, with seeded random weights.

Each factory writes the model to ``path`` and returns ``path``. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _w(rng: np.random.Generator, name: str, shape, scale: float | None = None) -> onnx.TensorProto:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    s = scale if scale is not None else (2.0 / max(fan_in, 1)) ** 0.5
    return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tvmbundle-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def conv_net(path: Path, seed: int = 0) -> Path:
    """conv + relu + maxpool + flatten + gemm + softmax; input [1,3,16,16] -> [1,10]."""
    rng = np.random.default_rng(seed)
    inits = [_w(rng, "conv_w", (8, 3, 3, 3)), _w(rng, "conv_b", (8,), 0.1),
             _w(rng, "fc_w", (10, 8 * 8 * 8)), _w(rng, "fc_b", (10,), 0.1)]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    g = helper.make_graph(nodes, "conv_net",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 10])], inits)
    return _save(g, path)


def multi_io(path: Path, seed: int = 1) -> Path:
    """Two inputs (image [1,3,8,8], vector [1,16]) and two outputs of different shapes."""
    rng = np.random.default_rng(seed)
    inits = [_w(rng, "conv_w", (4, 3, 3, 3)), _w(rng, "fc_w", (5, 4 * 8 * 8 + 16)), _w(rng, "bias", (1, 16), 0.5)]
    nodes = [
        helper.make_node("Conv", ["image", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Concat", ["f", "vector"], ["cat"], name="concat", axis=1),
        helper.make_node("Gemm", ["cat", "fc_w"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["scores"], name="softmax", axis=-1),
        helper.make_node("Mul", ["vector", "vector"], ["sq"], name="square"),
        helper.make_node("Add", ["sq", "bias"], ["embedding"], name="add_bias"),
    ]
    g = helper.make_graph(nodes, "multi_io",
                          [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8]),
                           helper.make_tensor_value_info("vector", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 5]),
                           helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 16])], inits)
    return _save(g, path)


def dynamic_batch(path: Path, seed: int = 2) -> Path:
    """A symbolic batch dim and the Shape -> Gather -> Unsqueeze -> Concat -> Reshape that torch exports
    for ``x.view(x.size(0), -1)``, then a Gemm; input ["N",3,8,8] -> ["N",10]."""
    rng = np.random.default_rng(seed)
    inits = [_w(rng, "conv_w", (4, 3, 3, 3)), _w(rng, "fc_w", (10, 4 * 8 * 8)), _w(rng, "fc_b", (10,), 0.1),
             numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "axes0"),
             numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus_one")]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Shape", ["r"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="gather_batch", axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"], name="unsqueeze"),
        helper.make_node("Concat", ["batch1", "minus_one"], ["newshape"], name="concat_shape", axis=0),
        helper.make_node("Reshape", ["r", "newshape"], ["flat"], name="reshape"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    g = helper.make_graph(nodes, "dynamic_batch",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return _save(g, path)


def shape_arith(path: Path, seed: int = 3) -> Path:
    """What exporters leave besides the flatten: Constant nodes, ``Shape(start, end)``, Size, integer
    Mul and Div on shapes, Squeeze, Range, ConstantOfShape and Expand, a weight Transpose'd at run time,
    and a node nothing uses.  Input ["N", 6, "L"] -> "y" ["N", "L", 6] and "pos" ["N", "L"] (int64;
    pos[n, l] = l, so with the shapes fixed it is a constant)."""
    rng = np.random.default_rng(seed)
    inits = [_w(rng, "w_t", (6, 6))]

    def const(name: str, value) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], name=f"const_{name}",
                                value=numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))

    nodes = [
        const("zero", 0), const("one", 1), const("axes0", [0]),
        helper.make_node("Transpose", ["w_t"], ["w"], name="transpose_weight", perm=[1, 0]),
        helper.make_node("Transpose", ["x"], ["xt"], name="transpose_x", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["xt", "w"], ["mm"], name="matmul"),
        # y = mm reshaped to Shape(xt) (a no-op the exporter could not prove) / (Size(x) / (N * L))
        helper.make_node("Shape", ["xt"], ["xt_shape"], name="shape_xt"),
        helper.make_node("Reshape", ["mm", "xt_shape"], ["y0"], name="reshape_y"),
        helper.make_node("Size", ["x"], ["numel"], name="size_x"),
        helper.make_node("Shape", ["x"], ["batch_1d"], name="shape_batch", start=0, end=1),
        helper.make_node("Shape", ["x"], ["len_1d"], name="shape_len", start=-1),
        helper.make_node("Mul", ["batch_1d", "len_1d"], ["bl"], name="mul_bl"),
        helper.make_node("Div", ["numel", "bl"], ["channels"], name="div_channels"),   # = 6
        helper.make_node("Cast", ["channels"], ["channels_f"], name="cast_channels", to=TensorProto.FLOAT),
        helper.make_node("Div", ["y0", "channels_f"], ["y"], name="div_y"),
        # pos[n, l] = l: Range(0, L) expanded to [N, L]
        helper.make_node("Squeeze", ["len_1d", "axes0"], ["len"], name="squeeze_len"),
        helper.make_node("Range", ["zero", "len", "one"], ["range"], name="range"),
        helper.make_node("Concat", ["batch_1d", "len_1d"], ["pos_shape"], name="concat_pos", axis=0),
        helper.make_node("ConstantOfShape", ["pos_shape"], ["zeros"], name="zeros",
                         value=numpy_helper.from_array(np.array([0], dtype=np.int64))),
        helper.make_node("Add", ["zeros", "range"], ["pos_raw"], name="add_pos"),
        helper.make_node("Expand", ["pos_raw", "pos_shape"], ["pos"], name="expand_pos"),
        helper.make_node("Relu", ["mm"], ["unused"], name="dead_relu"),
    ]
    g = helper.make_graph(nodes, "shape_arith",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, "L"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L", 6]),
                           helper.make_tensor_value_info("pos", TensorProto.INT64, ["N", "L"])], inits)
    return _save(g, path)


def unsupported_op(path: Path) -> Path:
    """Celu: a standard ONNX operator TVM 0.27's ONNX frontend has no converter for."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Celu", ["r"], ["y"], name="celu_1", alpha=1.0)]
    g = helper.make_graph(nodes, "unsupported",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    return _save(g, path)


def int_model(path: Path) -> Path:
    """A uint8 image scaled to float, and an int64 sum of its pixels: non-float dtypes end to end.
    Input "pixels" uint8 [1,4,4] -> "scaled" float32 [1,4,4], "total" int64 []."""
    nodes = [
        helper.make_node("Cast", ["pixels"], ["f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "scale"], ["scaled"], name="scale"),
        helper.make_node("Cast", ["pixels"], ["pixels_i64"], name="cast64", to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["pixels_i64"], ["total"], name="sum", keepdims=0),
    ]
    inits = [numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale")]
    g = helper.make_graph(nodes, "int_model",
                          [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [1, 4, 4])],
                          [helper.make_tensor_value_info("scaled", TensorProto.FLOAT, [1, 4, 4]),
                           helper.make_tensor_value_info("total", TensorProto.INT64, [])], inits)
    return _save(g, path)


def resnet18(path: Path, batch: int | str = 1, size: int = 224, seed: int = 0) -> Path:
    """ResNet-18 (He et al.): 11.7 M random parameters (about 45 MB), batch norms folded into the
    convolutions' biases; input "input" [batch,3,size,size] -> "logits" [batch,1000].

    A string ``batch`` makes the batch dim symbolic (then prepare needs ``--input-shape``)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    counter = [0]

    def conv(x: str, cin: int, cout: int, k: int, stride: int, relu: bool) -> str:
        counter[0] += 1
        n = f"conv{counter[0]}"
        inits.extend([_w(rng, f"{n}_w", (cout, cin, k, k)), _w(rng, f"{n}_b", (cout,), 0.01)])
        nodes.append(helper.make_node("Conv", [x, f"{n}_w", f"{n}_b"], [n], name=n, strides=[stride, stride],
                                      pads=[k // 2] * 4))
        if not relu:
            return n
        nodes.append(helper.make_node("Relu", [n], [f"{n}_relu"], name=f"{n}_relu"))
        return f"{n}_relu"

    x = conv("input", 3, 64, 7, 2, True)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 1, 1, 1]))
    x, cin = "pool", 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            y = conv(x, cin, cout, 3, stride, True)
            y = conv(y, cout, cout, 3, 1, False)
            shortcut = conv(x, cin, cout, 1, stride, False) if (stride != 1 or cin != cout) else x
            out = f"block{stage}_{block}"
            nodes.append(helper.make_node("Add", [y, shortcut], [out + "_sum"], name=out + "_add"))
            nodes.append(helper.make_node("Relu", [out + "_sum"], [out], name=out + "_relu"))
            x, cin = out, cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["feat"], name="flatten"))
    inits.extend([_w(rng, "fc_w", (1000, 512)), _w(rng, "fc_b", (1000,), 0.01)])
    nodes.append(helper.make_node("Gemm", ["feat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1))
    g = helper.make_graph(nodes, "resnet18",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1000])], inits)
    return _save(g, path)


# --- what sequence-model exporters leave: If on shapes, LSTM / GRU / RNN ----------------------

def _save_at(graph: onnx.GraphProto, path: Path, opset: int) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tvmbundle-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=False)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def _i64(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)


def _const(name: str, value, dtype=np.int64) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"const_{name}",
                            value=numpy_helper.from_array(np.asarray(value, dtype=dtype), name))


def shape_if(path: Path, seed: int = 5) -> Path:
    """What torch.jit.script exports for ``if x.shape[1] > 4``: an If on Shape -> Gather -> Greater.
    Input "x" ["N", "L"] -> "y" ["N", "M"] (y = relu(x[:, :4] * w) * 2 when L > 4 else (x + 1) * 2) and
    "z" ["N", "L"] (z = x when L > 4, else -x).

    The then branch has its own initializer (w), Constant nodes and a nested If on its own shapes.
    A value of the branch ("scaled") has the name of a main-graph value defined after the If (which
    the checker allows), and the nested If reads it from the branch's scope."""
    rng = np.random.default_rng(seed)
    vi = helper.make_tensor_value_info
    w = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "w")
    nested_then = helper.make_graph([helper.make_node("Relu", ["scaled"], ["relu_out"], name="nested_relu")],
                                    "nested_then", [], [vi("relu_out", TensorProto.FLOAT, None)])
    nested_else = helper.make_graph([helper.make_node("Neg", ["scaled"], ["neg_out"], name="nested_neg")],
                                    "nested_else", [], [vi("neg_out", TensorProto.FLOAT, None)])
    then_branch = helper.make_graph([
        _const("starts", [0]), _const("ends", [4]), _const("axes", [1]),
        helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["sliced"], name="slice"),
        helper.make_node("Mul", ["sliced", "w"], ["scaled"], name="mul_w"),
        helper.make_node("Shape", ["scaled"], ["then_shape"], name="then_shape"),
        helper.make_node("ReduceProd", ["then_shape"], ["then_numel"], name="then_numel", keepdims=0),
        _const("limit", 1_000_000),
        helper.make_node("Less", ["then_numel", "limit"], ["small"], name="small"),
        helper.make_node("If", ["small"], ["nested_out"], name="nested_if",
                         then_branch=nested_then, else_branch=nested_else),
        helper.make_node("Identity", ["x"], ["same_x"], name="same_x")],
        "then", [], [vi("nested_out", TensorProto.FLOAT, None), vi("same_x", TensorProto.FLOAT, None)], [w])
    else_branch = helper.make_graph([
        helper.make_node("Add", ["x", "one"], ["plus_one"], name="add_one"),
        helper.make_node("Neg", ["x"], ["neg_x"], name="neg_x")],
        "else", [], [vi("plus_one", TensorProto.FLOAT, None), vi("neg_x", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        _const("index1", 1),
        helper.make_node("Gather", ["shape", "index1"], ["len"], name="gather_len", axis=0),
        _const("four", 4),
        helper.make_node("Greater", ["len", "four"], ["long"], name="greater"),
        helper.make_node("Cast", ["long"], ["cond"], name="cast_cond", to=TensorProto.BOOL),
        helper.make_node("If", ["cond"], ["y_if", "z"], name="shape_if", then_branch=then_branch,
                         else_branch=else_branch),
        _const("two", 2.0, np.float32),
        helper.make_node("Mul", ["y_if", "two"], ["scaled"], name="mul_two"),
        helper.make_node("Identity", ["scaled"], ["y"], name="identity_y"),
    ]
    g = helper.make_graph(nodes, "shape_if", [vi("x", TensorProto.FLOAT, ["N", "L"])],
                          [vi("y", TensorProto.FLOAT, ["N", "M"]), vi("z", TensorProto.FLOAT, ["N", "L"])])
    return _save_at(g, path, OPSET)


def if_with_loop(path: Path) -> Path:
    """Two Ifs on the input's rank, whose taken branches both define a value "k" (sibling scopes may
    share names; once both are inlined they may not). The second holds a Loop (3 iterations of
    acc += x2 * k) whose body reads its branch's "k".
    Input "x" [2, 3] -> "y" [2, 3] = x * 2 * 3 * 1.5 (then branches) or x (else)."""
    vi = helper.make_tensor_value_info
    body = helper.make_graph([
        helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond"),
        helper.make_node("Mul", ["x2", "k"], ["xk"], name="loop_mul"),
        helper.make_node("Add", ["acc_in", "xk"], ["acc_out"], name="loop_add")],
        "body", [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []),
                 vi("acc_in", TensorProto.FLOAT, None)],
        [vi("cond_out", TensorProto.BOOL, []), vi("acc_out", TensorProto.FLOAT, None)])
    loop_then = helper.make_graph([
        _const("k", 1.5, np.float32),
        _const("trips", 3),
        _const("keep_going", True, np.bool_),
        helper.make_node("Mul", ["x2", "zero_f"], ["acc0"], name="acc0"),
        helper.make_node("Loop", ["trips", "keep_going", "acc0"], ["acc"], name="sum_loop", body=body)],
        "loop_then", [], [vi("acc", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero_f")])
    double_then = helper.make_graph([_const("k", 2.0, np.float32),
                                     helper.make_node("Mul", ["x", "k"], ["doubled"], name="double")],
                                    "double_then", [], [vi("doubled", TensorProto.FLOAT, None)])

    def same(name: str, of: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("Identity", [of], [name], name=name)], "else", [],
                                 [vi(name, TensorProto.FLOAT, None)])

    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Size", ["shape"], ["rank"], name="rank"),
        _const("two", 2),
        helper.make_node("Equal", ["rank", "two"], ["is_2d"], name="is_2d"),
        helper.make_node("If", ["is_2d"], ["x2"], name="double_if", then_branch=double_then,
                         else_branch=same("same_x", "x")),
        helper.make_node("If", ["is_2d"], ["y"], name="loop_if", then_branch=loop_then,
                         else_branch=same("same_x2", "x2")),
    ]
    g = helper.make_graph(nodes, "if_with_loop", [vi("x", TensorProto.FLOAT, [2, 3])],
                          [vi("y", TensorProto.FLOAT, [2, 3])])
    return _save_at(g, path, OPSET)


def recurrent(path: Path, op: str = "LSTM", *, direction: str = "forward", batch: int = 1, seq: int = 5,
              input_size: int = 6, hidden: int = 8, layout: int = 0, initial_states: bool = True,
              bias: bool = True, seq_lens: str | list[int] | None = None, peepholes: bool = False,
              linear_before_reset: int | None = None, activations: list[str] | None = None,
              alphas: list[float] | None = None, betas: list[float] | None = None, clip: float | None = None,
              input_forget: int | None = None, outputs: tuple[str, ...] = ("Y", "Y_h", "Y_c"),
              opset: int = OPSET, seed: int = 6) -> Path:
    """One ``op`` (LSTM, GRU or RNN) node with random weights; its sequence length is the symbolic dim
    "T" of input "x" ([T, batch, input_size], or [batch, T, input_size] for layout 1).

    ``initial_states``: inputs "h0" (and "c0" for LSTM) [D, batch, hidden] ([batch, D, hidden] for
    layout 1). ``seq_lens``: "input" for an int32 input "lens" [batch], a list for a constant.
    ``outputs``: which of Y, Y_h, Y_c the node has (the others are left empty), graph outputs
    "y", "y_h", "y_c"."""
    rng = np.random.default_rng(seed)
    vi = helper.make_tensor_value_info
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    d = 2 if direction == "bidirectional" else 1
    inits = [numpy_helper.from_array((rng.standard_normal((d, gates * hidden, input_size)) * 0.5).astype(np.float32),
                                     "W"),
             numpy_helper.from_array((rng.standard_normal((d, gates * hidden, hidden)) * 0.5).astype(np.float32),
                                     "R")]
    if bias:
        inits.append(numpy_helper.from_array((rng.standard_normal((d, 2 * gates * hidden)) * 0.3)
                                             .astype(np.float32), "B"))
    x_dims = ["T", batch, input_size] if layout == 0 else [batch, "T", input_size]
    state_dims = [d, batch, hidden] if layout == 0 else [batch, d, hidden]
    inputs = [vi("x", TensorProto.FLOAT, x_dims)]
    node_in = ["x", "W", "R", "B" if bias else ""]
    if seq_lens == "input":
        inputs.append(vi("lens", TensorProto.INT32, [batch]))
        node_in.append("lens")
    elif seq_lens is not None:
        inits.append(numpy_helper.from_array(np.asarray(seq_lens, np.int32), "lens"))
        node_in.append("lens")
    else:
        node_in.append("")
    if initial_states:
        inputs.append(vi("h0", TensorProto.FLOAT, state_dims))
        node_in.append("h0")
        if op == "LSTM":
            inputs.append(vi("c0", TensorProto.FLOAT, state_dims))
            node_in.append("c0")
    elif op == "LSTM":
        node_in += ["", ""]
    if peepholes:
        inits.append(numpy_helper.from_array((rng.standard_normal((d, 3 * hidden)) * 0.5).astype(np.float32), "P"))
        node_in += [""] * (7 - len(node_in)) + ["P"]
    while node_in and not node_in[-1]:
        node_in.pop()
    attrs: dict = {"hidden_size": hidden, "direction": direction}
    if layout:
        attrs["layout"] = layout
    for key, value in (("linear_before_reset", linear_before_reset), ("activations", activations),
                       ("activation_alpha", alphas), ("activation_beta", betas), ("clip", clip),
                       ("input_forget", input_forget)):
        if value is not None:
            attrs[key] = value
    names = {"Y": "y", "Y_h": "y_h", "Y_c": "y_c"}
    slots = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    node_out = [names[s] if s in outputs else "" for s in slots]
    while node_out and not node_out[-1]:
        node_out.pop()
    y_dims = ["T", d, batch, hidden] if layout == 0 else [batch, "T", d, hidden]
    graph_out = [vi(names[s], TensorProto.FLOAT, y_dims if s == "Y" else state_dims) for s in slots if s in outputs]
    node = helper.make_node(op, node_in, node_out, name=f"{op.lower()}_1", **attrs)
    g = helper.make_graph([node], f"{op.lower()}_model", inputs, graph_out, inits)
    return _save_at(g, path, opset)


def streaming_lstm(path: Path, features: int = 10, hidden: int = 12, classes: int = 4, seed: int = 7) -> Path:
    """What torch.onnx exports for a streaming keyword spotter (batch_first LSTM carrying its state
    between calls, then a Linear): Transpose -> LSTM -> Squeeze -> Transpose -> MatMul -> Add, with the
    frame count a symbolic dim and the Shape -> Gather -> Concat -> Reshape of ``y.reshape(B, T, -1)``.
    Inputs "frames" [1, "T", features], "h_in" and "c_in" [1, 1, hidden] -> "logits" [1, "T", classes],
    "h_out", "c_out" [1, 1, hidden]."""
    rng = np.random.default_rng(seed)
    vi = helper.make_tensor_value_info
    h = hidden
    inits = [numpy_helper.from_array((rng.standard_normal((1, 4 * h, features)) * 0.4).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((1, 4 * h, h)) * 0.4).astype(np.float32), "R"),
             numpy_helper.from_array((rng.standard_normal((1, 8 * h)) * 0.2).astype(np.float32), "B"),
             _w(rng, "fc_w", (h, classes)), _w(rng, "fc_b", (classes,), 0.1),
             _i64("axis0", [0]), _i64("axis1", [1]), _i64("idx0", 0), _i64("idx1", 1), _i64("minus_one", [-1])]
    nodes = [
        helper.make_node("Transpose", ["frames"], ["tbf"], name="to_time_major", perm=[1, 0, 2]),
        helper.make_node("LSTM", ["tbf", "W", "R", "B", "", "h_in", "c_in"], ["y", "h_out", "c_out"],
                         name="lstm", hidden_size=h),
        helper.make_node("Squeeze", ["y", "axis1"], ["y3"], name="squeeze_dir"),
        helper.make_node("Transpose", ["y3"], ["bth"], name="to_batch_major", perm=[1, 0, 2]),
        helper.make_node("Shape", ["frames"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "idx0"], ["b"], name="gather_b", axis=0),
        helper.make_node("Gather", ["shape", "idx1"], ["t"], name="gather_t", axis=0),
        helper.make_node("Unsqueeze", ["b", "axis0"], ["b1"], name="unsqueeze_b"),
        helper.make_node("Unsqueeze", ["t", "axis0"], ["t1"], name="unsqueeze_t"),
        helper.make_node("Concat", ["b1", "t1", "minus_one"], ["target"], name="concat_shape", axis=0),
        helper.make_node("Reshape", ["bth", "target"], ["feat"], name="reshape"),
        helper.make_node("MatMul", ["feat", "fc_w"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "fc_b"], ["logits"], name="fc_bias"),
    ]
    g = helper.make_graph(nodes, "streaming_lstm",
                          [vi("frames", TensorProto.FLOAT, [1, "T", features]),
                           vi("h_in", TensorProto.FLOAT, [1, 1, h]), vi("c_in", TensorProto.FLOAT, [1, 1, h])],
                          [vi("logits", TensorProto.FLOAT, [1, "T", classes]),
                           vi("h_out", TensorProto.FLOAT, [1, 1, h]), vi("c_out", TensorProto.FLOAT, [1, 1, h])],
                          inits)
    return _save_at(g, path, OPSET)
