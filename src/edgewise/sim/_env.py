"""What every simulated device of one fleet shares: the connection pool, settings, counters."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgewise.sim._artifacts import ArtifactBook
from edgewise.sim._behaviour import BehaviourBook
from edgewise.sim._faults import Faults

__all__ = ["FleetStats", "SimEnv"]


@dataclass
class FleetStats:
    """Counters shared by every device of a fleet."""

    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    installs: int = 0
    install_failures: int = 0
    crashes: int = 0
    downloads: int = 0
    cut_downloads: int = 0
    slow_downloads: int = 0
    bytes_downloaded: int = 0
    telemetry_records: int = 0
    telemetry_dropped: int = 0


@dataclass
class SimEnv:
    """What every device of one fleet shares.

    `http` is the fleet's own client (operator calls); `http_for(index)` gives a device
    the client of its shard (see `Fleet`), or `http` when there are no shards.
    """

    http: Any  # httpx.AsyncClient
    seed: int
    book: BehaviourBook
    faults: Faults
    artifacts: ArtifactBook
    stats: FleetStats = field(default_factory=FleetStats)
    time_scale: float = 1.0
    window_s: float | None = None
    first_window_s: float | None = None
    inference_rate: float = 2.0
    poll_wait_s: float | None = None
    report_progress: bool = True
    capabilities: dict[str, Any] = field(default_factory=dict)
    shard: Callable[[int], Any] | None = None

    def http_for(self, index: int) -> Any:
        """The HTTP client device `index` sends through."""
        return self.shard(index) if self.shard is not None else self.http
