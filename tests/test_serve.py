"""`tvm-deploy serve`: the real service process on loopback, driven over HTTP.

The service speaks the Open Inference Protocol v2 (tests/test_kserve.py drives it with Triton's
own client, natively and under qemu-user). The bundle is built for the x86_64 board, which runs
natively here. One test runs the service built with AddressSanitizer (and LeakSanitizer) under
load and bad requests, and requires a clean report. Everything talks to 127.0.0.1 only, and
every loop is bounded.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bundler.build import harness, runtime, toolchain
from bundler.client import Client, ServiceError, decode, encode, encode_request
from bundler.config import recipe
from tests import models
from tests.bundletools import perturb_expected, unpacked
from tests.sshd import free_port

INFER = "/v2/models/multi/infer"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return unpacked(tmp_path_factory, "x86_64", models.multi_io, "multi")


class Service:
    def __init__(self, release: Path, *args: str, exe: Path | None = None, env: dict | None = None,
                 prefix: tuple[str, ...] = (), ready_within: float = 60):
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [*prefix, str(exe or release / "bin" / "tvm-deploy"), "--bundle", str(release), "serve",
                "--listen", f"127.0.0.1:{self.port}", *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + ready_within
        while not Client(self.url, timeout=2).ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"service did not become ready: {self.stop()[1]}")
            time.sleep(0.05)

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


@pytest.fixture
def service(release):
    s = Service(release)
    yield s
    s.stop()


def manifest(release: Path) -> dict:
    return json.loads((release / "manifest.json").read_text())


def selftest_io(release: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    m = manifest(release)
    return ([np.load(release / p) for p in m["selftest"]["inputs"]],
            [np.load(release / p) for p in m["selftest"]["expected"]])


def raw(port: int, data: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, socket.timeout):
            pass
    return b"".join(chunks)


def post(port: int, path: str, body: bytes, headers: dict | None = None, timeout: float = 30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.headers), r.read()
    finally:
        conn.close()


def json_request(inputs: list[np.ndarray], **extra) -> bytes:
    req = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": "FP32", "data": a.reshape(-1).tolist()}
                      for n, a in zip(["image", "vector"], inputs)], **extra}
    return json.dumps(req).encode()


def metrics(port: int) -> dict[str, list]:
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    r = conn.getresponse()
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    text = r.read().decode()
    conn.close()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def sample(fams: dict, name: str, **labels) -> float:
    for family in fams.values():
        for s in family:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


# ---- the protocol ------------------------------------------------------------------------------

def test_v2_health_metadata_and_inference(service, release):
    m = manifest(release)
    c = Client(service.url)
    assert c.live() and c.ready()
    server = c.server_metadata()
    assert server["name"] == "tvm-deploy" and "binary_tensor_data" in server["extensions"]
    meta = c.metadata()
    assert meta["name"] == "multi" and meta["versions"] == [m["bundle_id"]]
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("image", "FP32", [1, 3, 8, 8]), ("vector", "FP32", [1, 16])]
    assert [o["name"] for o in meta["outputs"]] == ["scores", "embedding"]
    inputs, expected = selftest_io(release)
    for binary in (True, False):
        out = c.infer(inputs, binary=binary)
        assert list(out) == ["scores", "embedding"]
        for got, want in zip(out.values(), expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # by name, one output, in JSON, with an id echoed
    status, headers, body = post(service.port, f"/v2/models/multi/versions/{m['bundle_id']}/infer",
                                 json_request(inputs, id="req-7", outputs=[{"name": "embedding"}]))
    assert status == 200 and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert doc["id"] == "req-7" and doc["model_name"] == "multi" and doc["model_version"] == m["bundle_id"]
    assert [o["name"] for o in doc["outputs"]] == ["embedding"]
    np.testing.assert_allclose(np.array(doc["outputs"][0]["data"], np.float32).reshape(1, 16), expected[1],
                               rtol=1e-5, atol=1e-6)
    # binary in, JSON out for one output and binary for the other
    body, n = encode_request(dict(zip(["image", "vector"], inputs)), binary=True)
    head = json.loads(body[:n])
    head["outputs"] = [{"name": "scores", "parameters": {"binary_data": False}},
                       {"name": "embedding", "parameters": {"binary_data": True}}]
    head.pop("parameters")
    h = json.dumps(head).encode()
    status, headers, resp = post(service.port, INFER, h + body[n:], {"Inference-Header-Content-Length": str(len(h))})
    assert status == 200
    hl = int(headers["Inference-Header-Content-Length"])
    doc = json.loads(resp[:hl])
    assert "data" in doc["outputs"][0] and doc["outputs"][1]["parameters"]["binary_data_size"] == 64
    np.testing.assert_allclose(np.frombuffer(resp[hl:], np.float32).reshape(1, 16), expected[1], rtol=1e-5, atol=1e-6)


def test_readiness_endpoints_and_deprecated_aliases(service, release):
    m = manifest(release)
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/multi/ready",
                 f"/v2/models/multi/versions/{m['bundle_id']}/ready", "/healthz", "/v1/info"):
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.status == 200, (path, r.read())
        r.read()
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    conn.request("GET", "/v2/models/multi/versions/0123/ready")
    assert conn.getresponse().status == 404
    assert Client(service.url).info()["bundle_id"] == m["bundle_id"]
    inputs, expected = selftest_io(release)
    status, headers, body = post(service.port, "/v1/infer", encode(inputs), {"Content-Type": "application/x-npy"})
    assert status == 200 and headers["X-Tvmbundle-Outputs"] == "scores,embedding"
    np.testing.assert_allclose(decode(body)[0], expected[0], rtol=1e-5, atol=1e-6)


def test_curl_works(service, release):
    if not shutil.which("curl"):
        pytest.skip("needs curl")
    out = subprocess.run(["curl", "-fsS", f"{service.url}/v2/health/ready"], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == {"ready": True}
    inputs, expected = selftest_io(release)
    res = subprocess.run(["curl", "-fsS", "-H", "Content-Type: application/json", "--data-binary", "@-",
                          f"{service.url}{INFER}"], input=json_request(inputs), capture_output=True, check=True)
    doc = json.loads(res.stdout)
    np.testing.assert_allclose(np.array(doc["outputs"][0]["data"], np.float32).reshape(1, 5), expected[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"GET /v2/models/other HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"GET /v2/models/multi/versions/nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"POST /v2/models/other/infer HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 404),
    (b"DELETE /v2/models/multi/infer HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"POST /v2/health/ready HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    (b"POST /v2/models/multi/infer HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    (b"POST /v2/models/multi/infer HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", 413),
    (b"POST /v2/models/multi/infer HTTP/1.1\r\nContent-Length: 7\r\n\r\ngarbage", 400),
    (b"POST /v2/models/multi/infer HTTP/1.1\r\nContent-Length: 2\r\nContent-Encoding: gzip\r\n\r\n{}", 415),
    (b"POST /v2/models/multi/infer HTTP/1.1\r\nContent-Length: 2\r\nInference-Header-Content-Length: 9\r\n\r\n{}",
     400),
    (b"POST /v2/models/multi/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    (b"POST /v1/infer HTTP/1.1\r\nContent-Length: 7\r\n\r\ngarbage", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET /v2/health/ready HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"get /v2/health/ready HTTP/1.1\r\n\r\n", 400),
    (b"GET /v2/health/ready HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET /v2/health/ready HTTP/1.1\r\nbroken header line\r\n\r\n", 400),
    (b"GET /v2/health/ready HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),
    (b"GET /v2/models/%zz HTTP/1.1\r\n\r\n", 400),
])
def test_bad_requests_get_4xx_and_the_service_lives_on(service, request_bytes, status):
    reply = raw(service.port, request_bytes)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
    body = reply.split(b"\r\n\r\n", 1)[1]
    assert "error" in json.loads(body)
    if status == 405:
        assert b"\r\nAllow: " in reply
    assert Client(service.url).ready()


def test_bare_lf_line_endings_are_accepted(service, release):
    """RFC 9112 lets a server accept LF alone; the old service never answered such a request."""
    reply = raw(service.port, b"GET /v2/health/ready HTTP/1.1\nHost: a\n\n", timeout=5)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    inputs, _ = selftest_io(release)
    body = json_request(inputs)
    reply = raw(service.port, b"POST " + INFER.encode() + b" HTTP/1.1\nContent-Length: " + str(len(body)).encode()
                + b"\n\n" + body, timeout=5)
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"outputs"' in reply, reply[:200]
    # and a mix, pipelined on one connection
    reply = raw(service.port, b"GET /v2/health/live HTTP/1.1\r\nHost: a\n\r\nGET /v2 HTTP/1.1\n\n", timeout=5)
    assert reply.count(b"HTTP/1.1 200 ") == 2, reply[:400]


def test_wrong_tensors_are_400s_with_the_reason(service, release):
    inputs, _ = selftest_io(release)
    c = Client(service.url)
    cases = [
        ([inputs[0][:, :1], inputs[1]], "input 'image': shape [1,1,8,8] does not match the model's [1,3,8,8]"),
        ([inputs[0].astype(np.float64), inputs[1]], "input 'image': datatype FP64 does not match the model's FP32"),
        ({"image": inputs[0]}, "input 'vector' is missing"),
        ({"image": inputs[0], "vector": inputs[1], "extra": inputs[1]}, "unknown input 'extra'"),
    ]
    for arrays, message in cases:
        with pytest.raises(ServiceError) as e:
            c.infer(arrays)
        assert e.value.status == 400 and message in e.value.message, e.value.message
    with pytest.raises(ServiceError) as e:
        c.infer(inputs, outputs=["nope"])
    assert e.value.status == 400 and "unknown output 'nope'" in e.value.message
    req = json.loads(json_request(inputs))
    req["inputs"][1]["data"] = req["inputs"][1]["data"][:-1]
    status, _, body = post(service.port, INFER, json.dumps(req).encode())
    assert status == 400 and b"has 15 element(s)" in body
    req["inputs"][1] = {"name": "vector", "shape": [1, 16], "datatype": "BYTES", "data": ["a"] * 16}
    status, _, body = post(service.port, INFER, json.dumps(req).encode())
    assert status == 400 and b"BYTES tensors are not supported" in body
    body, n = encode_request(dict(zip(["image", "vector"], inputs)), binary=True)
    status, _, resp = post(service.port, INFER, body[:-4], {"Inference-Header-Content-Length": str(n)})
    assert status == 400 and b"binary data ends before" in resp
    status, _, resp = post(service.port, INFER, body + b"xx", {"Inference-Header-Content-Length": str(n)})
    assert status == 400 and b"2 byte(s) of binary data after" in resp


def test_keep_alive_and_concurrent_clients(service, release):
    inputs, expected = selftest_io(release)
    errors: list[str] = []

    def client(n: int, binary: bool) -> None:
        c = Client(service.url)
        for _ in range(n):
            try:
                out = c.infer(inputs, binary=binary)
            except (ServiceError, OSError) as e:
                errors.append(repr(e))
                continue
            if not np.allclose(out["scores"], expected[0], rtol=1e-5, atol=1e-6):
                errors.append("wrong output")
        c.close()

    threads = [threading.Thread(target=client, args=(25, i % 2 == 0)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:5]


def test_metrics_count_requests_and_latency(service, release):
    m = manifest(release)
    labels = {"model": "multi", "version": m["bundle_id"]}
    before = metrics(service.port)
    inputs, _ = selftest_io(release)
    c = Client(service.url)
    for _ in range(3):
        c.infer(inputs)
    with pytest.raises(ServiceError):
        c.infer([inputs[0][:, :1], inputs[1]])
    raw(service.port, b"GET /v2/models/other HTTP/1.1\r\n\r\n")
    after = metrics(service.port)
    ok = dict(labels, endpoint="infer", code="200")
    assert sample(after, "tvmbundle_requests_total", **ok) - sample(before, "tvmbundle_requests_total", **ok) == 3
    bad = dict(labels, endpoint="infer", code="400")
    assert sample(after, "tvmbundle_requests_total", **bad) - sample(before, "tvmbundle_requests_total", **bad) == 1
    assert (sample(after, "tvmbundle_http_responses_total", code="404")
            - sample(before, "tvmbundle_http_responses_total", code="404")) == 1
    count = "tvmbundle_inference_duration_seconds_count"
    assert sample(after, count, **labels) - sample(before, count, **labels) == 3   # the 400 never ran the model
    inf = dict(labels, le="+Inf")
    assert sample(after, "tvmbundle_request_duration_seconds_bucket", **inf) >= 4
    assert sample(after, "tvmbundle_selftest_passed", **labels) == 1
    assert sample(after, "tvmbundle_model_ready", **labels) == 1
    assert sample(after, "tvmbundle_model_load_seconds", **labels) > 0
    assert sample(after, "tvmbundle_queue_capacity", **labels) == 32
    assert "tvmbundle_queue_length" in after and "tvmbundle_requests_in_flight" in after
    assert sample(after, "tvmbundle_connections_open") >= 1


def test_parser_fuzz_never_kills_the_service(service):
    """Random and mutated requests, bounded in count; the service must answer or close, never die."""
    rng = random.Random(1234)
    seeds = [b"GET /v2/health/ready HTTP/1.1\r\nHost: a\r\n\r\n",
             b"GET /v2/models/multi HTTP/1.1\nHost: a\n\n",
             b"POST /v2/models/multi/infer HTTP/1.1\r\nContent-Length: 60\r\n\r\n"
             b'{"inputs":[{"name":"vector","shape":[1,16],"datatype":"FP32"}]}',
             b"POST /v2/models/multi/infer HTTP/1.1\r\nContent-Length: 90\r\nInference-Header-Content-Length: 80\r\n\r\n"
             b'{"inputs":[{"name":"vector","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}'
             b"\x00\x00\x80?\x00\x00\x00@",
             b"POST /v1/infer HTTP/1.1\r\nContent-Length: 12\r\n\r\n\x93NUMPY\x01\x00\x00\x00ab"]
    for i in range(400):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            op = rng.randint(0, 2)
            pos = rng.randrange(len(data)) if data else 0
            if op == 0 and data:
                data[pos] = rng.randrange(256)
            elif op == 1:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            elif data:
                del data[pos:pos + rng.randint(1, 8)]
        if i % 10 == 0:
            data = bytearray(rng.randbytes(rng.randint(1, 400)))
        raw(service.port, bytes(data), timeout=2)
        assert service.proc.poll() is None, f"service died on input {bytes(data)!r}"
    assert Client(service.url).ready()


# ---- probe -------------------------------------------------------------------------------------

def probe(release: Path, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(release / "bin" / "tvm-deploy"), "--bundle", str(release), "probe",
                           f"127.0.0.1:{port}", "--timeout", "2"], capture_output=True, text=True, timeout=30)


def test_probe_checks_readiness_and_the_bundle_id(service, release, tmp_path):
    res = probe(release, service.port)
    assert res.returncode == 0 and res.stdout == "healthy\n", res.stderr
    other = tmp_path / "other"
    shutil.copytree(release, other, symlinks=True)
    m = manifest(release)
    m["bundle_id"] = "f" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    res = probe(other, service.port)
    assert res.returncode == 1 and "another bundle answers" in res.stderr, res.stderr
    res = probe(release, free_port("127.0.0.1"))
    assert res.returncode == 1 and "Connection refused" in res.stderr


def test_probe_parses_json_not_substrings(release):
    """A server whose metadata mentions the bundle id, but not as its model's version, is not ours."""
    bundle_id = manifest(release)["bundle_id"]
    decoy = json.dumps({"name": "multi", "versions": ["0" * 64],
                        "note": f'"bundle_id": "{bundle_id}" "versions": ["{bundle_id}"]'}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = b'{"ready": true}' if self.path == "/v2/health/ready" else decoy
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        res = probe(release, server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
    assert res.returncode == 1 and "another bundle answers" in res.stderr, (res.stdout, res.stderr)


# ---- lifecycle ---------------------------------------------------------------------------------

def test_sigterm_stops_cleanly_even_with_idle_keep_alive_clients(release):
    s = Service(release, "--idle-timeout", "3")
    conns = []
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        conn.request("GET", "/v2/health/live")
        conn.getresponse().read()
        conns.append(conn)   # left open, idle
    trickler = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    trickler.sendall(b"GET /v2/hea")   # a request that never completes
    code, err = s.stop()
    trickler.close()
    for conn in conns:
        conn.close()
    assert code == 0 and "stopped" in err, err


def test_failing_selftest_never_becomes_ready(release, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    perturb_expected(bad)
    port = free_port("127.0.0.1")
    proc = subprocess.run([str(bad / "bin" / "tvm-deploy"), "serve", "--listen", f"127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "selftest failed, not serving" in proc.stderr


def test_address_in_use_is_a_clear_error(service, release):
    proc = subprocess.run([str(release / "bin" / "tvm-deploy"), "serve", "--listen", f"127.0.0.1:{service.port}"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3 and "Address already in use" in proc.stderr


# ---- slow and many clients ---------------------------------------------------------------------

def trickle(port: int, stop: threading.Event, until: float, counts: dict, lock: threading.Lock) -> None:
    """One slow client: a request head sent a byte at a time (about one a second), reconnecting
    when the service cuts it off, until `until` or `stop`."""
    head = b"POST /v2/models/multi/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4000\r\n\r\n"
    while not stop.is_set() and time.monotonic() < until:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=3)
        except OSError:
            time.sleep(0.2)
            continue
        cut = False
        try:
            for b in head:
                if stop.is_set() or time.monotonic() >= until:
                    break
                s.sendall(bytes([b]))
                if stop.wait(1.0):
                    break
        except OSError:
            cut = True
        finally:
            s.close()
        with lock:
            counts["cut" if cut else "done"] = counts.get("cut" if cut else "done", 0) + 1


@pytest.mark.slow
@pytest.mark.parametrize("n_slow, max_connections", [(16, 256), (64, 48)])
def test_slow_clients_do_not_starve_others(release, n_slow, max_connections):
    """Clients trickling requests a byte a second hold no one up: a normal client's inferences and
    fresh health probes keep succeeding. With 64 tricklers and 48 slots, slow ones are evicted."""
    s = Service(release, "--request-timeout", "4", "--max-connections", str(max_connections))
    inputs, expected = selftest_io(release)
    stop = threading.Event()
    counts: dict[str, int] = {}
    lock = threading.Lock()
    until = time.monotonic() + 12
    threads = [threading.Thread(target=trickle, args=(s.port, stop, until, counts, lock)) for _ in range(n_slow)]
    try:
        for t in threads:
            t.start()
        time.sleep(2)   # every trickler connected and part-way through its head
        c = Client(s.url, timeout=10)
        done = 0
        while time.monotonic() < until - 1:
            out = c.infer(inputs)
            np.testing.assert_allclose(out["scores"], expected[0], rtol=1e-5, atol=1e-6)
            probe_conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
            probe_conn.request("GET", "/v2/health/ready")
            assert probe_conn.getresponse().status == 200
            probe_conn.close()
            assert metrics(s.port)["tvmbundle_requests"]
            done += 1
            time.sleep(0.05)
        assert done > 0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        fams = metrics(s.port) if s.proc.poll() is None else {}
        code, err = s.stop()
    assert code == 0, err
    # The service cut the tricklers off at the request deadline (408), or evicted them for others.
    dropped = sum(sample(fams, "tvmbundle_connections_dropped_total", reason=r)
                  for r in ("timeout", "slow_evicted", "idle_evicted"))
    print(f"{n_slow} tricklers, {max_connections} slots: {done} rounds of infer + ready + metrics all 200; "
          f"tricklers {counts}; dropped by the service: "
          + ", ".join(f"{r} {sample(fams, 'tvmbundle_connections_dropped_total', reason=r):.0f}"
                      for r in ("timeout", "slow_evicted", "idle_evicted", "rejected")))
    assert dropped >= n_slow // 2, fams.get("tvmbundle_connections_dropped")


def test_idle_keep_alive_connections_make_room(release):
    s = Service(release, "--max-connections", "4")
    try:
        idle = []
        for _ in range(4):
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
            conn.request("GET", "/v2/health/live")
            assert conn.getresponse().read()
            idle.append(conn)     # every slot now held by an idle keep-alive connection
        c = Client(s.url)
        assert c.ready() and c.metadata()["name"] == "multi"
        assert sample(metrics(s.port), "tvmbundle_connections_dropped_total", reason="idle_evicted") >= 1
        for conn in idle:
            conn.close()
    finally:
        code, err = s.stop()
    assert code == 0, err


@pytest.mark.slow
def test_burst_of_200_concurrent_requests_all_answered(release):
    """Every request of a burst gets an answer: 200, or 503 with Retry-After when the queue is full."""
    s = Service(release, "--max-queue", "4")
    inputs, expected = selftest_io(release)
    body, n = encode_request(dict(zip(["image", "vector"], inputs)), binary=True)
    statuses: list[int] = []
    problems: list[str] = []
    lock = threading.Lock()
    go = threading.Barrier(200, timeout=60)

    def one() -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
            conn.connect()
            go.wait()
            conn.request("POST", INFER, body=body, headers={"Inference-Header-Content-Length": str(n)})
            r = conn.getresponse()
            data = r.read()
            if r.status == 503 and r.headers.get("Retry-After") is None:
                raise AssertionError("503 without Retry-After")
            if r.status == 200:
                hl = int(r.headers["Inference-Header-Content-Length"])
                got = np.frombuffer(data[hl:hl + 20], np.float32).reshape(1, 5)
                if not np.allclose(got, expected[0], rtol=1e-5, atol=1e-6):
                    raise AssertionError("wrong output")
            conn.close()
            with lock:
                statuses.append(r.status)
        except Exception as e:  # noqa: BLE001 - every failure is a lost request
            with lock:
                problems.append(repr(e))

    probes: list[int] = []

    def health() -> None:   # fresh connections while the burst fills the queue: never 503
        for _ in range(20):
            for path in ("/v2/health/ready", "/metrics"):
                conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
                conn.request("GET", path)
                probes.append(conn.getresponse().status)
                conn.close()

    try:
        threads = [threading.Thread(target=one) for _ in range(200)] + [threading.Thread(target=health)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not problems, problems[:5]
        assert probes == [200] * 40, probes
        assert len(statuses) == 200 and set(statuses) <= {200, 503}, sorted(set(statuses))
        assert statuses.count(200) > 0
        assert Client(s.url).ready() and s.proc.poll() is None
        fams = metrics(s.port)
        labels = {"model": "multi", "endpoint": "infer"}
        assert sample(fams, "tvmbundle_requests_total", code="503", **labels) == statuses.count(503)
        print(f"burst of 200: {statuses.count(200)} x 200, {statuses.count(503)} x 503, health probes {len(probes)} x 200")
    finally:
        code, err = s.stop()
    assert code == 0, err


# ---- sanitizers --------------------------------------------------------------------------------

@pytest.mark.slow
def test_asan_build_under_load_reports_nothing(release, tmp_path):
    """The host build with AddressSanitizer and LeakSanitizer serves good and bad requests cleanly."""
    r = recipe.load("x86_64")
    h = harness.build(toolchain.resolve(r), runtime.get(r), {"TVMBUNDLE_SANITIZE": "address"})
    exe = tmp_path / "tvm-deploy-asan"
    shutil.copy(h.path, exe)
    shutil.copytree(release / "lib", tmp_path / "lib")   # its RPATH is $ORIGIN/../lib
    exe_dir = tmp_path / "bin"
    exe_dir.mkdir()
    shutil.move(exe, exe_dir / "tvm-deploy")
    supp = tmp_path / "lsan.supp"
    # TVM's runtime keeps process-lifetime registries; only our code is under test.
    supp.write_text("leak:libtvm_runtime.so\nleak:libtvm_ffi.so\n")
    env = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=23",
           "LSAN_OPTIONS": f"suppressions={supp}:exitcode=23"}
    s = Service(release, "--max-connections", "8", exe=exe_dir / "tvm-deploy", env=env)
    inputs, _ = selftest_io(release)
    c = Client(s.url)
    idle = []
    for i in range(40):
        c.infer(inputs, binary=i % 2 == 0)
        raw(s.port, b"POST /v2/models/multi/infer HTTP/1.1\r\nContent-Length: 7\r\n\r\ngarbage")
        raw(s.port, b"GET /x HTTP/1.1\n\n")
        raw(s.port, b"GET /v2/hea")           # cut off mid-head
        post(s.port, "/v1/infer", encode(inputs))
        try:
            c.infer([inputs[0][:, :1], inputs[1]])
        except ServiceError:
            pass
        if i % 4 == 0:   # fill the slots with idle keep-alive connections, so that some get evicted
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
            conn.request("GET", "/metrics")
            conn.getresponse().read()
            idle.append(conn)
    trickler = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    trickler.sendall(b"POST /v2/models/multi/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
    code, err = s.stop()
    trickler.close()
    for conn in idle:
        conn.close()
    assert "AddressSanitizer" not in err and "LeakSanitizer" not in err, err[-3000:]
    assert code == 0, err[-2000:]
