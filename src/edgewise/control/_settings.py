"""Control-plane settings: one frozen object built by the CLI (or a test) and passed in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings:
    """Everything the service needs to know that is not in the database.

    Attributes:
        data_dir: signing key, artifacts and (by default) the SQLite database. Replicas
            on one PostgreSQL share it (a shared volume), so they share key and artifacts.
        db_url: SQLAlchemy URL; SQLite under `data_dir` when empty.
        desired_ttl_s: lifetime of a signed desired-state document. A fetch that finds the
            stored document past half its lifetime re-signs it (same revision, same
            content, fresh expiry) and answers 200 even to a matching If-None-Match, so
            an agent that polls keeps a valid document without a revision bump.
        max_skew_s: accepted device clock skew; nonces are remembered this long.
        poll_wait_s: long-poll wait agents are told to use.
        max_poll_wait_s: longest `?wait=` honoured.
        telemetry_window_s: telemetry window agents are told to use.
        max_body_bytes: request body limit (413 above it) except bundle uploads.
        max_upload_bytes: bundle upload limit.
        watch_interval_s: how often a replica re-reads device changes made by others.
        resync_interval_s: how often a replica compares every cached device with the
            store: the bound on how long a change the watcher missed (a commit that
            landed later than its look-back) can be served stale.
        online_window_s: a device seen within this window counts as online.
        allow_unsigned_models: registry policy: accept bundles without signatures.
        egress: the default egress policy put in every desired state.
        rollout_webhook: where rollout events an operator must hear about (paused,
            awaiting approval, completed, rolled back, aborted, failed) are posted as
            JSON; empty: nowhere (see `_outbox`).
    """

    data_dir: Path
    db_url: str = ""
    desired_ttl_s: float = 7 * 86400.0
    max_skew_s: float = 300.0
    poll_wait_s: int = 30
    max_poll_wait_s: float = 300.0
    telemetry_window_s: int = 60
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 1 << 30
    watch_interval_s: float = 0.5
    resync_interval_s: float = 30.0
    online_window_s: float = 90.0
    allow_unsigned_models: bool = False
    egress: dict[str, object] = field(default_factory=dict)
    rollout_webhook: str = ""

    @property
    def database_url(self) -> str:
        """The effective SQLAlchemy URL."""
        return self.db_url or f"sqlite:///{self.data_dir / 'edgewise.db'}"

    @property
    def artifacts_dir(self) -> Path:
        """Where bundles are stored, by sha256."""
        return self.data_dir / "artifacts"
