"""A small client for a bundle's inference service (`tvm-deploy serve`).

The protocol is plain HTTP/1.1, so curl works too:

- ``GET /healthz``: 200 ``ok`` once the model is loaded and its selftest passed, 503 before.
- ``GET /v1/info``: JSON: bundle id, board, model signature, versions.
- ``POST /v1/infer``: body = the inputs as .npy arrays, concatenated in input order
  (``Content-Type: application/x-npy``); response = the outputs the same way, with
  their names in the ``X-Tvmbundle-Outputs`` header.  A bad request gets a 4xx with
  a JSON body ``{"error": "..."}``.

Only the standard library and numpy: the client runs on boards and in CI jobs.
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np

NPY = "application/x-npy"


class ServiceError(Exception):
    """The service answered with an error status."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(f"HTTP {status}: {message}")


def encode(arrays: Sequence[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    for a in arrays:
        np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def decode(body: bytes) -> list[np.ndarray]:
    """Split concatenated .npy arrays (each header says how long its data is)."""
    buf = io.BytesIO(body)
    out = []
    while buf.tell() < len(body):
        out.append(np.load(buf, allow_pickle=False))
    return out


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8470", timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            payload = e.read()
            try:
                message = json.loads(payload).get("error", "")
            except ValueError:
                message = payload.decode(errors="replace").strip()
            raise ServiceError(e.code, message) from None

    def healthy(self) -> bool:
        try:
            status, _, _ = self._request("GET", "/healthz")
            return status == 200
        except (ServiceError, OSError):
            return False

    def info(self) -> dict[str, Any]:
        _, _, body = self._request("GET", "/v1/info")
        return json.loads(body)

    def infer(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        _, _, body = self._request("POST", "/v1/infer", encode(inputs), {"Content-Type": NPY})
        return decode(body)

    def infer_named(self, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        _, headers, body = self._request("POST", "/v1/infer", encode(inputs), {"Content-Type": NPY})
        names = [n for n in headers.get("X-Tvmbundle-Outputs", "").split(",") if n]
        arrays = decode(body)
        return dict(zip(names or [f"output_{i}" for i in range(len(arrays))], arrays))
