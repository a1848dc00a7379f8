"""The control plane end to end over real HTTP: signed gzip telemetry, exactly-once,
egress on what is stored, fleet/drift/alerts APIs, webhooks, /metrics under promtool."""

from __future__ import annotations

import base64
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from edgewise.agent import TelemetryBuffer
from edgewise.agent.telemetry import WindowAggregator
from edgewise.control import Settings, create_app, open_store
from edgewise.control import _schema as cs
from edgewise.protocol import (
    EgressPolicy,
    TelemetryBatch,
    TelemetryRecord,
    encode_batch,
    sign_request,
)

from .conftest import FakeClock
from .test_telemetry_service import Hooks


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, base: str, admin: str, app: Any, store: Any) -> None:
        self.base, self.admin, self.app, self.store = base, admin, app, store
        self.http = httpx.Client(base_url=base, timeout=10)

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.http.request(
            method, path, headers={"authorization": f"Bearer {self.admin}"}, **kw
        )

    def enroll(self, labels: dict[str, str]) -> tuple[str, Ed25519PrivateKey]:
        tok = self.api("POST", "/api/v1/enroll-tokens", json={"labels": {}}).json()["token"]
        key = Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        r = self.http.post(
            "/device/v1/enroll",
            json={
                "token": tok,
                "public_key": base64.b64encode(raw).decode(),
                "labels": labels,
                "capabilities": {},
            },
        )
        assert r.status_code == 201, r.text
        return r.json()["device_id"], key

    def upload(self, device: str, key: Ed25519PrivateKey, batch: TelemetryBatch) -> httpx.Response:
        body = encode_batch(batch)
        path = "/device/v1/telemetry"
        headers = sign_request(key, device, "POST", path, body, time.time())
        headers.update({"content-type": "application/json", "content-encoding": "gzip"})
        return self.http.post(path, content=body, headers=headers)


