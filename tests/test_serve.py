"""`tvm-deploy serve`: the real service process on loopback, driven over HTTP.

The bundle is built for the x86_64 board, which runs natively here. One test
runs the service built with AddressSanitizer (and LeakSanitizer) under load
and bad requests, and requires a clean report.
"""

from __future__ import annotations

import http.client
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

from bundler import api
from bundler.build import harness, runtime, toolchain
from bundler.client import Client, ServiceError, decode, encode
from bundler.config import recipe
from bundler.package import bundle
from tests import models
from tests.bundletools import perturb_expected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve")
    models.multi_io(d / "multi.onnx")
    result = api.make("x86_64", d / "multi.onnx", out_dir=d, run_verify=False)
    return bundle.extract(result.bundle, d / "x")


class Service:
    def __init__(self, release: Path, exe: Path | None = None, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [str(exe or release / "bin" / "tvm-deploy"), "--bundle", str(release), "serve",
                "--listen", f"127.0.0.1:{self.port}"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 60
        while not Client(self.url, timeout=2).healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"service did not become healthy: {self.stop()[1]}")
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


def test_health_info_and_inference(service, release):
    c = Client(service.url)
    assert c.healthy()
    info = c.info()
    assert info["bundle_id"] == manifest(release)["bundle_id"]
    assert [i["name"] for i in info["inputs"]] == ["image", "vector"]
    inputs, expected = selftest_io(release)
    named = c.infer_named(inputs)
    assert list(named) == ["scores", "embedding"]
    for got, want in zip(named.values(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_curl_works(service, release):
    if not shutil.which("curl"):
        pytest.skip("needs curl")
    out = subprocess.run(["curl", "-fsS", f"{service.url}/healthz"], capture_output=True, text=True, check=True)
    assert out.stdout == "ok\n"
    inputs, expected = selftest_io(release)
    body = Path(service.url.replace("http://", "").replace(":", "_") + ".npy")
    tmp = release.parent / body.name
    tmp.write_bytes(encode(inputs))
    res = subprocess.run(["curl", "-fsS", "--data-binary", f"@{tmp}", "-H", "Content-Type: application/x-npy",
                          f"{service.url}/v1/infer"], capture_output=True, check=True)
    outs = decode(res.stdout)
    np.testing.assert_allclose(outs[0], expected[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"DELETE /v1/infer HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    (b"POST /v1/infer HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", 413),
    (b"POST /v1/infer HTTP/1.1\r\nContent-Length: 7\r\n\r\ngarbage", 400),
    (b"POST /v1/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"get /healthz HTTP/1.1\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nbroken header line\r\n\r\n", 400),
])
def test_bad_requests_get_4xx_and_the_service_lives_on(service, request_bytes, status):
    reply = raw(service.port, request_bytes)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
    if status not in (501, 505):
        assert b'{"error": "' in reply
    assert Client(service.url).healthy()


def test_wrong_shape_and_dtype_are_400s(service, release):
    inputs, _ = selftest_io(release)
    c = Client(service.url)
    with pytest.raises(ServiceError) as e:
        c.infer([inputs[0][:, :1], inputs[1]])
    assert e.value.status == 400 and "input 'image': shape (1,1,8,8)" in e.value.message
    with pytest.raises(ServiceError) as e:
        c.infer([inputs[0].astype(np.float64), inputs[1]])
    assert e.value.status == 400 and "dtype float64" in e.value.message
    with pytest.raises(ServiceError) as e:
        c.infer(inputs[:1])
    assert e.value.status == 400 and "takes 2 input(s), got 1" in e.value.message
    truncated = encode(inputs)[:-10]
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    conn.request("POST", "/v1/infer", body=truncated)
    r = conn.getresponse()
    assert r.status == 400 and b"truncated" in r.read()


def test_keep_alive_and_concurrent_clients(service, release):
    inputs, expected = selftest_io(release)
    body = encode(inputs)
    errors: list[str] = []

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
        for _ in range(n):
            conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": "application/x-npy"})
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                errors.append(f"{r.status} {data[:100]!r}")
                continue
            outs = decode(data)
            if not np.allclose(outs[0], expected[0], rtol=1e-5, atol=1e-6):
                errors.append("wrong output")
        conn.close()

    threads = [threading.Thread(target=client, args=(25,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:5]


def test_parser_fuzz_never_kills_the_service(service):
    """Random and mutated request heads, bounded in count; the service must answer or close, never die."""
    rng = random.Random(1234)
    seeds = [b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",
             b"POST /v1/infer HTTP/1.1\r\nContent-Length: 12\r\n\r\n\x93NUMPY\x01\x00\x00\x00ab"]
    for i in range(300):
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
    assert Client(service.url).healthy()


def test_sigterm_stops_cleanly(release):
    s = Service(release)
    code, err = s.stop()
    assert code == 0 and "stopped" in err


def test_failing_selftest_never_becomes_healthy(release, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    perturb_expected(bad)
    port = free_port()
    proc = subprocess.run([str(bad / "bin" / "tvm-deploy"), "serve", "--listen", f"127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "selftest failed, not serving" in proc.stderr


def test_address_in_use_is_a_clear_error(service, release):
    proc = subprocess.run([str(release / "bin" / "tvm-deploy"), "serve", "--listen", f"127.0.0.1:{service.port}"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3 and "Address already in use" in proc.stderr


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
    s = Service(release, exe=exe_dir / "tvm-deploy", env=env)
    inputs, _ = selftest_io(release)
    c = Client(s.url)
    for i in range(40):
        c.infer(inputs)
        raw(s.port, b"POST /v1/infer HTTP/1.1\r\nContent-Length: 7\r\n\r\ngarbage")
        raw(s.port, b"GET /x HTTP/1.1\r\n\r\n")
        try:
            c.infer([inputs[0][:, :1], inputs[1]])
        except ServiceError:
            pass
    code, err = s.stop()
    assert "AddressSanitizer" not in err and "LeakSanitizer" not in err, err[-3000:]
    assert code == 0, err[-2000:]
