"""The device side of `/device/v1`: enroll, desired-state long-poll, report, telemetry, artifacts.

Two variants share one core: `DeviceClient` (blocking, what the agent uses) and
`AsyncDeviceClient` (asyncio, what the fleet simulator uses to run thousands of devices in
one process). Both take an httpx client, so callers choose the transport (a real socket,
an ASGI app in process, a fault-injecting transport). Per-device state is just the id,
the key and a clock.

Every request after enrollment is signed (`edgewise.protocol.sign_request`) over the
path and query exactly as httpx will send them.

Answers the agent keeps in memory are read as a stream and refused past a cap, never
read whole and then measured: a desired document past `MAX_DESIRED_BYTES` is a malformed
one (refused and reported like any other), a trust root chain past `MAX_CHAIN_BYTES`
(`edgewise.protocol`: 32 versions of a bounded size) is `ResponseTooLarge`.

Errors:
    RetryableError     transport failures, 408/429/5xx (with the server's Retry-After)
    DeviceAuthError    401: the control plane does not accept this device's signature
    UplinkError        any other refusal (4xx), with the server's error code
    ResponseTooLarge   an answer longer than the most it may be
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from edgewise.agent._backoff import RetryableError
from edgewise.protocol import (
    MAX_CHAIN_BYTES,
    Report,
    SignedDesiredState,
    TelemetryAck,
    TelemetryBatch,
    encode_batch,
    first_problem,
    sign_request,
)

__all__ = [
    "MAX_DESIRED_BYTES",
    "AsyncDeviceClient",
    "DesiredPoll",
    "DeviceAuthError",
    "DeviceClient",
    "DeviceKey",
    "ResponseTooLarge",
    "UplinkError",
]

_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# A desired document holds one pipeline per name, each with a spec the control plane took
# in one request (at most its 1 MiB request body), and the newest trust root (at most
# `MAX_SIGNED_BYTES`): real ones are a few KB. 8 MiB is eight pipelines at that limit,
# and well inside what a small device can parse.
MAX_DESIRED_BYTES = 8 * 1024 * 1024
_MAX_ERROR_BYTES = 64 * 1024  # of a refusal's body: its code and message are enough


class UplinkError(Exception):
    """The control plane refused a request; `code` is its error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


class DeviceAuthError(UplinkError):
    """401: unsigned, bad signature, stale timestamp, unknown or decommissioned device."""


class ResponseTooLarge(UplinkError):
    """An answer longer than the most its kind may be: not read past that."""

    def __init__(self, status: int, what: str, cap: int) -> None:
        self.detail = f"{what} is larger than {cap} bytes"
        super().__init__(status, "too_large", self.detail)
        self.cap = cap


def _declared_over(resp: httpx.Response, cap: int) -> bool:
    length = resp.headers.get("content-length", "")
    return length.isascii() and length.isdigit() and int(length) > cap


def _append_capped(
    body: bytearray, chunk: bytes, cap: int, resp: httpx.Response, what: str
) -> None:
    body += chunk
    if len(body) > cap:
        raise ResponseTooLarge(resp.status_code, what, cap)


def _read_capped(resp: httpx.Response, cap: int, what: str) -> bytes:
    """The (decoded) body of a streamed response; past `cap` bytes, `ResponseTooLarge`."""
    if _declared_over(resp, cap):
        raise ResponseTooLarge(resp.status_code, what, cap)
    body = bytearray()
    for chunk in resp.iter_bytes():
        _append_capped(body, chunk, cap, resp, what)
    return bytes(body)


async def _aread_capped(resp: httpx.Response, cap: int, what: str) -> bytes:
    """`_read_capped` of an asyncio response."""
    if _declared_over(resp, cap):
        raise ResponseTooLarge(resp.status_code, what, cap)
    body = bytearray()
    async for chunk in resp.aiter_bytes():
        _append_capped(body, chunk, cap, resp, what)
    return bytes(body)


