"""schemathesis over /openapi.json with a valid admin token: no 5xx, responses match."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from edgewise.control import Settings, create_app, open_store  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(tmp: Path) -> tuple[str, str]:
    store = open_store(f"sqlite:///{tmp / 'cp.db'}")
    app = create_app(Settings(data_dir=tmp / "data"), store)
    admin = app.state.plane.bootstrap_admin()
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", str(admin)


_TMP = Path(__import__("tempfile").mkdtemp(prefix="ew-schemathesis-"))
BASE, ADMIN = _start(_TMP)
schema = schemathesis.openapi.from_url(f"{BASE}/openapi.json")
CHECKS: list[Any] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@schema.parametrize()
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_and_never_errors(case: Any) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN}"}, checks=CHECKS)
