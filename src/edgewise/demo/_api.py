"""The demo's operator client: `/api/v1` over httpx, errors as `DemoError`."""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["Api", "DemoError"]


class DemoError(Exception):
    """A step of the story could not be carried out (one line for the user)."""


class Api:
    """Bearer-token calls to one control plane."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(60.0),
        )

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        """Call the API; the decoded JSON body.

        Raises:
            DemoError: a transport failure or an error envelope.
        """
        try:
            r = await self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise DemoError(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if r.status_code >= 400:
            try:
                err = r.json().get("error", {})
            except ValueError:
                err = {}
            message = err.get("message") or r.text[:200]
            raise DemoError(f"{method} {path}: {r.status_code} {err.get('code', '')} {message}")
        return r.json() if r.content else None

    async def get(self, path: str, **params: Any) -> Any:
        """GET with query parameters."""
        query = {k: v for k, v in params.items() if v is not None}
        return await self.call("GET", path, params=query)

    async def post(self, path: str, body: Any = None) -> Any:
        """POST a JSON body."""
        return await self.call("POST", path, json=body)

    async def push_bundle(self, data: bytes) -> Any:
        """Upload a bundle to the registry."""
        return await self.call(
            "POST", "/api/v1/models", content=data,
            headers={"content-type": "application/octet-stream"},
        )  # fmt: skip

    async def close(self) -> None:
        """Close the connection pool."""
        await self.http.aclose()
