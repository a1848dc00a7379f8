"""Operator notifications: rollout events posted to a webhook, at least once.

At 3 a.m. a rollout that rolls itself back, pauses on a breach or waits for an approval
must reach someone, and alert rules are held while a rollout touches their devices. So
the rollout events an operator acts on (`NOTIFY_EVENTS`) are written to the `outbox`
table in the transaction that stores the rollout's new state (a crash cannot lose one,
nor invent one that did not happen), and posted as JSON to the server's rollout webhook
(`edgewise server --rollout-webhook URL`, or `EDGEWISE_ROLLOUT_WEBHOOK`). Alert changes
go the same way, each to its rule's webhook (`TelemetryService.notify`), so a receiver
that is restarting when an alert fires still gets it.

Delivery is at least once, in creation order, by whichever replica claims a row first
(a compare-and-set on its due time, so replicas never post one row twice at once). A
failed post (no whole answer within 5 s, however slowly the receiver drips it, or a
non-2xx status) is tried again after 5 s, 10 s, 20 s... up to 10 minutes apart, for a
day; then it is dropped and logged. After a failure a round posts nothing more to that
receiver, so one receiver that is down neither holds the others nor gets its later
events first. Rows that ended are deleted after a week.

Usage::

    enqueue(conn, "rollout.rolled_back", rollout_message(...), now)  # in the transaction
    Outbox(engine, url).deliver_due()                                 # a background loop
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from edgewise.control import _schema as t
from edgewise.control.rollout import DeviceRolloutState, Rollout

__all__ = [
    "NOTIFY_EVENTS",
    "Outbox",
    "enqueue",
    "post_json",
    "retry_delay",
    "rollout_message",
]

log = logging.getLogger("edgewise.control.outbox")

#: Rollout events an operator is told about: every state a rollout stops or ends in.
NOTIFY_EVENTS = frozenset(
    {
        "rollout.paused",
        "rollout.awaiting_approval",
        "rollout.completed",
        "rollout.rolled_back",
        "rollout.aborted",
        "rollout.failed",
    }
)

RETRY_FIRST_S = 5.0
RETRY_MAX_S = 600.0
GIVE_UP_S = 86400.0
KEEP_S = 7 * 86400.0
POST_S = 5.0  # the whole post: connect, send, and the receiver's complete answer
CLAIM_S = 60.0  # a claimed row is left alone this long (a post takes at most POST_S)
_D = DeviceRolloutState


def rollout_message(
    rollout: Rollout, event: str, actor: str, deployment_name: str, now: float
) -> dict[str, Any]:
    """The webhook body for one rollout event (pure)."""
    counts = rollout.device_counts()
    return {
        "rollout": {
            "event": event,
            "id": rollout.id,
            "deployment": rollout.deployment,
            "deployment_name": deployment_name,
            "from_revision": rollout.from_revision,
            "to_revision": rollout.to_revision,
            "state": rollout.state.value,
            "reason": rollout.reason,
            "phase_index": rollout.phase_index,
            "devices": len(rollout.devices),
            "succeeded": counts[_D.SUCCEEDED.value],
            "failed": counts[_D.FAILED.value] + counts[_D.TIMED_OUT.value],
            "held_back": counts[_D.HELD_BACK.value],
            "counts": {k: v for k, v in counts.items() if v},
            "actor": actor,
            "at": now,
            "console": f"/rollouts/{rollout.id}",
        }
    }


def enqueue(
    c: Connection, topic: str, payload: Mapping[str, Any], now: float, url: str | None = None
) -> None:
    """Add a notification, inside the caller's transaction (`url`: None, the default)."""
    c.execute(
        insert(t.outbox).values(
            topic=topic,
            url=url,
            payload=dict(payload),
            created_at=now,
            due_at=now,
            attempts=0,
            state="pending",
        )
    )


