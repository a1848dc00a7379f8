"""Plugging telemetry into the control-plane application (one call from `create_app`).

`install_telemetry(app, plane, registry)` adds the `/api/v1` telemetry routes, the fleet
gauges on `/metrics`, the ingest budget for `POST /device/v1/telemetry`, and, for the
application's lifetime, the background work: alert evaluation with webhooks every
`alert_interval_s`, the retention job every `retention_interval_s`, and, when a broker
is configured, the MQTT consumer, whose connection also pushes desired-state changes to
devices (`ControlPlane.on_desired`).

Configuration (`TelemetryConfig`) comes from the environment unless passed in:
`EDGEWISE_TELEMETRY_BUDGET` (records/s admitted per control plane, 0 = unlimited),
`EDGEWISE_MQTT` (`host:port` of the broker for MQTT ingest and pushes), `EDGEWISE_ALERT_WEBHOOK`
(the default webhook for rules without one), `EDGEWISE_ALERT_INTERVAL_S`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgewise.control.telemetry._admission import IngestBudget
from edgewise.control.telemetry._alerts import ActiveRollout
from edgewise.control.telemetry._group import GroupCommit
from edgewise.control.telemetry._ingest import TelemetryIngest
from edgewise.control.telemetry._metrics import FleetCollector, MqttCollector
from edgewise.control.telemetry._retention import RetentionPolicy
from edgewise.control.telemetry._service import TelemetryService

__all__ = ["TelemetryConfig", "TelemetryRuntime", "install_telemetry", "stored_active_rollouts"]

log = logging.getLogger("edgewise.control.telemetry")

# A spec vocabulary no device names any more is forgotten once not sent for this long.
VOCABULARY_KEEP_S = 86_400.0


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    try:
        return float(env.get(name, "") or default)
    except ValueError:
        return default


@dataclass(frozen=True)
class TelemetryConfig:
    """Telemetry settings of one control plane."""

    ingest_budget_per_s: float = 0.0  # 0: unlimited
    mqtt: str = ""  # "host:port", empty: no MQTT ingest
    default_webhook: str | None = None
    alert_interval_s: float = 30.0
    retention_interval_s: float = 3600.0
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TelemetryConfig:
        """Read the `EDGEWISE_*` variables (module doc)."""
        e = os.environ if env is None else env
        return cls(
            ingest_budget_per_s=max(0.0, _env_float(e, "EDGEWISE_TELEMETRY_BUDGET", 0.0)),
            mqtt=e.get("EDGEWISE_MQTT", ""),
            default_webhook=e.get("EDGEWISE_ALERT_WEBHOOK") or None,
            alert_interval_s=max(1.0, _env_float(e, "EDGEWISE_ALERT_INTERVAL_S", 30.0)),
        )


def stored_active_rollouts(engine: Any) -> list[ActiveRollout]:
    """Active rollouts (`rollouts.active_key` set) and the devices each has moved."""
    from sqlalchemy import select

    from edgewise.control import _schema as cs

    r, a = cs.rollouts, cs.rollout_assignments
    with engine.connect() as c:
        rows: list[Any] = list(
            c.execute(
                select(r.c.id, a.c.device_id)
                .join(a, a.c.rollout_id == r.c.id, isouter=True)
                .where(r.c.active_key.is_not(None))
            )
        )
    devices: dict[str, set[str]] = {}
    for rollout_id, device_id in rows:
        devices.setdefault(str(rollout_id), set())
        if device_id is not None:
            devices[str(rollout_id)].add(str(device_id))
    return [ActiveRollout(k, frozenset(v)) for k, v in sorted(devices.items())]


class TelemetryRuntime:
    """The telemetry parts of one running control plane and their background thread."""

    def __init__(
        self,
        plane: Any,
        config: TelemetryConfig,
        active_rollouts: Callable[[], Sequence[ActiveRollout]] | None = None,
    ) -> None:
        """Build the parts over `plane.store.engine` with `plane.clock`."""
        engine = plane.store.engine
        self.plane = plane
        self.config = config
        self.ingest = TelemetryIngest(
            engine, clock=plane.clock, max_skew_s=plane.settings.max_skew_s
        )
        self.writer = GroupCommit(self.ingest)  # HTTP uploads share transactions
        self.service = TelemetryService(
            engine, clock=plane.clock, default_webhook=config.default_webhook
        )
        self.budget = (
            IngestBudget(config.ingest_budget_per_s) if config.ingest_budget_per_s > 0 else None
        )
        self.active_rollouts = active_rollouts or (lambda: stored_active_rollouts(engine))
        self.mqtt: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def verify_mqtt(self, headers: Mapping[str, str], topic: str, body: bytes) -> str:
        """Check a device-signed MQTT message like a signed HTTP request (method MQTT)."""
        device_id = self.plane.device_id_of(headers)
        device = self.plane.load_device(device_id)
        return str(self.plane.check_device_request(device, headers, "MQTT", topic, body))

    def admit(self, records: int) -> float:
        """0 when a batch of `records` may be ingested now, else the Retry-After seconds."""
        return 0.0 if self.budget is None else self.budget.admit(records)

    def evaluate_once(self) -> None:
        """One alert round: evaluate, store, notify."""
        changes = self.service.evaluate_alerts(active_rollouts=self.active_rollouts())
        self.service.notify(changes)

    def retention_round(self, policy: RetentionPolicy | None = None) -> dict[str, int]:
        """Downsample and expire telemetry, and forget unused spec vocabularies."""
        done = self.service.run_retention(policy or self.config.retention)
        before = self.plane.clock() - VOCABULARY_KEEP_S
        return done | {"vocabularies_deleted": self.plane.store.prune_vocabularies(before)}

    def _loop(self) -> None:
        next_retention = 0.0
        while not self._stop.wait(self.config.alert_interval_s):
            try:
                self.evaluate_once()
                if self.plane.clock() >= next_retention:
                    self.retention_round()
                    next_retention = self.plane.clock() + self.config.retention_interval_s
            except Exception:  # a database hiccup must not end the loop
                log.exception("telemetry background round failed")

    def start(self) -> None:
        """Start the background round and, if configured, the MQTT consumer."""
        if self.config.mqtt:
            from edgewise.control.telemetry._mqtt import MqttIngest

            host, _, port = self.config.mqtt.rpartition(":")
            self.mqtt = MqttIngest(
                self.ingest,
                self.verify_mqtt,
                host or "127.0.0.1",
                int(port),
                ack_key=self.plane.key,
            )
            try:
                self.mqtt.start()
            except (ConnectionError, OSError):
                log.exception("MQTT telemetry ingest unavailable")
                self.mqtt = None
            else:
                self.plane.on_desired.append(self.mqtt.push_desired)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background round and the MQTT consumer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.mqtt is not None:
            with contextlib.suppress(ValueError):
                self.plane.on_desired.remove(self.mqtt.push_desired)
            self.mqtt.stop()
            self.mqtt = None


def install_telemetry(
    app: Any,
    plane: Any,
    registry: Any,
    config: TelemetryConfig | None = None,
    background: bool = True,
) -> TelemetryRuntime:
    """Add telemetry to a control-plane FastAPI app (routes, gauges, lifetime tasks)."""
    from edgewise.control.telemetry._api import router

    runtime = TelemetryRuntime(plane, config or TelemetryConfig.from_env())
    app.state.telemetry = runtime.service
    app.state.telemetry_runtime = runtime
    app.state.retention = runtime.config.retention
    app.state.active_rollouts = lambda: runtime.active_rollouts()
    app.include_router(router)
    registry.register(
        FleetCollector(
            runtime.service, online_window_s=plane.settings.online_window_s, clock=plane.clock
        )
    )
    registry.register(MqttCollector(lambda: runtime.mqtt.stats if runtime.mqtt else None))
    if background:
        outer = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(a: Any) -> AsyncIterator[Any]:
            async with outer(a) as state:
                runtime.start()
                # Everything built at start-up (routes, schemas, models, caches) lives as
                # long as the process: moved out of the collector's reach, it is not
                # rescanned by every full collection that decoding uploads triggers
                # (those cost more than the decoding itself on a server-sized heap).
                gc.freeze()
                try:
                    yield state
                finally:
                    runtime.stop()

        app.router.lifespan_context = lifespan
    return runtime
