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
