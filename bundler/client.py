"""A small client for a bundle's inference service (`tvm-deploy serve`).

The service speaks the Open Inference Protocol v2 (KServe's and Triton's HTTP/REST protocol), so
any v2 client works, e.g. ``tritonclient.http.InferenceServerClient("127.0.0.1:8470")``, and so
does curl:

- ``GET /v2/health/live``, ``GET /v2/health/ready``: 200 once live / ready (ready: the model is
  loaded and the bundle's selftest passed; 503 before).
- ``GET /v2``: server metadata; ``GET /v2/models/NAME``: the model's metadata: ``versions`` is
  ``[bundle id]``, inputs and outputs with datatype and shape. NAME is the bundle's name.
- ``POST /v2/models/NAME[/versions/BUNDLE_ID]/infer``: JSON tensors, or binary tensors after a JSON
  header of ``Inference-Header-Content-Length`` bytes (the binary tensor data extension).
- ``GET /metrics``: Prometheus text.

Errors are ``{"error": "..."}`` with a 4xx/5xx status; 503 with ``Retry-After`` when the
inference queue is full.

Only the standard library and numpy: the client runs on boards and in CI jobs. It keeps one
keep-alive connection (not thread-safe: use one Client per thread).
"""

from __future__ import annotations

import http.client
import io
import json
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

NPY = "application/x-npy"

# Open Inference Protocol datatypes <-> numpy.
DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
             "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
_NP_TO_DATATYPE = {np.dtype(v): k for k, v in DATATYPES.items()}


def datatype_of(a: np.ndarray) -> str:
    try:
        return _NP_TO_DATATYPE[a.dtype]
    except KeyError:
        raise ValueError(f"dtype {a.dtype} has no Open Inference Protocol datatype here") from None


class ServiceError(Exception):
    """The service answered with an error status."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(f"HTTP {status}: {message}")


class Outputs(dict):
    """Output name -> array, in the model's output order.

    Integer indexing (``outputs[0]``) also works, for callers written against the older client
    whose ``infer`` returned a list.
    """

    def __getitem__(self, key):
        if isinstance(key, int) and key not in self:
            return list(self.values())[key]
        return super().__getitem__(key)


def encode(arrays: Sequence[np.ndarray]) -> bytes:
    """Concatenated .npy arrays: the body of the deprecated ``POST /v1/infer``."""
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


def encode_request(inputs: Mapping[str, np.ndarray], binary: bool = True, outputs: Sequence[str] | None = None,
                   binary_outputs: bool = True, request_id: str | None = None) -> tuple[bytes, int | None]:
    """An inference request body, and its JSON header's length when tensors are binary."""
    tensors, blobs = [], []
    for name, a in inputs.items():
        a = np.ascontiguousarray(a)
        t: dict[str, Any] = {"name": name, "shape": list(a.shape), "datatype": datatype_of(a)}
        if binary:
            raw = a.tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            t["data"] = a.reshape(-1).tolist()
        tensors.append(t)
    req: dict[str, Any] = {"inputs": tensors}
    if request_id is not None:
        req["id"] = request_id
    if outputs is not None:
        req["outputs"] = [{"name": n, "parameters": {"binary_data": binary_outputs}} for n in outputs]
    else:
        req["parameters"] = {"binary_data_output": binary_outputs}
    head = json.dumps(req, separators=(",", ":")).encode()
    if not binary:
        return head, None
    return head + b"".join(blobs), len(head)


def decode_response(body: bytes, header_length: int | None) -> tuple[dict[str, Any], Outputs]:
    """The response's JSON and its outputs as arrays."""
    head = json.loads(body[:header_length] if header_length is not None else body)
    rest = memoryview(body)[header_length:] if header_length is not None else memoryview(b"")
    out = Outputs()
    offset = 0
    for o in head.get("outputs", []):
        dtype = np.dtype(DATATYPES[o["datatype"]])
        shape = tuple(o["shape"])
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            out[o["name"]] = np.frombuffer(rest[offset:offset + size], dtype=dtype).reshape(shape).copy()
            offset += size
        else:
            out[o["name"]] = np.array(o["data"], dtype=dtype).reshape(shape)
    return head, out


