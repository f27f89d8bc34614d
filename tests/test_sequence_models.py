"""Models as sequence-model exporters ship them: If nodes on shapes (folded to the branch taken),
LSTM / GRU / RNN (unrolled over the fixed sequence length, since TVM 0.27's ONNX frontend has no
converter for them) and outputs whose shapes are static only after that.  Every model is checked
against onnxruntime, both as prepared and compiled with TVM.

The onnx.helper models cover every case; the torch-exported ones (skipped without torch) check
that real exporter output goes through too."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from bundler.compile import onnxmodel
from bundler.compile.onnxmodel import TensorSpec
from bundler.errors import ModelError
from tests import models

RECURRENT = {"LSTM", "GRU", "RNN"}
ATOL = 1e-5


def run_ort(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


def run_tvm(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = from_onnx(model, keep_params_in_input=False)
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    result = vm["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in model.graph.input])
    return [r.numpy() for r in result] if not hasattr(result, "numpy") else [result.numpy()]


def feeds_for(specs: tuple[TensorSpec, ...], seed: int = 0, lens: list[int] | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        if s.name == "lens":
            out[s.name] = np.asarray(lens, dtype=s.dtype)
        else:
            out[s.name] = rng.standard_normal(s.shape).astype(s.dtype)
    return out


def max_diff(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
    return max(float(np.abs(g.astype(np.float64) - w).max()) if g.size else 0.0 for g, w in zip(got, want))


def check_against_ort(path: Path, p: onnxmodel.PreparedModel, want_feeds=None, want=None, lens=None,
                      tvm: bool = True, atol: float = ATOL) -> float:
    """prepare's model under onnxruntime and under TVM against the original under onnxruntime."""
    onnx.checker.check_model(p.model, full_check=True)
    onnxmodel.check_supported(p.model, path)
    feeds = feeds_for(p.inputs, lens=lens)
    if want is None:
        want = run_ort(path, feeds)
    worst = max_diff(run_ort(p.model, feeds), want)
    assert worst <= atol, worst
    if tvm:
        worst = max(worst, max_diff(run_tvm(p.model, feeds), want))
        assert worst <= atol, worst
    return worst


# --- If with a condition constant once the shapes are fixed ------------------------------

@pytest.mark.parametrize("length, taken", [(6, "then"), (3, "else")])
def test_shape_if_folds_to_the_branch_taken(tmp_path, length, taken):
    path = models.shape_if(tmp_path / "if.onnx")
    p = onnxmodel.prepare(path, {"x": (2, length)})
    ops = [n.op_type for n in p.model.graph.node]
    assert "If" not in ops and not {"Shape", "Gather", "Greater", "Constant"} & set(ops), ops
    assert ops == (["Slice", "Mul", "Relu", "Identity", "Mul", "Identity"] if taken == "then"
                   else ["Add", "Neg", "Mul", "Identity"])
    # outputs declared ["N", "M"] and ["N", "L"]: static now, with the branch's shapes
    assert p.outputs == (TensorSpec("y", "float32", (2, 4 if taken == "then" else length)),
                         TensorSpec("z", "float32", (2, length)))
    assert [o.name for o in p.model.graph.output] == ["y", "z"]
    if taken == "then":
        # the branch's "scaled" met the main graph's: one was renamed, in the nested If too
        names = [o for n in p.model.graph.node for o in n.output]
        assert len(names) == len(set(names)) and "scaled" in names and "scaled__1" in names
        assert "w" in {t.name for t in p.model.graph.initializer}      # the branch's initializer
    assert check_against_ort(path, p) == 0.0


def test_folded_if_with_a_loop_and_clashing_sibling_names(tmp_path):
    path = models.if_with_loop(tmp_path / "loop.onnx")
    p = onnxmodel.prepare(path)
    g = p.model.graph
    assert [n.op_type for n in g.node] == ["Mul", "Mul", "Loop"]
    loop = g.node[2]
    # the branches' "k"s got distinct names (a suffix), and the Loop body reads its own
    consts = {t.name: float(onnx.numpy_helper.to_array(t)) for t in g.initializer
              if re.fullmatch(r"k(__\d+)?", t.name)}
    body_reads = {i for n in loop.attribute[0].g.node for i in n.input}
    assert sorted(consts.values()) == [1.5, 2.0]
    assert [consts[k] for k in body_reads & set(consts)] == [1.5]
    assert [consts[k] for k in g.node[0].input if k in consts] == [2.0]
    x = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    np.testing.assert_array_equal(run_ort(p.model, x)[0], x["x"] * 9)
    np.testing.assert_array_equal(run_ort(p.model, x)[0], run_ort(path, x)[0])
    # TVM has no Loop: the error names the node and the op
    with pytest.raises(ModelError) as e:
        onnxmodel.check_supported(p.model, path)
    assert e.value.message.endswith("has no converter for Loop (domain ai.onnx, opset 17) at node 'sum_loop'")


