"""Rollout events reach the operator's webhook: at least once, once per event, in order."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from edgewise.control import _schema as t
from edgewise.control._outbox import Outbox, enqueue, post_json, retry_delay

from .inproc import World
from .test_rollout_api import _fleet, _phase_devices, _revise, _start


class _Receiver:
    """A webhook on loopback: records what it is sent, answers the statuses it is given."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.statuses: list[int] = []  # answered in turn; 200 once used up
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                if status < 300:
                    receiver.bodies.append(body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[str]:
        return [b["rollout"]["event"] for b in self.bodies]


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    r = _Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def hooked(
    request: pytest.FixtureRequest, tmp_path: Path, examples: dict[str, Any], receiver: _Receiver
) -> Iterator[World]:
    from .inproc import make_world

    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    yield from make_world(tmp_path, examples, url, rollout_webhook=receiver.url)


def _outbox(w: World, url: str) -> Outbox:
    return Outbox(w.plane.store.engine, url, clock=w.clock)


def _rows(w: World) -> list[dict[str, Any]]:
    with w.plane.store.engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(select(t.outbox).order_by(t.outbox.c.id))]


def _rolled_back(w: World) -> dict[str, Any]:
    """A rollout whose canary failed: rolled back (a rollout.rolled_back event queued)."""
    devs = _fleet(w)
    ro = _start(w, _revise(w, "2.0.0"), gates={"error_pct": 10})
    w.tick()
    _phase_devices(w, ro["id"], 0, devs)[0].report("2.0.0", "failed", "health check failed")
    w.tick()
    assert w.rollout(ro["id"])["state"] == "rolled_back"
    return ro


def test_a_rollback_reaches_the_webhook_once_after_the_receiver_recovers(
    hooked: World, receiver: _Receiver
) -> None:
    w = hooked
    ro = _rolled_back(w)
    receiver.statuses = [500]  # the receiver is down for the first try
    first, second = _outbox(w, receiver.url), _outbox(w, receiver.url)  # two replicas
    assert first.deliver_due() == 0 and receiver.bodies == []
    (row,) = _rows(w)
    assert (row["state"], row["attempts"], row["last_error"]) == ("pending", 1, "HTTP 500")
    assert second.deliver_due() == 0  # not due again yet
    w.clock.now += retry_delay(1)
    assert first.deliver_due() + second.deliver_due() == 1
    assert first.deliver_due() + second.deliver_due() == 0
    (body,) = receiver.bodies
    sent = body["rollout"]
    assert (sent["event"], sent["id"], sent["state"]) == (
        "rollout.rolled_back",
        ro["id"],
        "rolled_back",
    )
    assert sent["deployment_name"] == "base" and "error" in sent["reason"]
    assert (sent["from_revision"], sent["to_revision"]) == (1, 2)
    assert sent["counts"] == {"pending": 6, "rolled_back": 2}  # the canary, sent back
    assert sent["console"] == f"/rollouts/{ro['id']}"
    assert _rows(w)[0]["state"] == "delivered" and first.pending() == 0


def test_every_state_an_operator_acts_on_is_sent_in_order(
    hooked: World, receiver: _Receiver
) -> None:
    w = hooked
    devs = _fleet(w)
    ro = _start(w, _revise(w, "1.1.0"), require_approval=[True])
    w.tick()
    for d in _phase_devices(w, ro["id"], 0, devs):
        d.report("1.1.0", "active")
    w.tick()
    w.ok("POST", f"/api/v1/rollouts/{ro['id']}/approve")
    w.tick()
    w.ok("POST", f"/api/v1/rollouts/{ro['id']}/pause")
    w.ok("POST", f"/api/v1/rollouts/{ro['id']}/resume")
    for d in devs:
        d.report("1.1.0", "active")
    w.tick()
    assert w.rollout(ro["id"])["state"] == "completed"
    assert _outbox(w, receiver.url).deliver_due() == 3
    assert receiver.events() == ["rollout.awaiting_approval", "rollout.paused", "rollout.completed"]
    paused = receiver.bodies[1]["rollout"]
    assert paused["actor"].startswith("token:admin") and paused["reason"].startswith("paused by")


def test_without_a_webhook_nothing_is_queued(world: World) -> None:
    _rolled_back(world)
    assert _rows(world) == []


def test_a_notification_no_receiver_takes_for_a_day_is_dropped(
    hooked: World, receiver: _Receiver
) -> None:
    w = hooked
    _rolled_back(w)
    box = _outbox(w, receiver.url)
    receiver.statuses = [503] * 1000
    tries = 0
    while _rows(w)[0]["state"] == "pending":
        box.deliver_due()
        tries += 1
        w.clock.now += 600.0
        assert tries < 200
    (row,) = _rows(w)
    assert row["state"] == "dropped" and row["last_error"] == "HTTP 503"
    assert receiver.bodies == [] and box.pending() == 0


class _Drip:
    """A webhook that answers one header byte at a time, for longer than any deadline."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        drip = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(300):  # 30 s of "X-Slow: ..." a byte every 0.1 s
                    if drip.stop.wait(0.1):
                        return
                    self.wfile.write(b"X")
                    self.wfile.flush()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_receiver_that_drips_its_answer_is_cut_off_at_the_deadline() -> None:
    drip = _Drip()
    try:
        # Before: httpx's timeout was per read, so a byte every 0.1 s kept the post
        # going for the whole 30 s (past the claim, so another replica posted it too).
        why = post_json(drip.url, {"x": 1}, deadline_s=1.0)
    finally:
        drip.close()
    assert why == "no complete answer within 1 s"


def test_a_receiver_that_is_down_holds_neither_the_others_nor_its_own_order(
    world: World, receiver: _Receiver
) -> None:
    engine = world.plane.store.engine
    down = "http://127.0.0.1:9/down"  # discard port: refused
    with engine.begin() as c:
        enqueue(c, "alert.firing", {"n": 1}, world.clock(), down)
        enqueue(c, "alert.firing", {"n": 2}, world.clock(), down)
        enqueue(c, "alert.firing", {"n": 3}, world.clock(), receiver.url)
    assert _outbox(world, "").deliver_due() == 1
    assert receiver.bodies == [{"n": 3}]
    tries = {r["payload"]["n"]: r["attempts"] for r in _rows(world)}
    assert tries == {1: 1, 2: 0, 3: 1}  # n=2 waits behind n=1, untried


def test_an_inline_round_stops_claiming_once_its_budget_is_spent(world: World) -> None:
    posted: list[int] = []

    def slow_post(url: str, payload: Any) -> None:
        posted.append(payload["n"])
        world.clock.now += 4.0  # each post takes 4 s of the round's time

    with world.plane.store.engine.begin() as c:
        for n in range(5):
            enqueue(c, "alert.firing", {"n": n}, world.clock(), f"http://127.0.0.1:9/{n}")
    box = Outbox(world.plane.store.engine, "", post=slow_post, clock=world.clock)
    assert box.deliver_due(budget_s=10.0) == 3 and posted == [0, 1, 2]
    assert box.deliver_due() == 2 and posted == [0, 1, 2, 3, 4]  # the loop takes the rest
