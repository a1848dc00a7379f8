"""The local inference API for apps on the device.

Routes:
    POST /v1/pipelines/{name}/infer   JSON (`{"inputs": [...]}` or a bare array; a model
                                      with several inputs takes them by name, `{"inputs":
                                      {"ids": [...], "mask": [...]}}`) or raw tensor bytes
                                      (`Content-Type: application/octet-stream` with
                                      `X-Tensor-Dtype` and `X-Tensor-Shape: 1,64`; inputs
                                      by name with `X-Tensor-Names: ids,mask`, a dtype
                                      and a shape each: `int64,int64`, `1,8;1,8`)
    GET  /v1/pipelines                the running pipelines
    GET  /v1/pipelines/{name}/stats   one pipeline's metrics

`InferenceAPI` holds the routes as a plain handler: the agent serves it with
`HttpServer` (`_server.py`) next to its own `/healthz` and `/status`, and
`make_inference_app` wraps it as an ASGI app for any other server. No web framework:
it sits on every request's path and the runtime's budget is a few percent over
`session.run`. Errors are JSON `{"error": {"code", "message"}}` with a 4xx for
anything the client sent.

JSON goes through orjson on the infer route: decoding and encoding with the standard
library cost more than the model itself for small models (about 15 and 12 us against
10 us for the digits MLP); orjson writes the output arrays straight from numpy.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np
import orjson

from edgewise._httpd import Answer, Deferred, Headers, error_answer
from edgewise.runtime._aio import LoopBatcher, Pending
from edgewise.runtime._backend import INPUT_DTYPES
from edgewise.runtime._decode import decode_json
from edgewise.runtime._errors import BadInput, PayloadTooLarge, RuntimeFailure
from edgewise.runtime._pipeline import InferenceResult
from edgewise.runtime._runtime import Runtime

__all__ = ["InferenceAPI", "make_inference_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_PREFIX = "/v1/pipelines"
_JSON_HEADERS = [(b"content-type", b"application/json")]
_RETRY = ((b"retry-after", b"1"),)
_DTYPES = {d.name for d in INPUT_DTYPES}  # every dtype a model input can have
MAX_DIMS = 32  # a raw tensor's dimensions (numpy holds at most 64; models use a handful)


_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def _plain(obj: Any) -> Any:
    """Fallback for orjson: arrays it cannot write directly (not C-contiguous, float16...)."""
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


async def _read_body(headers: dict[bytes, bytes], receive: Receive, limit: int) -> bytes:
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {int(declared)} bytes is over the {limit} byte limit")
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise BadInput("client disconnected")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body over the {limit} byte limit")
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def decode_raw(
    headers: dict[bytes, bytes], body: bytes
) -> np.ndarray[Any, Any] | dict[str, np.ndarray[Any, Any]]:
    """Decode raw tensor bytes described by X-Tensor-Dtype and X-Tensor-Shape.

    Several tensors (a model's inputs by name) are named by X-Tensor-Names (`ids,mask`),
    with a dtype each (`int64,int64`) and a shape each (`1,128;1,128`), their bytes back
    to back in that order.
    """
    dtype_s = headers.get(b"x-tensor-dtype", b"").decode("latin-1").strip()
    shape_s = headers.get(b"x-tensor-shape", b"").decode("latin-1").strip()
    names_s = headers.get(b"x-tensor-names")
    if names_s is None:
        dt, shape = _tensor_header(dtype_s, shape_s)
        _check_size(len(body), _nbytes(dt, shape))
        return np.frombuffer(body, dtype=dt).reshape(shape)
    names = [n.strip() for n in names_s.decode("latin-1").split(",")]
    dtypes, shapes = dtype_s.split(","), shape_s.split(";")
    if len(dtypes) != len(names) or len(shapes) != len(names):
        raise BadInput(
            f"X-Tensor-Names names {len(names)} tensors; X-Tensor-Dtype gives {len(dtypes)} "
            f"dtypes and X-Tensor-Shape {len(shapes)} shapes (separated by ';')"
        )
    if len(set(names)) != len(names) or not all(names):
        raise BadInput("X-Tensor-Names must name each tensor once")
    parts = [_tensor_header(d.strip(), s.strip()) for d, s in zip(dtypes, shapes, strict=True)]
    sizes = [_nbytes(dt, shape) for dt, shape in parts]
    _check_size(len(body), sum(sizes))
    out, offset = {}, 0
    for name, (dt, shape), size in zip(names, parts, sizes, strict=True):
        flat = np.frombuffer(body, dtype=dt, count=size // dt.itemsize, offset=offset)
        out[name] = flat.reshape(shape)
        offset += size
    return out


def _tensor_header(dtype: str, shape_s: str) -> tuple[np.dtype[Any], tuple[int, ...]]:
    if dtype not in _DTYPES:
        raise BadInput(f"X-Tensor-Dtype must be one of {', '.join(sorted(_DTYPES))}")
    dims = [d.strip() for d in shape_s.split(",")]
    # ASCII digits only: int() also reads "1_0" as 10 and other scripts' digits.
    if not all(d.isascii() and d.isdigit() and len(d) <= 18 for d in dims):
        raise BadInput("X-Tensor-Shape must be comma-separated integers, e.g. 1,64")
    shape = tuple(int(d) for d in dims)
    if any(d <= 0 for d in shape):
        raise BadInput("X-Tensor-Shape dimensions must be positive")
    if len(shape) > MAX_DIMS:
        raise BadInput(f"X-Tensor-Shape has {len(shape)} dimensions; at most {MAX_DIMS}")
    return np.dtype(dtype), shape


def _nbytes(dt: np.dtype[Any], shape: tuple[int, ...]) -> int:
    # Python integers: numpy's product wraps around (2**32 x 2**32 rows would need 0 bytes).
    return math.prod(shape) * dt.itemsize


def max_queue_s(header: bytes) -> float:
    """`X-Max-Queue-Ms` in seconds: how long this request may wait in the queue.

    Raises:
        BadInput: not a number of milliseconds in (0, 600000].
    """
    try:
        ms = float(header)
    except ValueError:
        ms = math.nan
    if not 0 < ms <= 600_000:  # NaN fails too
        raise BadInput("X-Max-Queue-Ms must be a number of milliseconds, > 0 and <= 600000")
    return ms / 1000.0


def _check_size(got: int, expected: int) -> None:
    if expected != got:
        raise BadInput(f"body has {got} bytes, dtype and shape need {expected}")


class InferenceAPI:
    """The routes as a `Handler` for `HttpServer` (the agent serves them so), and as ASGI.

    `api(method, path, headers, body)` answers at once, or with a `Deferred` when the
    request waits for a batch. Failures the client caused are 4xx answers, never raised.
    """

    def __init__(self, runtime: Runtime, alone: Callable[[], bool] | None = None) -> None:
        """The API over `runtime`.

        Args:
            runtime: the runtime whose pipelines it serves.
            alone: whether the server has a single connection now (`HttpServer.alone`):
                then no other request can join this one's loop turn, and it runs at
                once without marking the turn for a batch.
        """
        self.runtime = runtime
        self.alone = alone
        self._batcher = LoopBatcher(runtime)

    def __call__(self, method: str, path: str, headers: Headers, body: bytes) -> Answer | Deferred:
        try:
            # The infer route is every request's path: matched before anything else.
            if method == "POST" and path.endswith("/infer") and path.startswith(_PREFIX + "/"):
                name = path[len(_PREFIX) + 1 : -len("/infer")]
                if name and "/" not in name:
                    return self.infer(name, headers, body)
            return self._other(method, path)
        except RuntimeFailure as exc:
            return _failure(exc)

    def infer(self, name: str, headers: Headers, body: bytes) -> Answer | Deferred:
        """POST /v1/pipelines/{name}/infer.

        Raises:
            RuntimeFailure: bad input, an unknown pipeline, a refusal at admission.
        """
        ctype = headers.get(b"content-type", b"application/json")
        raw = ctype.lower().startswith(b"application/octet-stream")  # (case-insensitive)
        try:
            x = decode_raw(headers, body) if raw else decode_json(body)
            wait = headers.get(b"x-max-queue-ms")
            bound = None if wait is None else max_queue_s(wait)
        except BadInput:  # a request this pipeline could not read: its bad input too
            self.runtime.count_bad_input(name)
            raise
        # The first request of a loop turn runs at once (no wait when one client is
        # alone); the requests that other connections delivered in the same turn form
        # one batch.
        alone = self.alone
        got = self._batcher.begin(
            name,
            x,
            raw,
            True,
            alone is not None and alone(),
            bound,
        )
        if isinstance(got, Pending):
            return Deferred(got.fut, lambda: _finish(got))
        return 200, _encode(got), ()

    def _other(self, method: str, path: str) -> Answer:
        if path == _PREFIX or path == _PREFIX + "/":
            if method != "GET":
                return error_answer(405, "method_not_allowed", "use GET")
            return 200, json.dumps({"pipelines": self.runtime.pipelines()}).encode(), ()
        if path.startswith(_PREFIX + "/"):
            parts = path[len(_PREFIX) + 1 :].split("/")
            if len(parts) == 2 and parts[1] == "infer":
                if method != "POST":
                    return error_answer(405, "method_not_allowed", "use POST")
                return error_answer(404, "unknown_pipeline", "no pipeline named ''")
            if len(parts) == 2 and parts[1] == "stats":
                stats = self.runtime.stats(parts[0])
                return 200, json.dumps(stats, default=str).encode(), ()
        return error_answer(404, "not_found", f"no route {method} {path}")


def _encode(result: InferenceResult) -> bytes:
    return orjson.dumps(result.to_json(arrays=True), default=_plain, option=_NUMPY)


def _failure(exc: RuntimeFailure) -> Answer:
    status, body, _ = error_answer(exc.status, exc.code, str(exc))
    return status, body, _RETRY if exc.status == 429 else ()


def _finish(pending: Pending) -> Answer:
    try:
        return 200, _encode(pending.outcome()), ()
    except RuntimeFailure as exc:
        return _failure(exc)


def make_inference_app(runtime: Runtime, max_body_bytes: int = 8 * 1024 * 1024) -> ASGIApp:
    """The local inference API over `runtime`, as an ASGI application.

    For mounting in an ASGI server; the agent serves the same routes with `HttpServer`,
    which has no per-request ASGI layer.
    """
    api = InferenceAPI(runtime)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if not path.startswith(_PREFIX):  # mounted under a prefix that was stripped
            path = scope.get("root_path", "") + path
        headers = dict(scope.get("headers", ()))
        answer: Answer | Deferred
        try:
            body = await _read_body(headers, receive, max_body_bytes)
            answer = api(scope["method"], path, headers, body)
            if isinstance(answer, Deferred):
                with contextlib.suppress(Exception):  # finish() answers the failure
                    await answer.fut
                answer = answer.finish()
        except RuntimeFailure as exc:
            answer = _failure(exc)
        except Exception as exc:  # never a traceback to the client
            answer = error_answer(500, "internal", f"{type(exc).__name__}: {exc}")
        status, out, extra = answer
        start = [*_JSON_HEADERS, *extra, (b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": start})
        await send({"type": "http.response.body", "body": out})

    return app