@pytest.fixture(params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    import uvicorn

    url = (
        f"sqlite:///{tmp_path / 'cp.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    store = open_store(url)
    app = create_app(Settings(data_dir=tmp_path / "data"), store)
    assert hasattr(app.state, "telemetry"), "create_app installs telemetry"
    admin = app.state.plane.bootstrap_admin()
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    s = Server(f"http://127.0.0.1:{port}", admin, app, store)
    try:
        yield s
    finally:
        s.http.close()
        srv.should_exit = True
        thread.join(timeout=10)
        store.close()


def _events(seqs: range) -> TelemetryBatch:
    return TelemetryBatch(
        records=[TelemetryRecord(seq=s, cls="event", ts=time.time(), kind="e") for s in seqs]
    )


def _stored(server: Server, device: str) -> list[Any]:
    tel = cs.telemetry
    with server.store.engine.connect() as c:
        return list(
            c.execute(
                select(tel.c.seq, tel.c.cls, tel.c.data)
                .where(tel.c.device_id == device)
                .order_by(tel.c.seq)
            )
        )


def test_http_ingest_is_exactly_once_under_duplicates_and_reordering(server: Server) -> None:
    device, key = server.enroll({"site": "a"})
    answers = [
        server.upload(device, key, _events(r)).json()
        for r in (range(1, 6), range(11, 16), range(1, 6), range(6, 11), range(11, 16))
    ]
    assert [(a["accepted"], a["duplicates"], a["acked_seq"]) for a in answers] == [
        (5, 0, 5),
        (5, 0, 5),
        (0, 5, 5),
        (5, 0, 15),
        (0, 5, 15),
    ]
    assert [r.seq for r in _stored(server, device)] == list(range(1, 16))


def test_http_ingest_refuses_bad_bodies_and_bad_signatures(server: Server) -> None:
    device, key = server.enroll({})
    path = "/device/v1/telemetry"
    bad = b"not gzip at all"
    h = sign_request(key, device, "POST", path, bad, time.time())
    r = server.http.post(path, content=bad, headers={**h, "content-encoding": "gzip"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    body = encode_batch(_events(range(1, 3)))
    h = sign_request(key, device, "POST", path, b"other", time.time())
    r = server.http.post(path, content=body, headers={**h, "content-encoding": "gzip"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "bad_signature"


def test_egress_capture_off_and_redaction_hold_on_what_the_control_plane_stores(
    server: Server, tmp_path: Path
) -> None:
    device, key = server.enroll({})
    clock = FakeClock(time.time())
    off = WindowAggregator(
        "cam", model="m", version="1", clock=clock, policy=EgressPolicy(redact=["serial_number"])
    )
    on = WindowAggregator(
        "cam2",
        model="m",
        version="1",
        clock=clock,
        capture_seed=1,
        policy=EgressPolicy(
            groups=["counts", "samples"], redact=["face"], capture={"enabled": True, "rate": 1.0}
        ),
    )  # type: ignore[arg-type]
    buffer = TelemetryBuffer(tmp_path / "t.db")
    rows = [{"face": [1.0, 2.0], "plate": "AB-1"} for _ in range(5)]
    for agg in (off, on):
        agg.observe(np.zeros((5, 4)), [0.9] * 5, [0] * 5, fields=rows)
        clock.advance(10)
        buffer.append(agg.close(resources={"serial_number": "SN-SECRET", "cpu_percent": 1.0}))
    assert server.upload(device, key, buffer.peek()).status_code == 200
    buffer.close()
    stored = _stored(server, device)
    text = repr([r.data for r in stored])
    assert "SN-SECRET" not in text and "serial_number" not in text and "'face'" not in text
    samples = [r for r in stored if r.cls == "sample"]
    assert len(samples) == 5 and all(r.data["input"] == {"plate": "AB-1"} for r in samples)
    assert all(r.data["pipeline"] == "cam2" for r in samples)  # none from the capture-off pipeline


def _window(seq: int, end: float, failed: int, device_ok: int = 200) -> TelemetryRecord:
    return TelemetryRecord(
        seq=seq,
        cls="metric",
        ts=end,
        kind="window",
        data={
            "pipeline": "p",
            "model": "digits-mlp",
            "version": "1.0.0",
            "start": end - 60,
            "end": end,
            "counts": {"ok": device_ok - failed, "failed": failed},
            "latency": {
                "bounds": [1.0, 5.0],
                "stages": {"total": {"counts": [100, 100, 0], "sum": 0}},
            },
            "drift": {"score": 0.3, "samples": 150, "sufficient": True},
        },
    )


def test_fleet_drift_alerts_apis_and_webhook(server: Server) -> None:
    hooks = Hooks()
    try:
        devices = [server.enroll({"site": s}) for s in ("a", "b")]
        now = time.time()
        for dev, key in devices:
            recs = [_window(i + 1, now - (30 - i) * 60, failed=6) for i in range(30)]  # 3 % errors
            assert server.upload(dev, key, TelemetryBatch(records=recs)).status_code == 200
        health = server.api("GET", "/api/v1/fleet/health", params={"by": "label:site"}).json()
        assert [(r["group"], r["devices_reporting"]) for r in health] == [
            ("site=a", 1),
            ("site=b", 1),
        ]
        assert health[0]["success_rate"] == pytest.approx(0.97)
        drift = server.api("GET", "/api/v1/drift").json()
        assert drift[0]["group"] == "digits-mlp@1.0.0" and drift[0]["drift_score"] == pytest.approx(
            0.3
        )
        assert server.api("GET", "/api/v1/fleet/health", params={"by": "bogus"}).status_code == 400
        r = server.api(
            "PUT",
            "/api/v1/alert-rules/slo",
            json={"kind": "burn_rate", "target": 0.99, "burn_rate": 2.0, "webhook": hooks.url},
        )
        assert r.status_code == 200, r.text
        assert (
            server.api(
                "PUT", "/api/v1/alert-rules/x", json={"kind": "drift", "windows": 0}
            ).status_code
            == 422
        )
        changes = server.api("POST", "/api/v1/alerts/evaluate").json()
        assert [(c["rule"], c["new"]) for c in changes] == [("slo", "firing")]
        assert hooks.calls and hooks.calls[0]["alert"]["scope"] == "digits-mlp@1.0.0"
        listed = server.api("GET", "/api/v1/alerts", params={"state": "open"}).json()
        assert len(listed) == 1 and listed[0]["state"] == "firing"
        assert server.api("GET", "/api/v1/alerts", params={"state": "weird"}).status_code == 400
        viewer = server.api("POST", "/api/v1/tokens", json={"name": "v", "role": "viewer"}).json()[
            "token"
        ]
        r = server.http.put(
            "/api/v1/alert-rules/y",
            json={"kind": "freshness"},
            headers={"authorization": f"Bearer {viewer}"},
        )
        assert r.status_code == 403
    finally:
        hooks.close()


def test_a_rule_body_nested_past_the_parser_is_a_400_like_on_every_other_route(
    server: Server,
) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    headers = {"authorization": f"Bearer {server.admin}", "content-type": "application/json"}
    r = server.http.put("/api/v1/alert-rules/x", content=deep, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json", r.text
    assert server.http.post("/api/v1/rollouts", content=deep, headers=headers).status_code == 400


@pytest.mark.parametrize("group_by", ["garbage", "label:"])
def test_a_rule_with_an_unknown_grouping_is_refused_and_evaluation_carries_on(
    server: Server, group_by: str
) -> None:
    r = server.api(
        "PUT", "/api/v1/alert-rules/bad", json={"kind": "burn_rate", "group_by": group_by}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
    assert "cannot group by" in r.json()["error"]["message"]
    assert server.api("GET", "/api/v1/alert-rules").json() == []
    assert server.api("POST", "/api/v1/alerts/evaluate").status_code == 200


def test_metrics_has_fleet_gauges_and_passes_promtool(
    server: Server, require_binary: Callable[[str, str], str]
) -> None:
    device, key = server.enroll({})
    server.upload(device, key, TelemetryBatch(records=[_window(1, time.time(), failed=2)]))
    text = server.http.get("/metrics").text
    assert "edgewise_fleet_success_ratio" in text
    assert 'edgewise_fleet_requests{model="digits-mlp@1.0.0"} 200.0' in text
    promtool = require_binary("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def _cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    import os
    import sys

    exe = str(Path(sys.executable).parent / "edgewise")
    env = {**os.environ, "EDGEWISE_SERVER": server.base, "EDGEWISE_TOKEN": server.admin}
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.slow  # eight real `edgewise` processes
@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
def test_cli_fleet_health_drift_show_and_alerts(server: Server) -> None:
    import json

    device, key = server.enroll({"site": "lab"})
    now = time.time()
    recs = [_window(i + 1, now - (10 - i) * 60, failed=20) for i in range(10)]  # 10 % errors
    assert server.upload(device, key, TelemetryBatch(records=recs)).status_code == 200
    health = json.loads(_cli(server, "fleet", "health", "--by", "label:site", "--json").stdout)
    assert health[0]["group"] == "site=lab" and health[0]["success_rate"] == pytest.approx(0.9)
    table = _cli(server, "fleet", "health")
    assert table.returncode == 0 and "digits-mlp@1.0.0" in table.stdout and "90.00%" in table.stdout
    drift = _cli(server, "drift", "show", "--model", "digits-mlp")
    assert drift.returncode == 0 and "0.30" in drift.stdout
    rule = _cli(
        server,
        "alerts",
        "set-rule",
        "slo",
        "--kind",
        "burn_rate",
        "--set",
        "burn_rate=2",
        "--set",
        "min_requests=10",
    )
    assert rule.returncode == 0, rule.stderr
    evaluated = _cli(server, "alerts", "evaluate")
    assert "slo digits-mlp@1.0.0: inactive -> firing" in evaluated.stdout
    listed = json.loads(_cli(server, "alerts", "list", "--state", "open", "--json").stdout)
    assert [a["rule"] for a in listed] == ["slo"]
    bad = _cli(server, "fleet", "health", "--by", "colour")
    assert bad.returncode == 1 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
    bad_rule = _cli(server, "alerts", "set-rule", "x", "--kind", "drift", "--set", "windows=0")
    assert bad_rule.returncode == 1 and "Traceback" not in bad_rule.stderr


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
def test_over_budget_uploads_get_429_with_retry_after(server: Server) -> None:
    from edgewise.control.telemetry import IngestBudget

    server.app.state.telemetry_runtime.budget = IngestBudget(100)
    device, key = server.enroll({})
    first = server.upload(device, key, _events(range(1, 9)))
    second = server.upload(device, key, _events(range(9, 60)))
    assert first.status_code == 200
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
    assert second.json()["error"]["code"] == "busy"
    assert [r.seq for r in _stored(server, device)] == list(range(1, 9))


@pytest.mark.parametrize("server", ["postgres"], indirect=True)
def test_mqtt_ingest_verifies_devices_with_the_control_plane(
    server: Server, mqtt_broker: tuple[str, int]
) -> None:
    import uuid

    from edgewise.agent.telemetry import MqttTelemetryUplink
    from edgewise.bundle import key_id
    from edgewise.control.telemetry._wiring import TelemetryConfig, TelemetryRuntime

    runtime = TelemetryRuntime(server.app.state.plane, TelemetryConfig(mqtt=""))
    from edgewise.control.telemetry import MqttIngest

    group = f"$share/t{uuid.uuid4().hex[:8]}/edgewise/telemetry/#"
    plane_key = server.app.state.plane.key
    consumer = MqttIngest(
        runtime.ingest, runtime.verify_mqtt, *mqtt_broker, subscription=group, ack_key=plane_key
    )
    consumer.start()
    device, key = server.enroll({})
    stranger = Ed25519PrivateKey.generate()
    try:
        # The uplink believes only acks the control plane signed (it signs them all).
        trusted = {key_id(plane_key): plane_key.public_key()}
        up = MqttTelemetryUplink(device, key, *mqtt_broker, ack_timeout_s=5, trusted=trusted)
        try:
            # Anything on the device's ack topic first: its uplink keeps listening.
            import paho.mqtt.publish as publish

            host, port = mqtt_broker
            ack_topic = f"edgewise/devices/{device}/telemetry/ack"
            for junk in (b"\xff", b"[" * 100_000 + b"]" * 100_000, b'{"last_seq": "x"}'):
                publish.single(ack_topic, junk, qos=1, hostname=host, port=port)
            ack = up.send(_events(range(1, 4)))
        finally:
            up.close()
        forged = MqttTelemetryUplink(device, stranger, *mqtt_broker, ack_timeout_s=1)
        try:
            from edgewise.agent import RetryableError

            with pytest.raises(RetryableError):
                forged.send(_events(range(4, 6)))
        finally:
            forged.close()
    finally:
        consumer.stop()
    assert (ack.accepted, ack.acked_seq) == (3, 3)
    assert [r.seq for r in _stored(server, device)] == [1, 2, 3]
    assert consumer.stats.rejected >= 1
    # What the consumer did is on /metrics while it is the app's consumer.
    wired = server.app.state.telemetry_runtime
    assert "edgewise_mqtt_telemetry" not in server.http.get("/metrics").text  # none runs
    wired.mqtt = consumer
    try:
        text = server.http.get("/metrics").text
    finally:
        wired.mqtt = None
    counts = {
        line.split('"')[1]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("edgewise_mqtt_telemetry_messages_total{")
    }
    assert counts["stored"] == 3 and counts["rejected"] == consumer.stats.rejected
    assert counts["shed"] == 0
