"""What every simulated device of one fleet shares: the connection pool, settings, counters."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgewise.protocol import spec_vocabulary, vocabulary_digest
from edgewise.sim._artifacts import ArtifactBook
from edgewise.sim._behaviour import BehaviourBook
from edgewise.sim._faults import Faults

__all__ = ["AgentBuild", "FleetStats", "SimEnv", "agent_build"]


@dataclass(frozen=True)
class AgentBuild:
    """The spec vocabulary one simulated agent build knows and reports."""

    terms: frozenset[str]
    sent: list[str]  # as reported, sorted
    digest: str


def agent_build(lacks: Sequence[str] = ()) -> AgentBuild:
    """This build's vocabulary, without the terms `lacks` names.

    Each takes what is under it along: `batching.overflow` takes
    `batching.overflow=drop_oldest`.
    """
    sent = [
        t
        for t in spec_vocabulary()
        if not any(t == p or t.startswith((f"{p}.", f"{p}=")) for p in lacks)
    ]
    return AgentBuild(frozenset(sent), sent, vocabulary_digest(sent))


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
    # What current agents and old ones (`Faults.old_agents`) know of pipeline specs.
    build: AgentBuild = field(default_factory=agent_build)
    old_build: AgentBuild = field(default_factory=agent_build)

    def __post_init__(self) -> None:
        if self.faults.old_agents:
            self.old_build = agent_build(self.faults.old_agent_lacks)

    def http_for(self, index: int) -> Any:
        """The HTTP client device `index` sends through."""
        return self.shard(index) if self.shard is not None else self.http
