"""Fleet gauges for the control plane's `/metrics` (Prometheus text, checked by promtool).

A `prometheus_client` custom collector: each scrape reads devices, the versions running
in the field, open alerts and the last `window_s` of telemetry windows (cached for
`cache_s`, so several scrapers cost one query), and exposes:

- `edgewise_fleet_devices{status}`, `edgewise_fleet_devices_online`
- `edgewise_fleet_model_devices{model,version}`: devices running a model version
- `edgewise_fleet_success_ratio{model}`, `edgewise_fleet_requests{model}` (in the window)
- `edgewise_fleet_latency_seconds{model,percentile}` (p50, p95, p99, merged histograms;
  a gauge, so the label is not `quantile`, which promtool keeps for summaries)
- `edgewise_fleet_drift_score{model}`, `edgewise_fleet_telemetry_age_seconds{model}`
- `edgewise_alerts_open{state}`

`MqttCollector` adds `edgewise_mqtt_telemetry_messages_total{outcome}`: what this
replica's MQTT consumer did with each message (stored, duplicate, rejected, invalid,
shed), while one runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from edgewise.control import _schema as cs
from edgewise.control.telemetry import _tables as tt
from edgewise.control.telemetry._service import TelemetryService

__all__ = ["FleetCollector", "MqttCollector"]

_MQTT_OUTCOMES = ("received", "stored", "duplicates", "rejected", "invalid", "shed")


class MqttCollector(Collector):
    """The MQTT telemetry consumer's counters; `stats()` is None while none runs."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        """Read the consumer's `MqttIngestStats` through `stats` at scrape time."""
        self.stats = stats

    def describe(self) -> list[Any]:
        """Nothing up front: the consumer may not run."""
        return []

    def collect(self) -> Iterator[CounterMetricFamily]:
        """One counter family, by outcome (nothing while no consumer runs)."""
        stats = self.stats()
        if stats is None:
            return
        family = CounterMetricFamily(
            "edgewise_mqtt_telemetry_messages",
            "MQTT telemetry messages this replica received, by what became of them",
            labels=["outcome"],
        )
        for outcome in _MQTT_OUTCOMES:
            family.add_metric([outcome], float(getattr(stats, outcome)))
        family.add_metric(["failed_batches"], float(stats.failed_batches))
        yield family


class FleetCollector(Collector):
    """Fleet gauges computed at scrape time (cached briefly)."""

    def __init__(
        self,
        service: TelemetryService,
        online_window_s: float = 90.0,
        window_s: float = 600.0,
        cache_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Gauges over `service`'s database; `clock` is unix time."""
        self.service = service
        self.online_window_s = online_window_s
        self.window_s = window_s
        self.cache_s = cache_s
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, list[GaugeMetricFamily]] | None = None

    def describe(self) -> list[Any]:
        """Nothing up front: the families come from the database at scrape time."""
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The gauges (from cache when fresh)."""
        now = self.clock()
        with self._lock:
            if self._cached is None or now - self._cached[0] >= self.cache_s:
                self._cached = (now, self._families(now))
            families = self._cached[1]
        yield from families

    def _families(self, now: float) -> list[GaugeMetricFamily]:
        engine = self.service.engine
        dev, dp, al = cs.devices, cs.device_pipelines, tt.alerts
        with engine.connect() as c:
            by_status: list[Any] = list(
                c.execute(select(dev.c.status, func.count()).group_by(dev.c.status))
            )
            online = c.execute(
                select(func.count()).where(
                    dev.c.status == "active", dev.c.last_seen >= now - self.online_window_s
                )
            ).scalar()
            versions: list[Any] = list(
                c.execute(
                    select(dp.c.model, dp.c.version, func.count(func.distinct(dp.c.device_id)))
                    .where(dp.c.status == "active")
                    .group_by(dp.c.model, dp.c.version)
                )
            )
            alerts: list[Any] = list(
                c.execute(select(al.c.state, func.count()).group_by(al.c.state))
            )
        devices = GaugeMetricFamily(
            "edgewise_fleet_devices", "Enrolled devices by status", labels=["status"]
        )
        for status, n in by_status:
            devices.add_metric([str(status)], float(n))
        online_g = GaugeMetricFamily(
            "edgewise_fleet_devices_online", "Active devices seen within the online window"
        )
        online_g.add_metric([], float(online or 0))
        field = GaugeMetricFamily(
            "edgewise_fleet_model_devices",
            "Devices running a model version (reported active)",
            labels=["model", "version"],
        )
        for model, version, n in versions:
            field.add_metric([str(model), str(version)], float(n))
        open_alerts = GaugeMetricFamily("edgewise_alerts_open", "Alerts by state", labels=["state"])
        counts = {str(s): float(n) for s, n in alerts}
        for state in ("firing", "suppressed"):
            open_alerts.add_metric([state], counts.get(state, 0.0))
        return [devices, online_g, field, open_alerts, *self._sli(now)]

    def _sli(self, now: float) -> list[GaugeMetricFamily]:
        rows = self.service.fleet_health(by="model", window_s=self.window_s, now=now)
        ratio = GaugeMetricFamily(
            "edgewise_fleet_success_ratio", "Share of requests served", labels=["model"]
        )
        requests = GaugeMetricFamily(
            "edgewise_fleet_requests", "Requests counted in the window", labels=["model"]
        )
        latency = GaugeMetricFamily(
            "edgewise_fleet_latency_seconds",
            "End-to-end latency percentiles from merged histograms",
            labels=["model", "percentile"],
        )
        drift = GaugeMetricFamily(
            "edgewise_fleet_drift_score", "Input drift score (1 = alarm level)", labels=["model"]
        )
        age = GaugeMetricFamily(
            "edgewise_fleet_telemetry_age_seconds",
            "Age of the newest telemetry window",
            labels=["model"],
        )
        for r in rows:
            model = str(r["group"])
            requests.add_metric([model], float(r["requests"]))
            if r["success_rate"] is not None:
                ratio.add_metric([model], float(r["success_rate"]))
            for p, key in (("p50", "p50_ms"), ("p95", "p95_ms"), ("p99", "p99_ms")):
                if r[key] is not None:
                    latency.add_metric([model, p], float(r[key]) / 1000.0)
            if r["drift_score"] is not None:
                drift.add_metric([model], float(r["drift_score"]))
            if r["freshness_s"] is not None:
                age.add_metric([model], float(r["freshness_s"]))
        return [ratio, requests, latency, drift, age]
