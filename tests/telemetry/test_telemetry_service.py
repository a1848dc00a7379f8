"""The control-plane telemetry shell over a real database: views, alerts + webhooks, retention."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import func, select

from edgewise.control.telemetry import ActiveRollout, AlertState, RetentionPolicy
from edgewise.control.telemetry import _tables as tt
from edgewise.control.telemetry._ingest import TelemetryIngest
from edgewise.control.telemetry._service import TelemetryService, post_webhook
from edgewise.protocol import TelemetryBatch, TelemetryRecord

NOW = 1_000_000.0


class Hooks:
    """A real HTTP server on loopback that records webhook calls."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.down = 0  # answer this many calls 503 (not taken, not recorded)
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if hooks.down:
                    hooks.down -= 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                hooks.calls.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    h = Hooks()
    yield h
    h.close()


def _send_windows(
    ingest: TelemetryIngest, device: str, error_rate: float, start_seq: int, minutes: int = 60
) -> int:
    records = []
    seq = start_seq
    for m in range(minutes):
        end = NOW - (minutes - m - 1) * 60
        failed = round(200 * error_rate)
        records.append(
            TelemetryRecord(
                seq=seq,
                cls="metric",
                ts=end,
                kind="window",
                data={
                    "pipeline": "p",
                    "model": "m",
                    "version": "1",
                    "start": end - 60,
                    "end": end,
                    "counts": {"ok": 200 - failed, "failed": failed},
                    "latency": {
                        "bounds": [1.0, 10.0],
                        "stages": {"total": {"counts": [150, 50, 0], "sum": 0}},
                    },
                },
            )
        )
        seq += 1
    ingest.ingest(device, TelemetryBatch(records=records), now=NOW)
    return seq


def test_fleet_health_reads_stored_windows_by_label(store: Any) -> None:
    ingest = TelemetryIngest(store.engine)
    _send_windows(ingest, "dev-1", 0.0, 1, minutes=5)
    _send_windows(ingest, "dev-2", 0.5, 1, minutes=5)
    svc = TelemetryService(store.engine, clock=lambda: NOW)
    rows = {r["group"]: r for r in svc.fleet_health(by="label:site", window_s=600)}
    assert rows["site=a"]["success_rate"] == 1.0 and rows["site=b"]["success_rate"] == 0.5
    assert rows["site=a"]["p50_ms"] == pytest.approx(0.667, abs=1e-3)
    assert rows["site=a"]["devices_reporting"] == 1
    with pytest.raises(ValueError):
        svc.fleet_health(by="nope")


def test_burn_rate_alert_fires_calls_webhook_and_resolves(store: Any, hooks: Hooks) -> None:
    ingest = TelemetryIngest(store.engine)
    svc = TelemetryService(store.engine, clock=lambda: NOW)
    svc.put_rule(
        {
            "kind": "burn_rate",
            "name": "slo",
            "target": 0.99,
            "burn_rate": 1.5,
            "webhook": hooks.url,
        },
        actor="test",
    )
    next1 = _send_windows(ingest, "dev-1", 0.01, 1)
    _send_windows(ingest, "dev-2", 0.01, 1)
    assert svc.evaluate_alerts() == []
    _send_windows(ingest, "dev-1", 0.03, next1)  # dev-1's error rate triples: fleet x2
    changes = svc.evaluate_alerts()
    assert [(c.scope, c.new) for c in changes] == [("m@1", AlertState.FIRING)]
    assert svc.notify(changes) == 1
    assert hooks.calls[0]["alert"]["rule"] == "slo" and hooks.calls[0]["alert"]["new"] == "firing"
    assert svc.evaluate_alerts() == []  # still firing: no new change
    stored = svc.alerts(state="open")
    assert len(stored) == 1 and stored[0]["notified"] is True
    later = TelemetryService(store.engine, clock=lambda: NOW + 7200)
    resolved = later.evaluate_alerts()
    assert [(c.old, c.new) for c in resolved] == [(AlertState.FIRING, AlertState.RESOLVED)]
    assert svc.alerts(state="resolved")[0]["id"] == stored[0]["id"]