def test_if_on_data_stays_and_a_dynamic_output_names_it(tmp_path):
    """A condition computed from the input's values is not constant: the If stays (TVM imports it
    as a relax If); when its branches give different shapes the output error says why."""
    vi = helper.make_tensor_value_info
    then_branch = helper.make_graph([helper.make_node("Relu", ["x"], ["t"], name="t")], "then", [],
                                    [vi("t", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Concat", ["x", "x"], ["e"], name="e", axis=0)], "else", [],
                                    [vi("e", TensorProto.FLOAT, None)])
    same_shape = helper.make_graph([helper.make_node("Neg", ["x"], ["n"], name="n")], "else", [],
                                   [vi("n", TensorProto.FLOAT, None)])
    for name, other, static in (("differ", else_branch, False), ("same", same_shape, True)):
        g = helper.make_graph([
            helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["positive"], name="positive"),
            helper.make_node("If", ["positive"], ["y0"], name="data_if", then_branch=then_branch, else_branch=other),
            helper.make_node("Relu", ["y0"], ["y"], name="after")],
            name, [vi("x", TensorProto.FLOAT, ["N", 3])], [vi("y", TensorProto.FLOAT, None)],
            [onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path))
        if static:
            p = onnxmodel.prepare(path, {"x": (2, 3)})
            assert "If" in [n.op_type for n in p.model.graph.node] and p.outputs[0].shape == (2, 3)
            for sign in (1, -1):
                feeds = {"x": sign * np.abs(np.random.default_rng(0).standard_normal((2, 3))).astype(np.float32)}
                np.testing.assert_array_equal(run_tvm(p.model, feeds)[0], run_ort(path, feeds)[0])
        else:
            with pytest.raises(ModelError) as e:
                onnxmodel.prepare(path, {"x": (2, 3)})
            assert e.value.message.startswith(f"{path}: output 'y' has no static shape (")
            assert "it depends on If node 'data_if', whose condition is not constant with the input shapes " \
                   "fixed; tvmbundle needs static output shapes" in e.value.message


# --- LSTM, GRU, RNN: unrolled, against onnxruntime ------------------------------------------

CASES = {
    # name: (factory kwargs, x shape with the sequence length fixed, lens for a "lens" input)
    "lstm_forward_zero_states": (dict(op="LSTM", initial_states=False), (5, 1, 6), None),
    "lstm_bidirectional_states_batch2": (dict(op="LSTM", direction="bidirectional", batch=2), (4, 2, 6), None),
    "lstm_reverse_peepholes_clip": (dict(op="LSTM", direction="reverse", batch=2, peepholes=True, clip=0.7),
                                    (5, 2, 6), None),
    "lstm_input_forget_activations": (dict(op="LSTM", input_forget=1, bias=False,
                                           activations=["HardSigmoid", "LeakyRelu", "Elu"],
                                           alphas=[0.3, 0.05, 0.8], betas=[0.4]), (3, 1, 6), None),
    "lstm_bidirectional_sequence_lens": (dict(op="LSTM", direction="bidirectional", batch=3, seq_lens="input"),
                                         (5, 3, 6), [5, 2, 3]),
    "lstm_constant_sequence_lens": (dict(op="LSTM", direction="bidirectional", batch=2, seq_lens=[4, 1]),
                                    (4, 2, 6), None),
    "lstm_only_y_h": (dict(op="LSTM", direction="bidirectional", outputs=("Y_h",)), (4, 1, 6), None),
    "lstm_only_y_c": (dict(op="LSTM", outputs=("Y_c",), batch=2), (4, 2, 6), None),
    "gru_bidirectional_linear_before_reset_batch2": (dict(op="GRU", direction="bidirectional", batch=2,
                                                          linear_before_reset=1), (5, 2, 6), None),
    "gru_reverse_clip_no_bias": (dict(op="GRU", direction="reverse", clip=0.5, bias=False, batch=2), (4, 2, 6), None),
    "gru_sequence_lens": (dict(op="GRU", direction="bidirectional", batch=2, seq_lens="input",
                               linear_before_reset=1), (4, 2, 6), [1, 4]),
    "gru_opset11_activations": (dict(op="GRU", opset=11, activations=["Relu", "Softsign"], initial_states=False),
                                (3, 1, 6), None),
    "rnn_forward": (dict(op="RNN", batch=2), (6, 2, 6), None),
    "rnn_bidirectional_affine_scaledtanh": (dict(op="RNN", direction="bidirectional",
                                                 activations=["Affine", "ScaledTanh"], alphas=[0.5, 0.8],
                                                 betas=[0.1, 1.2], clip=2.0), (3, 1, 6), None),
    "rnn_opset9_softplus": (dict(op="RNN", opset=9, activations=["Softplus"]), (3, 1, 6), None),
    "rnn_thresholded_relu": (dict(op="RNN", activations=["ThresholdedRelu"], alphas=[0.2], batch=2), (4, 2, 6), None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_recurrent_nodes_unroll_and_match_onnxruntime(tmp_path, name):
    kwargs, x_shape, lens = CASES[name]
    path = models.recurrent(tmp_path / f"{name}.onnx", **kwargs)
    p = onnxmodel.prepare(path, {"x": x_shape})
    ops = [n.op_type for n in p.model.graph.node]
    assert not RECURRENT & set(ops), ops
    # sequence_lens: a mask only where some sequence is shorter (a constant full length needs none)
    assert ("Where" in ops) == (kwargs.get("seq_lens") is not None)
    check_against_ort(path, p, lens=lens)


def test_full_length_constant_sequence_lens_needs_no_mask(tmp_path):
    path = models.recurrent(tmp_path / "full.onnx", "GRU", batch=2, seq_lens=[4, 4])
    p = onnxmodel.prepare(path, {"x": (4, 2, 6)})
    assert not {"Where", "Less", "GRU"} & {n.op_type for n in p.model.graph.node}
    check_against_ort(path, p, tvm=False)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_batch_major_layout(tmp_path, op):
    """layout=1 (X [batch, seq, input]): onnxruntime does not run it, so the reference is the same
    node with layout 0 between transposes."""
    kwargs = dict(op=op, direction="bidirectional", batch=2, seq_lens="input")
    path = models.recurrent(tmp_path / "batch_major.onnx", layout=1, **kwargs)
    reference = models.recurrent(tmp_path / "time_major.onnx", layout=0, **kwargs)
    p = onnxmodel.prepare(path, {"x": (2, 5, 6)})
    assert not RECURRENT & {n.op_type for n in p.model.graph.node}
    d, h = 2, 8
    assert p.outputs[0] == TensorSpec("y", "float32", (2, 5, d, h))
    assert p.outputs[1] == TensorSpec("y_h", "float32", (2, d, h))
    lens = [3, 5]
    feeds = feeds_for(p.inputs, lens=lens)
    time_major = {k: (v if k == "lens" else np.ascontiguousarray(v.swapaxes(0, 1))) for k, v in feeds.items()}
    ref = run_ort(reference, time_major)
    want = [ref[0].transpose(2, 0, 1, 3)] + [r.transpose(1, 0, 2) for r in ref[1:]]
    check_against_ort(path, p, want=want, lens=lens)


def test_streaming_lstm_with_shape_arithmetic(tmp_path):
    path = models.streaming_lstm(tmp_path / "kws.onnx")
    p = onnxmodel.prepare(path, {"frames": (1, 7, 10)})
    ops = [n.op_type for n in p.model.graph.node]
    assert "LSTM" not in ops and not {"Shape", "Concat"} & set(ops[-6:]), ops
    assert p.outputs == (TensorSpec("logits", "float32", (1, 7, 4)), TensorSpec("h_out", "float32", (1, 1, 12)),
                         TensorSpec("c_out", "float32", (1, 1, 12)))
    check_against_ort(path, p)
    # the weights' per-direction slices and transposes are folded into initializers
    assert "Transpose" not in ops[1:-4] and ops.count("MatMul") == 1 + 7 + 1


@pytest.mark.parametrize("condition", ["shape", "data"])
def test_recurrent_node_inside_an_if(tmp_path, condition):
    """An LSTM in a branch: on a shape condition the If folds and the LSTM comes up to the main graph,
    where it is unrolled; on a data condition it stays in the branch, and check_supported names it."""
    lstm = onnx.load(models.recurrent(tmp_path / "l.onnx", "LSTM", initial_states=False, outputs=("Y_h",)))
    vi = helper.make_tensor_value_info
    then_branch = helper.make_graph(list(lstm.graph.node), "then", [], [vi("y_h", TensorProto.FLOAT, [1, 1, 8])],
                                    list(lstm.graph.initializer))
    else_branch = helper.make_graph([helper.make_node("ConstantOfShape", ["shape"], ["e"], name="zeros")],
                                    "else", [], [vi("e", TensorProto.FLOAT, [1, 1, 8])])
    if condition == "shape":        # T > 1
        cond = [helper.make_node("Shape", ["x"], ["s"], name="shape_x", start=0, end=1),
                helper.make_node("Greater", ["s", "one"], ["c1"], name="long"),
                helper.make_node("Squeeze", ["c1"], ["c"], name="scalar")]
    else:                           # max(x) > 0
        cond = [helper.make_node("ReduceMax", ["x"], ["m"], name="max", keepdims=0),
                helper.make_node("Greater", ["m", "zero"], ["c"], name="positive")]
    g = helper.make_graph(cond + [
        helper.make_node("If", ["c"], ["y"], name="gate", then_branch=then_branch, else_branch=else_branch)],
        "g", [vi("x", TensorProto.FLOAT, ["T", 1, 6])], [vi("y", TensorProto.FLOAT, [1, 1, 8])],
        [onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
         onnx.numpy_helper.from_array(np.array([1], np.int64), "one"),
         onnx.numpy_helper.from_array(np.array([1, 1, 8], np.int64), "shape")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / "gated.onnx"
    onnx.save(model, str(path))
    p = onnxmodel.prepare(path, {"x": (4, 1, 6)})
    assert p.outputs == (TensorSpec("y", "float32", (1, 1, 8)),)
    ops = {n.op_type for n in p.model.graph.node}
    if condition == "shape":
        assert not {"If", "LSTM"} & ops
        check_against_ort(path, p)
        return
    assert "If" in ops
    with pytest.raises(ModelError) as e:
        onnxmodel.check_supported(p.model, path)
    assert e.value.message.endswith(
        "has no converter for LSTM (domain ai.onnx, opset 17) at node 'lstm_1' (prepare unrolls these only in the "
        "main graph, with static shapes: not inside a Loop or an If whose condition is not constant)")


def test_unknown_activation_is_named(tmp_path):
    path = models.recurrent(tmp_path / "bad.onnx", "RNN", activations=["Swish"])
    with pytest.raises(ModelError) as e:
        onnxmodel.prepare(path, {"x": (3, 1, 6)})
    assert str(e.value) == (f"{path}: cannot unroll RNN node 'rnn_1' (TVM's ONNX frontend has no converter for "
                            "RNN): activation 'Swish' is not one the ONNX specification defines for RNN")


def test_unrolled_models_prepare_deterministically(tmp_path):
    path = models.recurrent(tmp_path / "d.onnx", "LSTM", direction="bidirectional", batch=2, seq_lens="input")
    a = onnxmodel.prepare(path, {"x": (3, 2, 6)}).model.SerializeToString()
    assert a == onnxmodel.prepare(path, {"x": (3, 2, 6)}).model.SerializeToString()
    script = ("import hashlib, sys; from bundler.compile import onnxmodel; "
              "m = onnxmodel.prepare(sys.argv[1], {'x': (3, 2, 6)}).model; "
              "print(hashlib.sha256(m.SerializeToString()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "4321"}).stdout.strip()
    assert out == hashlib.sha256(a).hexdigest()


# --- a whole bundle -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("factory, shapes", [
    (models.streaming_lstm, {"frames": (1, 6, 10)}),
    (models.shape_if, {"x": (1, 6)}),
])
def test_bundle_builds_and_verifies(tmp_path, factory, shapes):
    from bundler import api

    path = factory(tmp_path / f"{factory.__name__}.onnx")
    result = api.make("x86_64", path, input_shapes=shapes, out_dir=tmp_path / "dist", run_verify=True)
    assert result.verified is not None and result.verified.ok, result.verified.failures
    # the selftest vectors the bundle was verified against are onnxruntime's outputs of the original
    with tarfile.open(result.bundle) as tar:
        arrays = {Path(m.name).name: np.load(io.BytesIO(tar.extractfile(m).read()))
                  for m in tar.getmembers() if m.isfile() and m.name.endswith(".npy") and "/selftest/" in m.name}
    names = [i.name for i in onnx.load(path).graph.input]
    feeds = {name: arrays[f"input_{i}.npy"] for i, name in enumerate(names)}
    want = run_ort(path, feeds)
    assert max_diff([arrays[f"expected_{i}.npy"] for i in range(len(want))], want) <= ATOL


# --- torch exports (random weights) ---------------------------------------------------------

def _torch():
    return pytest.importorskip("torch", reason="torch is not installed: the onnx.helper models cover the same "
                                               "cases; pip install torch to check real exporter output")


def _export(torch, module, args, path: Path, names_in, names_out, dynamic_axes) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names_in,
                          output_names=names_out, dynamic_axes=dynamic_axes)
    return path


def test_torch_streaming_lstm(tmp_path):
    torch = _torch()
    torch.manual_seed(0)

    class Streaming(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(10, 16)
            self.lstm = torch.nn.LSTM(16, 12, num_layers=2, batch_first=True)
            self.head = torch.nn.Linear(12, 4)

        def forward(self, frames, h, c):
            y, (h2, c2) = self.lstm(torch.relu(self.proj(frames)), (h, c))
            return self.head(y), h2, c2

    path = _export(torch, Streaming().eval(), (torch.randn(1, 8, 10), torch.zeros(2, 1, 12), torch.zeros(2, 1, 12)),
                   tmp_path / "stream.onnx", ["frames", "h", "c"], ["logits", "h_out", "c_out"],
                   {"frames": {1: "T"}, "logits": {1: "T"}})
    assert "LSTM" in {n.op_type for n in onnx.load(path).graph.node}
    p = onnxmodel.prepare(path, {"frames": (1, 5, 10)})
    assert "LSTM" not in {n.op_type for n in p.model.graph.node}
    assert [s.shape for s in p.outputs] == [(1, 5, 4), (2, 1, 12), (2, 1, 12)]
    check_against_ort(path, p)


def test_torch_bidirectional_gru_batch2(tmp_path):
    torch = _torch()
    torch.manual_seed(1)

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(6, 8, batch_first=True, bidirectional=True)
            self.out = torch.nn.Linear(16, 3)

        def forward(self, x):
            y, h = self.gru(x)
            return self.out(y).softmax(-1), h

    path = _export(torch, Tagger().eval(), (torch.randn(2, 7, 6),), tmp_path / "gru.onnx", ["x"], ["probs", "h"],
                   {"x": {0: "B", 1: "T"}, "probs": {0: "B", 1: "T"}, "h": {1: "B"}})
    gru = [n for n in onnx.load(path).graph.node if n.op_type == "GRU"]
    assert gru and any(a.name == "linear_before_reset" and a.i == 1 for a in gru[0].attribute)
    p = onnxmodel.prepare(path, {"x": (2, 4, 6)})
    assert "GRU" not in {n.op_type for n in p.model.graph.node}
    check_against_ort(path, p)


def test_torch_scripted_shape_if(tmp_path):
    torch = _torch()

    class Crop(torch.nn.Module):
        def forward(self, x):
            if x.shape[1] > 4:
                return torch.relu(x[:, :4]) * 2.0
            return x + 1.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # torch.jit.script is deprecated, and still exports If
        scripted = torch.jit.script(Crop())
    path = _export(torch, scripted, (torch.randn(1, 6),), tmp_path / "crop.onnx", ["x"], ["y"],
                   {"x": {1: "L"}, "y": {1: "M"}})
    assert "If" in {n.op_type for n in onnx.load(path).graph.node}
    for length, width in ((6, 4), (3, 3)):
        p = onnxmodel.prepare(path, {"x": (1, length)})
        assert "If" not in {n.op_type for n in p.model.graph.node}
        assert p.outputs == (TensorSpec("y", "float32", (1, width)),)
        assert check_against_ort(path, p) == 0.0
