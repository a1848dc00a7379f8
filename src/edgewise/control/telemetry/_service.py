"""The telemetry shell of the control plane: reads windows, evaluates alerts, runs retention.

Every decision is a pure function of this package (`fleet_view`, `evaluate_rules`,
`plan_retention`, `merge_window_data`); this class reads their inputs from SQL, writes
their outcome back, and calls webhooks. The clock and the webhook poster are passed in.

Usage::

    svc = TelemetryService(store.engine)
    svc.fleet_health(by="model", window_s=3600)
    changes = svc.evaluate_alerts(active_rollouts=[ActiveRollout("r1", frozenset({"dev-1"}))])
    svc.notify(changes)
    svc.run_retention(RetentionPolicy())
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, Engine, delete, func, insert, or_, select, update

from edgewise.control import _schema as cs
from edgewise.control.telemetry import _tables as tt
from edgewise.control.telemetry._alerts import (
    ActiveRollout,
    AlertChange,
    AlertFigures,
    AlertState,
    BurnRateRule,
    DriftRule,
    FreshnessRule,
    parse_rule,
)
from edgewise.control.telemetry._alerts import evaluate_rules as _evaluate
from edgewise.control.telemetry._figures import WindowFigures
from edgewise.control.telemetry._reference import reference_of
from edgewise.control.telemetry._retention import (
    RetentionPolicy,
    WindowMeta,
    merge_window_data,
    plan_retention,
)
from edgewise.control.telemetry._views import (
    MAX_DEVICE_STREAMS,
    bounded_streams,
    fleet_view,
    group_key,
    merged_drift,
)
from edgewise.drift import DriftReference
from edgewise.protocol import first_problem

__all__ = ["TelemetryService", "post_webhook"]

log = logging.getLogger("edgewise.control.telemetry")
Rule = BurnRateRule | DriftRule | FreshnessRule
Visible = Callable[[Mapping[str, str]], bool]
_OPEN = (AlertState.FIRING.value, AlertState.SUPPRESSED.value)
NOTIFY_BUDGET_S = 10.0  # posting inline after an alert round, at most this long


def _rounded(value: float | None) -> float | None:
    return round(value, 6) if value is not None and math.isfinite(value) else None


def post_webhook(url: str, payload: Mapping[str, Any]) -> bool:
    """POST a JSON payload; True on a 2xx answer (never raises)."""
    from edgewise.control._outbox import post_json

    return post_json(url, payload) is None


class TelemetryService:
    """Fleet views, drift, alerts and retention over the control plane's database."""

    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], float] = time.time,
        webhook: Callable[[str, Mapping[str, Any]], str | None] | None = None,
        default_webhook: str | None = None,
    ) -> None:
        """Work on `engine`; `webhook(url, payload) -> None | why not` posts alert notifications.

        Notifications go through the outbox: one the receiver does not take at once is
        tried again by the control plane's delivery loop (see `edgewise.control._outbox`).
        """
        from edgewise.control._outbox import Outbox, post_json

        self.engine = engine
        self.clock = clock
        self.default_webhook = default_webhook
        self.outbox = Outbox(engine, "", post=webhook or post_json, clock=clock)
        self.postgres = engine.dialect.name == "postgresql"
        self._refs: dict[str, DriftReference | None] = {}
        self._lock = threading.Lock()

    # -- reading ----------------------------------------------------------------------

    def windows(
        self, since: float, until: float | None = None, visible: Visible | None = None
    ) -> list[WindowFigures]:
        """Windows that ended after `since` (and at or before `until`), with device labels.

        `visible(labels)` keeps only the devices a scoped caller may see. Of a device
        naming more than `MAX_DEVICE_STREAMS` streams in the span, only that many are
        read (`bounded_streams`).
        """
        tw, dev = tt.telemetry_windows, cs.devices
        q = (
            select(tw.c.device_id, tw.c.data, dev.c.labels, tw.c.end)
            .join(dev, dev.c.id == tw.c.device_id, isouter=True)
            .where(tw.c.end > since)
        )
        if until is not None:
            q = q.where(tw.c.end <= until)
        with self.engine.connect() as c:
            rows: list[Any] = list(c.execute(q.order_by(tw.c.end)))
        out = []
        for d, data, labels, end in rows:
            if visible is not None and not visible(labels or {}):
                continue
            w = WindowFigures.from_record(str(d), data if isinstance(data, dict) else {}, labels)
            # The row's `end` is the window's end as ingest bounded it (never past the
            # time it arrived): a device-stated end of 1e18 would read as fresh for ever.
            if w.end > end:
                w = replace(w, end=float(end))
            out.append(w)
        kept, left_out = bounded_streams(out)
        for device, n in sorted(left_out.items()):
            log.warning(
                "device %s: %d telemetry streams past the %d read left out",
                device,
                n,
                MAX_DEVICE_STREAMS,
            )
        return kept

    def references(self, keys: Sequence[str]) -> dict[str, DriftReference]:
        """Drift references of registered models by `name@version` (cached)."""
        missing = [k for k in keys if k not in self._refs]
        if missing:
            m = cs.models
            with self.engine.connect() as c:
                for key in missing:
                    name, _, version = key.partition("@")
                    manifest = c.execute(
                        select(m.c.manifest).where(m.c.name == name, m.c.version == version)
                    ).scalar()
                    self._refs[key] = reference_of(manifest) if manifest else None
        return {k: r for k in keys if (r := self._refs.get(k)) is not None}

    def last_seen(self) -> dict[str, float]:
        """Active devices -> newest telemetry receipt (enrollment time if none yet)."""
        dev, td = cs.devices, tt.telemetry_devices
        q = (
            select(dev.c.id, func.coalesce(td.c.last_received, dev.c.enrolled_at))
            .join(td, td.c.device_id == dev.c.id, isouter=True)
            .where(dev.c.status == "active")
        )
        with self.engine.connect() as c:
            rows: list[Any] = list(c.execute(q))
        return {str(i): float(t) for i, t in rows}

    def fleet_health(
        self,
        by: str = "model",
        window_s: float = 3600.0,
        now: float | None = None,
        visible: Visible | None = None,
    ) -> list[dict[str, Any]]:
        """Health rows per group over the last `window_s` seconds.

        Raises:
            ValueError: an unknown grouping.
        """
        now = self.clock() if now is None else now
        ws = self.windows(now - window_s, visible=visible)
        refs = self.references(sorted({w.model_key for w in ws}))
        return [r.to_dict() for r in fleet_view(ws, now, by, refs)]

    def drift(
        self,
        by: str = "model",
        window_s: float = 3600.0,
        model: str | None = None,
        now: float | None = None,
        visible: Visible | None = None,
    ) -> list[dict[str, Any]]:
        """Drift per group: merged score, devices reporting, devices whose latest window drifted.

        Raises:
            ValueError: an unknown grouping.
        """
        now = self.clock() if now is None else now
        ws = [
            w
            for w in self.windows(now - window_s, visible=visible)
            if model is None or model in (w.model, w.model_key)
        ]
        refs = self.references(sorted({w.model_key for w in ws}))
        groups: dict[str, list[WindowFigures]] = {}
        for w in ws:
            groups.setdefault(group_key(w, by), []).append(w)
        out = []
        for key in sorted(groups):
            gw = groups[key]
            score, shift = merged_drift(gw, refs)
            latest: dict[tuple[str, str], WindowFigures] = {}
            for w in gw:
                if w.drift_score is not None:
                    latest[(w.device_id, w.pipeline)] = w
            drifted = sorted(
                {
                    d
                    for (d, _), w in latest.items()
                    if w.drift_score is not None and w.drift_score > 1.0
                }
            )
            out.append(
                {
                    "group": key,
                    "drift_score": _rounded(score),
                    "confidence_shift": _rounded(shift),
                    "devices_reporting": len({w.device_id for w in gw}),
                    "devices_drifted": drifted,
                    "windows": len(gw),
                    "models": sorted({w.model_key for w in gw}),
                }
            )
        return out

    # -- alert rules --------------------------------------------------------------------

    def put_rule(self, data: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """Create or replace a rule (validated).

        Raises:
            pydantic.ValidationError: an invalid rule.
        """
        rule = parse_rule(data)
        body = rule.model_dump(mode="json")
        ar = tt.alert_rules
        with self.engine.begin() as c:
            c.execute(delete(ar).where(ar.c.name == rule.name))
            c.execute(
                insert(ar).values(
                    name=rule.name, rule=body, created_at=self.clock(), created_by=actor
                )
            )
        return body

    def delete_rule(self, name: str) -> bool:
        """Remove a rule; False if there was none."""
        ar = tt.alert_rules
        with self.engine.begin() as c:
            return bool(c.execute(delete(ar).where(ar.c.name == name)).rowcount)

    def rules(self) -> list[Rule]:
        """Every rule this build can read, by name.

        A stored rule that no longer validates (written by an older or newer edgewise, or
        damaged) is left out with a warning: one bad rule must not silence the others.
        """
        ar = tt.alert_rules
        with self.engine.connect() as c:
            rows: list[Any] = list(c.execute(select(ar.c.name, ar.c.rule).order_by(ar.c.name)))
        out = []
        for name, data in rows:
            try:
                out.append(parse_rule(data))
            except ValidationError as exc:
                log.warning("alert rule %r skipped: %s", name, first_problem(exc, "rule"))
            except (TypeError, ValueError) as exc:  # not an object at all
                log.warning("alert rule %r skipped: %s", name, exc)
        return out

    def device_labels(self) -> dict[str, dict[str, str]]:
        """Device id -> labels."""
        dev = cs.devices
        with self.engine.connect() as c:
            rows: list[Any] = list(c.execute(select(dev.c.id, dev.c.labels)))
        return {str(i): dict(labels or {}) for i, labels in rows}

    def alerts(
        self, state: str | None = None, limit: int = 200, visible: Visible | None = None
    ) -> list[dict[str, Any]]:
        """Alert records, newest first (`state`: firing, suppressed, resolved, or open).

        With `visible`, only alerts naming at least one visible device (or none at all).
        """
        al = tt.alerts
        q = select(al).order_by(al.c.updated_at.desc(), al.c.id.desc()).limit(limit)
        if state == "open":
            q = q.where(al.c.state.in_(_OPEN))
        elif state:
            q = q.where(al.c.state == state)
        with self.engine.connect() as c:
            rows = [dict(r) for r in c.execute(q).mappings()]
        if visible is not None:
            labels = self.device_labels()
            rows = [
                r
                for r in rows
                if not r["devices"] or any(visible(labels.get(d, {})) for d in r["devices"])
            ]
        return rows

    # -- alert evaluation -------------------------------------------------------------

    def _try_lead(self, c: Connection) -> bool:
        if not self.postgres:
            return True
        from sqlalchemy import text

        # One replica evaluates per round; the others skip rather than double-fire.
        return bool(c.execute(text("SELECT pg_try_advisory_xact_lock(6581)")).scalar())

    def evaluate_alerts(
        self, now: float | None = None, active_rollouts: Sequence[ActiveRollout] = ()
    ) -> list[AlertChange]:
        """Evaluate every rule and store the changes as alert records."""
        now = self.clock() if now is None else now
        rules = self.rules()
        if not rules:
            return []
        span = max([r.long_window_s for r in rules if isinstance(r, BurnRateRule)] + [3600.0])
        figures_windows = self.windows(now - span)
        last_seen = self.last_seen()
        al = tt.alerts
        with self.engine.begin() as c:
            if not self._try_lead(c):
                return []
            open_rows = c.execute(select(al).where(al.c.state.in_(_OPEN))).mappings().all()
            states = {(r["rule"], r["scope"]): AlertState(r["state"]) for r in open_rows}
            ids = {(r["rule"], r["scope"]): r["id"] for r in open_rows}
            changes = _evaluate(
                rules, AlertFigures(figures_windows, last_seen, states), now, active_rollouts
            )
            for ch in changes:
                key = (ch.rule, ch.scope)
                if key in ids:
                    c.execute(
                        update(al)
                        .where(al.c.id == ids[key])
                        .values(
                            state=ch.new.value,
                            value=ch.value,
                            message=ch.message,
                            updated_at=now,
                            notified=False,
                        )
                    )
                else:
                    c.execute(
                        insert(al).values(
                            rule=ch.rule,
                            kind=ch.kind,
                            scope=ch.scope,
                            state=ch.new.value,
                            value=ch.value,
                            message=ch.message,
                            devices=list(ch.devices),
                            opened_at=now,
                            updated_at=now,
                            notified=False,
                        )
                    )
        return changes

    def notify(self, changes: Sequence[AlertChange]) -> int:
        """Queue and post webhooks for the changes operators hear about.

        Those are firing, and the resolution of a firing. Each is queued (and its alert
        marked `notified`) in one transaction; one the receiver does not take now stays
        queued and is tried again later, until it is.

        Returns:
            How many notifications were delivered now.
        """
        from edgewise.control._outbox import enqueue

        urls = {r.name: r.webhook for r in self.rules()}
        al = tt.alerts
        queued = 0
        with self.engine.begin() as c:
            for ch in changes:
                if ch.new is AlertState.SUPPRESSED:
                    continue
                if ch.new is AlertState.RESOLVED and ch.old is not AlertState.FIRING:
                    continue
                url = urls.get(ch.rule) or self.default_webhook
                if not url:
                    continue
                enqueue(c, f"alert.{ch.new.value}", {"alert": ch.to_dict()}, self.clock(), url)
                c.execute(
                    update(al)
                    .where(al.c.rule == ch.rule, al.c.scope == ch.scope, al.c.updated_at == ch.at)
                    .values(notified=True)
                )
                queued += 1
        # A receiver that hangs must not hold the alert round: what is left after
        # NOTIFY_BUDGET_S goes out from the control plane's delivery loop.
        return self.outbox.deliver_due(budget_s=NOTIFY_BUDGET_S) if queued else 0

    # -- retention --------------------------------------------------------------------

    def run_retention(self, policy: RetentionPolicy, now: float | None = None) -> dict[str, int]:
        """Downsample and expire telemetry per `policy`; returns what it did."""
        now = self.clock() if now is None else now
        tw = tt.telemetry_windows
        with self.engine.connect() as c:
            metas = [
                WindowMeta(
                    int(r.id),
                    str(r.device_id),
                    str(r.pipeline),
                    f"{r.model}@{r.version}" if r.version else str(r.model),
                    float(r.start),
                    float(r.end),
                    bool(r.downsampled),
                )
                for r in c.execute(
                    select(
                        tw.c.id,
                        tw.c.device_id,
                        tw.c.pipeline,
                        tw.c.model,
                        tw.c.version,
                        tw.c.start,
                        tw.c.end,
                        tw.c.downsampled,
                    ).where(tw.c.end < now - min(policy.raw_keep_s, policy.keep_s))
                )
            ]
        plan = plan_retention(metas, now, policy)
        merged = 0
        for group in plan.merges:
            with self.engine.begin() as c:
                rows = c.execute(
                    select(
                        tw.c.id,
                        tw.c.data,
                        tw.c.model,
                        tw.c.version,
                        tw.c.deployment,
                        tw.c.start,
                        tw.c.end,
                    )
                    .where(tw.c.id.in_(group.ids))
                    .order_by(tw.c.id)
                ).all()
                if len(rows) != len(group.ids):
                    continue  # another replica merged meanwhile
                data = merge_window_data([r.data if isinstance(r.data, dict) else {} for r in rows])
                c.execute(delete(tw).where(tw.c.id.in_(group.ids)))
                c.execute(
                    insert(tw).values(
                        device_id=group.device_id,
                        seq=None,
                        pipeline=group.pipeline,
                        # The columns as ingest stored them (cut to width, no NUL), not
                        # the data's names: a 500-character model name had failed the
                        # insert on PostgreSQL, and with it every retention run.
                        model=rows[0].model,
                        version=rows[0].version,
                        deployment=rows[0].deployment,
                        # Ingest bounded the columns' times; the data's may be anything.
                        start=min(float(r.start) for r in rows),
                        end=max(float(r.end) for r in rows),
                        downsampled=True,
                        data=data,
                    )
                )
                merged += len(group.ids)
        tel = cs.telemetry
        with self.engine.begin() as c:
            deleted = 0
            for i in range(0, len(plan.deletes), 500):
                chunk = plan.deletes[i : i + 500]
                deleted += c.execute(delete(tw).where(tw.c.id.in_(chunk))).rowcount or 0
            # The raw log below each device's ack is only the dedup history: the ack
            # already refuses those seqs, so old rows can go.
            # By device time, or by arrival for records stamped in the future (a `ts` of
            # 1e300 had kept a device's events and samples for ever).
            events = (
                c.execute(
                    delete(tel).where(
                        tel.c.cls == "event",
                        or_(tel.c.ts < plan.events_before, tel.c.received_at < plan.events_before),
                    )
                ).rowcount
                or 0
            )
            samples = (
                c.execute(
                    delete(tel).where(
                        tel.c.cls == "sample",
                        or_(
                            tel.c.ts < plan.samples_before,
                            tel.c.received_at < plan.samples_before,
                        ),
                    )
                ).rowcount
                or 0
            )
            metrics = (
                c.execute(
                    delete(tel).where(
                        tel.c.cls == "metric", tel.c.received_at < now - policy.keep_s
                    )
                ).rowcount
                or 0
            )
        return {
            "windows_merged": merged,
            "windows_created": len(plan.merges),
            "windows_deleted": deleted,
            "events_deleted": events,
            "samples_deleted": samples,
            "metrics_deleted": metrics,
        }