def retry_delay(attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones (pure)."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2.0 ** min(max(0, attempts - 1), 20))


def post_json(url: str, payload: Mapping[str, Any], deadline_s: float = POST_S) -> str | None:
    """POST `payload`; None when the receiver took it, else why not.

    `deadline_s` bounds the whole exchange, not each read: a receiver that answers a
    byte every few seconds is cut off like one that does not answer. It blocks; called
    where an event loop runs (it should not be), the post runs on a thread of its own.
    """
    import asyncio

    import httpx

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(timeout=deadline_s) as client:
            return await asyncio.wait_for(client.post(url, json=dict(payload)), deadline_s)

    def run() -> httpx.Response:
        return asyncio.run(post())

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        runner = run  # the usual case: a worker thread
    else:
        runner = functools.partial(_on_own_thread, run)
    try:
        r = runner()
    except TimeoutError:
        return f"no complete answer within {deadline_s:g} s"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:500]
    return None if r.is_success else f"HTTP {r.status_code}"


def _on_own_thread(fn: Callable[[], Any]) -> Any:
    """`fn()` on a new thread, waited for; its exception is raised here."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed back to the caller
            out["error"] = exc

    thread = threading.Thread(target=target, name="outbox-post", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class Outbox:
    """Posts due notifications, each to its own webhook or the default one.

    Args:
        engine: the store's engine.
        url: the default webhook (rows enqueued without one); empty: none.
        post: `post(url, payload) -> None | why it failed` (I/O, passed in).
        clock: unix time.
    """

    def __init__(
        self,
        engine: Any,
        url: str,
        post: Callable[[str, Mapping[str, Any]], str | None] = post_json,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine, self.url, self.post, self.clock = engine, url, post, clock
        self._swept_at = float("-inf")

    def pending(self) -> int:
        """Notifications not delivered (nor dropped) yet."""
        o = t.outbox
        with self.engine.connect() as c:
            return int(
                c.execute(
                    select(func.count()).select_from(o).where(o.c.state == "pending")
                ).scalar_one()
            )

    def deliver_due(self, limit: int = 50, budget_s: float | None = None) -> int:
        """Post what is due, oldest first; returns how many were delivered.

        After a failed post the round skips that receiver's later rows (they keep their
        turn). `budget_s`: claim no new row once the round has taken this long (the
        rest waits for the delivery loop).
        """
        o = t.outbox
        now = self.clock()
        with self.engine.connect() as c:
            due = c.execute(
                select(
                    o.c.id,
                    o.c.due_at,
                    o.c.attempts,
                    o.c.created_at,
                    o.c.topic,
                    o.c.url,
                    o.c.payload,
                )
                .where(o.c.state == "pending", o.c.due_at <= now)
                .order_by(o.c.id)
                .limit(limit)
            ).all()
        delivered = 0
        failing: set[str] = set()
        for row in due:
            url = row.url or self.url
            if url in failing:
                continue  # keeps its turn behind the row that failed
            if budget_s is not None and self.clock() - now >= budget_s:
                break
            if not self._claim(row.id, row.due_at, now):
                continue  # another replica has it
            why = self.post(url, row.payload) if url else "no webhook to post it to"
            tries = row.attempts + 1
            done = self.clock()
            if why is None:
                values: dict[str, Any] = {"state": "delivered", "attempts": tries, "done_at": done}
                delivered += 1
            else:
                failing.add(url)
                values = self._failed(row, tries, done, why)
            with self.engine.begin() as c:
                c.execute(update(o).where(o.c.id == row.id).values(**values))
        if now - self._swept_at >= 3600.0:
            self._swept_at = now
            with self.engine.begin() as c:
                c.execute(delete(o).where(o.c.state != "pending", o.c.done_at < now - KEEP_S))
        return delivered

    @staticmethod
    def _failed(row: Any, tries: int, done: float, why: str) -> dict[str, Any]:
        if done - row.created_at >= GIVE_UP_S:
            log.error(
                "notification %s (%s) dropped after %d tries: %s", row.id, row.topic, tries, why
            )
            return {"state": "dropped", "attempts": tries, "done_at": done, "last_error": why}
        log.warning(
            "notification %s (%s) not delivered (try %d): %s", row.id, row.topic, tries, why
        )
        return {"attempts": tries, "due_at": done + retry_delay(tries), "last_error": why}

    def _claim(self, row_id: int, due_at: float, now: float) -> bool:
        o = t.outbox
        with self.engine.begin() as c:
            res = c.execute(
                update(o)
                .where(o.c.id == row_id, o.c.state == "pending", o.c.due_at == due_at)
                .values(due_at=now + CLAIM_S)
            )
        return bool(res.rowcount == 1)