@dataclass(frozen=True)
class DeviceKey:
    """Who signs: the device id assigned at enrollment and the device's private key."""

    device_id: str
    private_key: Ed25519PrivateKey


@dataclass(frozen=True)
class DesiredPoll:
    """One long-poll answer: a new document, or `None`.

    `None` when unchanged (304), or when the answer could not be read as a signed
    document (`malformed` says why).
    """

    signed: SignedDesiredState | None
    etag: str | None
    malformed: str = ""


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _error_of(body: bytes) -> tuple[str, str]:
    try:
        err = json.loads(body).get("error", {})
        return str(err.get("code", "error")), str(err.get("message", ""))
    except (ValueError, AttributeError, RecursionError):
        return "error", body[:200].decode("utf-8", "replace")


def _refusal(resp: httpx.Response, body: bytes) -> Exception:
    if resp.status_code in _RETRYABLE_STATUS:
        return RetryableError(f"control plane busy: HTTP {resp.status_code}", _retry_after(resp))
    code, message = _error_of(body)
    if resp.status_code == 401:
        return DeviceAuthError(resp.status_code, code, message)
    return UplinkError(resp.status_code, code, message)


def check(resp: httpx.Response) -> httpx.Response:
    """Raise the right error for a non-success response; return it otherwise."""
    if resp.status_code < 400:
        return resp
    raise _refusal(resp, resp.content)


def _capped_body(resp: httpx.Response, cap: int, what: str) -> bytes:
    """A streamed response's body (at most `cap` bytes), or its refusal raised."""
    if resp.status_code < 400:
        return _read_capped(resp, cap, what)
    try:
        body = _read_capped(resp, _MAX_ERROR_BYTES, "an error")
    except ResponseTooLarge:
        body = b""
    raise _refusal(resp, body)


async def _acapped_body(resp: httpx.Response, cap: int, what: str) -> bytes:
    """`_capped_body` of an asyncio response."""
    if resp.status_code < 400:
        return await _aread_capped(resp, cap, what)
    try:
        body = await _aread_capped(resp, _MAX_ERROR_BYTES, "an error")
    except ResponseTooLarge:
        body = b""
    raise _refusal(resp, body)


class _Core:
    """Request building shared by both variants (no I/O)."""

    def __init__(self, key: DeviceKey | None, clock: Callable[[], float]) -> None:
        self.key = key
        self.clock = clock

    def sign(self, request: httpx.Request) -> httpx.Request:
        if self.key is None:
            raise UplinkError(0, "not_enrolled", "this device has no identity yet")
        path_qs = request.url.raw_path.decode("ascii")
        request.headers.update(
            sign_request(
                self.key.private_key,
                self.key.device_id,
                request.method,
                path_qs,
                request.content,
                self.clock(),
            )
        )
        return request

    def sign_headers(self, method: str, path_qs: str) -> dict[str, str]:
        if self.key is None:
            raise UplinkError(0, "not_enrolled", "this device has no identity yet")
        return sign_request(
            self.key.private_key, self.key.device_id, method, path_qs, b"", self.clock()
        )

    @staticmethod
    def desired_params(etag: str | None, wait_s: float) -> tuple[dict[str, str], dict[str, str]]:
        params = {"wait": str(int(wait_s))} if wait_s > 0 else {}
        headers = {"If-None-Match": etag} if etag else {}
        return params, headers

    @staticmethod
    def parse_desired(body: bytes | ResponseTooLarge, etag_now: str | None) -> DesiredPoll:
        """A 200 answer's body (or why it was not read whole) as a poll result."""
        if isinstance(body, ResponseTooLarge):
            return DesiredPoll(None, etag_now, body.detail)
        try:
            return DesiredPoll(SignedDesiredState.model_validate(json.loads(body)), etag_now)
        except ValidationError as exc:
            return DesiredPoll(None, etag_now, first_problem(exc))
        except RecursionError:
            return DesiredPoll(None, etag_now, "not JSON: nested too deeply")
        except ValueError as exc:  # not JSON
            return DesiredPoll(None, etag_now, f"not JSON: {exc}")


