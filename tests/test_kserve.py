"""`tvm-deploy serve` with Triton's own HTTP client (tritonclient), the way a KServe / Triton user
drives any Open Inference Protocol v2 server: an x86_64 bundle natively and an rpi4 (aarch64)
bundle under qemu-user, outputs compared with onnxruntime on the same inputs. Loopback only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bundler import api
from bundler.package import bundle
from tests import models
from tests.test_serve import Service

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow

BOARDS = {
    "x86_64": (),
    "rpi4": ("qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"),
}


def onnxruntime_outputs(model: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.fixture(scope="module", params=list(BOARDS))
def served(request, tmp_path_factory):
    board = request.param
    prefix = BOARDS[board]
    if prefix and not (shutil.which(prefix[0]) and shutil.which("aarch64-linux-gnu-g++")):
        pytest.skip("needs qemu-user and the aarch64 cross compiler")
    d = tmp_path_factory.mktemp(f"kserve-{board}")
    onnx_path = models.multi_io(d / "multi.onnx")
    top = bundle.extract(api.make(board, onnx_path, out_dir=d, run_verify=False).bundle, d / "x")
    # Under qemu the model loads and runs its selftest slowly: give it time to become ready.
    s = Service(top, prefix=prefix, ready_within=300)
    yield board, top, onnx_path, s
    code, err = s.stop()
    assert code == 0, err


def client(s: Service):
    return tritonclient_http.InferenceServerClient(f"127.0.0.1:{s.port}", network_timeout=120.0)


def test_health_and_metadata(served):
    board, top, _, s = served
    m = json.loads((top / "manifest.json").read_text())
    c = client(s)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("multi") and c.is_model_ready("multi", m["bundle_id"])
    assert not c.is_model_ready("other") and not c.is_model_ready("multi", "not-this-one")
    server = c.get_server_metadata()
    assert server["name"] == "tvm-deploy" and "binary_tensor_data" in server["extensions"]
    meta = c.get_model_metadata("multi")
    assert meta["name"] == "multi" and meta["versions"] == [m["bundle_id"]]
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8]},
                              {"name": "vector", "datatype": "FP32", "shape": [1, 16]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("scores", "FP32", [1, 5]), ("embedding", "FP32", [1, 16])]
    assert c.get_model_metadata("multi", m["bundle_id"]) == meta
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("other")
    assert "unknown model 'other'" in str(e.value)


@pytest.mark.parametrize("binary_in, binary_out", [(True, True), (False, False), (True, False), (False, True)])
def test_infer_matches_onnxruntime(served, binary_in, binary_out):
    board, top, onnx_path, s = served
    rng = np.random.default_rng(7)
    feeds = {"image": rng.standard_normal((1, 3, 8, 8)).astype(np.float32),
             "vector": rng.standard_normal((1, 16)).astype(np.float32)}
    want = onnxruntime_outputs(onnx_path, feeds)
    inputs = []
    for name, a in feeds.items():
        t = tritonclient_http.InferInput(name, list(a.shape), "FP32")
        t.set_data_from_numpy(a, binary_data=binary_in)
        inputs.append(t)
    outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary_out) for n in ("scores", "embedding")]
    c = client(s)
    r = c.infer("multi", inputs, outputs=outputs, request_id=f"{board}-{binary_in}-{binary_out}")
    assert r.get_response()["id"] == f"{board}-{binary_in}-{binary_out}"
    for name, w in zip(("scores", "embedding"), want):
        np.testing.assert_allclose(r.as_numpy(name), w, rtol=1e-4, atol=1e-5)
    # no outputs named: tritonclient asks for all of them as binary data
    r = c.infer("multi", inputs)
    np.testing.assert_allclose(r.as_numpy("scores"), want[0], rtol=1e-4, atol=1e-5)
    assert all("binary_data_size" in o["parameters"] for o in r.get_response()["outputs"])


def test_infer_errors_come_back_as_exceptions(served):
    _, _, _, s = served
    c = client(s)
    t = tritonclient_http.InferInput("image", [1, 1, 8, 8], "FP32")
    t.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(InferenceServerException) as e:
        c.infer("multi", [t])
    assert "shape [1,1,8,8] does not match the model's [1,3,8,8]" in str(e.value)


def test_integer_datatypes_both_ways(tmp_path):
    """UINT8 in, FP32 and a 0-d INT64 out, as JSON and as binary tensors."""
    onnx_path = models.int_model(tmp_path / "int.onnx")
    top = bundle.extract(api.make("x86_64", onnx_path, out_dir=tmp_path, run_verify=False).bundle, tmp_path / "x")
    s = Service(top)
    try:
        pixels = np.arange(16, dtype=np.uint8).reshape(1, 4, 4) * 15
        want = onnxruntime_outputs(onnx_path, {"pixels": pixels})
        c = client(s)
        meta = c.get_model_metadata("int")
        assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("pixels", "UINT8")]
        assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
            ("scaled", "FP32", [1, 4, 4]), ("total", "INT64", [])]
        for binary in (True, False):
            t = tritonclient_http.InferInput("pixels", [1, 4, 4], "UINT8")
            t.set_data_from_numpy(pixels, binary_data=binary)
            outs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary) for n in ("scaled", "total")]
            r = c.infer("int", [t], outputs=outs)
            np.testing.assert_allclose(r.as_numpy("scaled"), want[0], rtol=1e-6)
            assert r.as_numpy("total").dtype == np.int64 and int(r.as_numpy("total")) == int(want[1])
        t = tritonclient_http.InferInput("pixels", [1, 4, 4], "UINT8")
        t.set_data_from_numpy(pixels, binary_data=False)
        t._data[3] = 256   # out of range for UINT8
        with pytest.raises(InferenceServerException) as e:
            c.infer("int", [t])
        assert "element 3 is not an integer in the datatype's range" in str(e.value)
    finally:
        code, err = s.stop()
    assert code == 0, err