def test_an_alert_the_webhook_misses_is_posted_again_until_it_is_taken(
    store: Any, hooks: Hooks
) -> None:
    # Before: one POST per change; a receiver restarting when the alert fired never
    # heard of it.
    clock = [NOW]
    ingest = TelemetryIngest(store.engine)
    svc = TelemetryService(store.engine, clock=lambda: clock[0])
    rule = {"kind": "burn_rate", "name": "slo", "target": 0.99, "burn_rate": 1.5}
    svc.put_rule(rule | {"webhook": hooks.url}, actor="test")
    next1 = _send_windows(ingest, "dev-1", 0.01, 1)
    _send_windows(ingest, "dev-2", 0.01, 1)
    _send_windows(ingest, "dev-1", 0.03, next1)
    hooks.down = 2
    assert svc.notify(svc.evaluate_alerts()) == 0  # the receiver is down
    assert svc.outbox.pending() == 1 and hooks.calls == []
    clock[0] += 5.0
    assert svc.outbox.deliver_due() == 0  # still down (the second try)
    clock[0] += 3600.0
    assert svc.outbox.deliver_due() == 1  # back: delivered, once
    assert svc.outbox.deliver_due() == 0 and svc.outbox.pending() == 0
    (call,) = hooks.calls
    assert (call["alert"]["rule"], call["alert"]["new"]) == ("slo", "firing")


def test_silent_device_fires_freshness_and_rollout_suppresses(store: Any) -> None:
    ingest = TelemetryIngest(store.engine)
    svc = TelemetryService(store.engine, clock=lambda: NOW)
    svc.put_rule({"kind": "freshness", "name": "fresh", "max_age_s": 600}, actor="test")
    ingest.ingest(
        "dev-1",
        TelemetryBatch(records=[TelemetryRecord(seq=1, cls="event", ts=NOW, kind="x")]),
        now=NOW,
    )
    # dev-2 enrolled at t=1 and never sent anything.
    during = svc.evaluate_alerts(active_rollouts=[ActiveRollout("r1", frozenset({"dev-2"}))])
    assert [(c.scope, c.new) for c in during] == [("dev-2", AlertState.SUPPRESSED)]
    after = svc.evaluate_alerts()
    assert [(c.scope, c.old, c.new) for c in after] == [
        ("dev-2", AlertState.SUPPRESSED, AlertState.FIRING)
    ]
    assert len(svc.alerts()) == 1  # one episode, updated in place


def test_invalid_rule_is_refused(store: Any) -> None:
    from pydantic import ValidationError

    svc = TelemetryService(store.engine)
    with pytest.raises(ValidationError):
        svc.put_rule({"kind": "freshness", "name": "x", "max_age_s": -1}, actor="t")


def test_a_stored_rule_this_build_cannot_read_is_skipped_and_the_others_fire(
    store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ingest = TelemetryIngest(store.engine)
    svc = TelemetryService(store.engine, clock=lambda: NOW)
    svc.put_rule({"kind": "burn_rate", "name": "slo", "burn_rate": 1.5}, actor="test")
    # As an older build, which did not check group_by, stored it.
    bad = {"kind": "burn_rate", "name": "bad", "group_by": "garbage"}
    with store.engine.begin() as c:
        c.execute(
            tt.alert_rules.insert().values(name="bad", rule=bad, created_at=NOW, created_by="old")
        )
    _send_windows(ingest, "dev-1", 0.05, 1)
    with caplog.at_level("WARNING", logger="edgewise.control.telemetry"):
        changes = svc.evaluate_alerts()
    assert [(c.rule, c.new) for c in changes] == [("slo", AlertState.FIRING)]
    assert "alert rule 'bad' skipped: burn_rate.group_by: Value error, cannot group by" in (
        caplog.text
    )
    assert [r.name for r in svc.rules()] == ["slo"]


def test_retention_downsamples_old_windows_and_keeps_totals(store: Any) -> None:
    ingest = TelemetryIngest(store.engine)
    _send_windows(ingest, "dev-1", 0.1, 1, minutes=180)  # 3 h of minute windows
    svc = TelemetryService(store.engine, clock=lambda: NOW)
    before = svc.fleet_health(window_s=86400)[0]
    result = svc.run_retention(RetentionPolicy(raw_keep_s=3600, downsample_s=3600, keep_s=86400))
    after = svc.fleet_health(window_s=86400)[0]
    with store.engine.connect() as c:
        n = c.execute(select(func.count()).select_from(tt.telemetry_windows)).scalar()
    assert result["windows_created"] >= 2 and n < 180
    assert (after["requests"], after["errors"]) == (before["requests"], before["errors"])
    assert after["p95_ms"] == before["p95_ms"]


def test_webhook_poster_reports_failure_without_raising() -> None:
    assert post_webhook("http://127.0.0.1:9/none", {"x": 1}) is False