def _transport_errors(exc: Exception) -> RetryableError:
    return RetryableError(f"control plane unreachable: {type(exc).__name__}: {exc}")


class DeviceClient:
    """Blocking device client over an `httpx.Client` (base URL = the control plane)."""

    def __init__(
        self,
        http: httpx.Client,
        key: DeviceKey | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.http = http
        self._core = _Core(key, clock)

    @property
    def key(self) -> DeviceKey | None:
        """The signing identity (None before enrollment)."""
        return self._core.key

    @key.setter
    def key(self, key: DeviceKey | None) -> None:
        self._core.key = key

    def _send(
        self,
        request: httpx.Request,
        signed: bool = True,
        timeout: float | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        if signed:
            self._core.sign(request)
        if timeout is not None:
            request.extensions["timeout"] = httpx.Timeout(timeout).as_dict()
        try:
            return self.http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise _transport_errors(exc) from exc

    def enroll(
        self, token: str, public_key_b64: str, labels: dict[str, str], capabilities: dict[str, Any]
    ) -> dict[str, Any]:
        """`POST /device/v1/enroll` (unsigned); returns the enrollment answer."""
        body = {
            "token": token,
            "public_key": public_key_b64,
            "labels": labels,
            "capabilities": capabilities,
        }
        req = self.http.build_request("POST", "/device/v1/enroll", json=body)
        result: dict[str, Any] = check(self._send(req, signed=False)).json()
        return result

    def desired(self, etag: str | None = None, wait_s: float = 0.0) -> DesiredPoll:
        """`GET /device/v1/desired`, long-polling up to `wait_s` when `etag` is current."""
        params, headers = _Core.desired_params(etag, wait_s)
        req = self.http.build_request("GET", "/device/v1/desired", params=params, headers=headers)
        resp = self._send(req, timeout=wait_s + 15.0, stream=True)
        try:
            if resp.status_code == 304:
                return DesiredPoll(None, etag)
            try:
                body: bytes | ResponseTooLarge = _capped_body(
                    resp, MAX_DESIRED_BYTES, "the desired document"
                )
            except ResponseTooLarge as exc:
                body = exc
            return _Core.parse_desired(body, resp.headers.get("etag"))
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise _transport_errors(exc) from exc
        finally:
            resp.close()

    def report(self, report: Report) -> None:
        """`POST /device/v1/report`."""
        req = self.http.build_request(
            "POST",
            "/device/v1/report",
            content=report.model_dump_json().encode(),
            headers={"Content-Type": "application/json"},
        )
        check(self._send(req))

    def trust_roots(self) -> list[Any]:
        """`GET /device/v1/trust-root`: the fleet's signed trust root chain (unchecked).

        Raises:
            ResponseTooLarge: past `MAX_CHAIN_BYTES` (what `MAX_CHAIN` versions can take).
            UplinkError: not JSON, or a refusal.
        """
        req = self.http.build_request("GET", "/device/v1/trust-root")
        resp = self._send(req, stream=True)
        try:
            body = _capped_body(resp, MAX_CHAIN_BYTES, "the trust root chain")
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise _transport_errors(exc) from exc
        finally:
            resp.close()
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            raise UplinkError(
                resp.status_code, "bad_answer", "trust root chain: not JSON"
            ) from None
        chain = answer.get("chain") if isinstance(answer, dict) else None
        return chain if isinstance(chain, list) else []

    def telemetry(self, batch: TelemetryBatch) -> TelemetryAck:
        """`POST /device/v1/telemetry` with a gzip body."""
        req = self.http.build_request(
            "POST",
            "/device/v1/telemetry",
            content=encode_batch(batch),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
        return TelemetryAck.model_validate(check(self._send(req)).json())

    @contextmanager
    def open(self, url: str, start: int) -> Iterator[httpx.Response]:
        """An `ArtifactSource`: a signed, streamed (ranged) GET of an artifact URL."""
        headers = {"Range": f"bytes={start}-"} if start > 0 else {}
        req = self.http.build_request("GET", url, headers=headers)
        self._core.sign(req)
        try:
            resp = self.http.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise _transport_errors(exc) from exc
        try:
            if resp.status_code in (401, 403):
                resp.read()
                check(resp)
            yield resp
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise _transport_errors(exc) from exc
        finally:
            resp.close()


class AsyncDeviceClient:
    """The asyncio twin of `DeviceClient` over an `httpx.AsyncClient`."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        key: DeviceKey | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.http = http
        self._core = _Core(key, clock)

    @property
    def key(self) -> DeviceKey | None:
        """The signing identity (None before enrollment)."""
        return self._core.key

    @key.setter
    def key(self, key: DeviceKey | None) -> None:
        self._core.key = key

    async def _send(
        self,
        request: httpx.Request,
        signed: bool = True,
        timeout: float | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        if signed:
            self._core.sign(request)
        if timeout is not None:
            request.extensions["timeout"] = httpx.Timeout(timeout).as_dict()
        try:
            return await self.http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise _transport_errors(exc) from exc

    async def enroll(
        self, token: str, public_key_b64: str, labels: dict[str, str], capabilities: dict[str, Any]
    ) -> dict[str, Any]:
        """`POST /device/v1/enroll` (unsigned); returns the enrollment answer."""
        body = {
            "token": token,
            "public_key": public_key_b64,
            "labels": labels,
            "capabilities": capabilities,
        }
        req = self.http.build_request("POST", "/device/v1/enroll", json=body)
        result: dict[str, Any] = check(await self._send(req, signed=False)).json()
        return result

    async def desired(self, etag: str | None = None, wait_s: float = 0.0) -> DesiredPoll:
        """`GET /device/v1/desired`, long-polling up to `wait_s` when `etag` is current."""
        params, headers = _Core.desired_params(etag, wait_s)
        req = self.http.build_request("GET", "/device/v1/desired", params=params, headers=headers)
        resp = await self._send(req, timeout=wait_s + 15.0, stream=True)
        try:
            if resp.status_code == 304:
                return DesiredPoll(None, etag)
            try:
                body: bytes | ResponseTooLarge = await _acapped_body(
                    resp, MAX_DESIRED_BYTES, "the desired document"
                )
            except ResponseTooLarge as exc:
                body = exc
            return _Core.parse_desired(body, resp.headers.get("etag"))
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise _transport_errors(exc) from exc
        finally:
            await resp.aclose()

    async def report(self, report: Report) -> None:
        """`POST /device/v1/report`."""
        req = self.http.build_request(
            "POST",
            "/device/v1/report",
            content=report.model_dump_json().encode(),
            headers={"Content-Type": "application/json"},
        )
        check(await self._send(req))

    async def telemetry(self, batch: TelemetryBatch) -> TelemetryAck:
        """`POST /device/v1/telemetry` with a gzip body."""
        req = self.http.build_request(
            "POST",
            "/device/v1/telemetry",
            content=encode_batch(batch),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
        return TelemetryAck.model_validate(check(await self._send(req)).json())

    @asynccontextmanager
    async def open(self, url: str, start: int) -> AsyncIterator[httpx.Response]:
        """A signed, streamed (ranged) GET of an artifact URL."""
        headers = {"Range": f"bytes={start}-"} if start > 0 else {}
        req = self.http.build_request("GET", url, headers=headers)
        self._core.sign(req)
        try:
            resp = await self.http.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise _transport_errors(exc) from exc
        try:
            yield resp
        finally:
            await resp.aclose()
