"""schemathesis over /openapi.json with a valid admin token: no 5xx, responses match."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator
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


_TMP = Path(tempfile.mkdtemp(prefix="ew-schemathesis-"))
# The schema comes from the app object, so collecting this module starts nothing.
_STORE = open_store(f"sqlite:///{_TMP / 'cp.db'}")
_APP = create_app(Settings(data_dir=_TMP / "data"), _STORE)
schema = schemathesis.openapi.from_dict(_APP.openapi())
CHECKS: list[Any] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[str, str]]:
    admin = _APP.state.plane.bootstrap_admin() or ""
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(_APP, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", admin
    srv.should_exit = True
    thread.join(timeout=10)


@schema.parametrize()
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_and_never_errors(case: Any, live: tuple[str, str]) -> None:
    base, admin = live
    case.call_and_validate(
        base_url=base, headers={"Authorization": f"Bearer {admin}"}, checks=CHECKS
    )