class Client:
    """``Client(url).ready()``, ``.metadata()``, ``.infer(arrays or {name: array}) -> {name: array}``."""

    def __init__(self, url: str = "http://127.0.0.1:8470", timeout: float = 30.0, model: str | None = None):
        self.url = url.rstrip("/")
        u = urllib.parse.urlsplit(self.url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"expected http://HOST:PORT, got {url!r}")
        self._host, self._port = u.hostname, u.port or 80
        self.timeout = timeout
        self._model = model
        self._meta: dict[str, Any] | None = None
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                r = self._conn.getresponse()
                data = r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                # The service drops idle keep-alive connections; retry once on a new one.
                self.close()
                if attempt:
                    raise ConnectionError(f"{self.url}: {e}") from e
                continue
            except http.client.HTTPException as e:
                self.close()
                raise ConnectionError(f"{self.url}: not an HTTP answer ({e!r})") from e
            except Exception:
                self.close()
                raise
            if r.will_close:
                self.close()
            if r.status >= 400:
                try:
                    message = json.loads(data).get("error", "")
                except ValueError:
                    message = data.decode(errors="replace").strip()
                raise ServiceError(r.status, message)
            return r.status, r.headers, data
        raise AssertionError("unreachable")

    def _ok(self, path: str) -> bool:
        try:
            return self._request("GET", path)[0] == 200
        except (ServiceError, OSError):
            return False

    def live(self) -> bool:
        return self._ok("/v2/health/live")

    def ready(self) -> bool:
        """The service is up, the model is loaded and the bundle's selftest passed."""
        return self._ok("/v2/health/ready")

    healthy = ready  # the older client's name

    def server_metadata(self) -> dict[str, Any]:
        return json.loads(self._request("GET", "/v2")[2])

    @property
    def model(self) -> str:
        """The name of the model the service serves (asked once, from its repository index)."""
        if self._model is None:
            index = json.loads(self._request("POST", "/v2/repository/index", b"{}",
                                             {"Content-Type": "application/json"})[2])
            self._model = index[0]["name"]
        return self._model

    def metadata(self) -> dict[str, Any]:
        """The model's metadata: name, versions (``[bundle id]``), platform, inputs, outputs."""
        self._meta = json.loads(self._request("GET", "/v2/models/" + urllib.parse.quote(self.model, safe=""))[2])
        return self._meta

    def info(self) -> dict[str, Any]:
        """The bundle's own description (bundle_id, board, versions); the deprecated ``/v1/info``."""
        return json.loads(self._request("GET", "/v1/info")[2])

    def metrics(self) -> str:
        return self._request("GET", "/metrics")[2].decode()

    def infer(self, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
              binary: bool = True, request_id: str | None = None) -> Outputs:
        """Run the model once. ``inputs``: arrays in the model's input order, or by name.

        ``binary``: send and receive tensors with the binary tensor data extension (else JSON).
        Returns the outputs (all, or those named) by name, in order.
        """
        if not isinstance(inputs, Mapping):
            meta = self._meta or self.metadata()
            names = [i["name"] for i in meta["inputs"]]
            if len(inputs) != len(names):
                raise ValueError(f"the model takes {len(names)} input(s) ({', '.join(names)}), got {len(inputs)}")
            inputs = dict(zip(names, inputs))
        body, json_length = encode_request(inputs, binary=binary, outputs=outputs, binary_outputs=binary,
                                           request_id=request_id)
        headers = {"Content-Type": "application/octet-stream" if json_length is not None else "application/json"}
        if json_length is not None:
            headers["Inference-Header-Content-Length"] = str(json_length)
        path = f"/v2/models/{urllib.parse.quote(self.model, safe='')}/infer"
        _, h, data = self._request("POST", path, body, headers)
        hl = h.get("Inference-Header-Content-Length")
        return decode_response(data, int(hl) if hl is not None else None)[1]

    infer_named = infer  # the older client's name
