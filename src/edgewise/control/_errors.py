"""The error envelope as OpenAPI sees it, so clients and schema checks know every status."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["DEVICE_ERRORS", "OPERATOR_ERRORS", "ErrorBody", "ErrorEnvelope"]


class ErrorBody(BaseModel):
    """What went wrong: a stable code and a human message."""

    code: str
    message: str


class ErrorEnvelope(BaseModel):
    """Every error response: `{"error": {"code", "message"}}`."""

    error: ErrorBody


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorEnvelope, "description": "error"} for s in statuses}


OPERATOR_ERRORS = _errors(400, 401, 403, 404, 409, 413, 415, 422, 503)
DEVICE_ERRORS = _errors(400, 401, 404, 409, 413, 415, 416, 422, 503)
