"""The device agent: enrollment, reconcile loop, A/B model store, telemetry buffer, uplink.

Run it with `edgewise agent --server URL --enroll-token T --data DIR`. In code::

    from edgewise.agent import Agent, AgentConfig
    agent = Agent(AgentConfig(data_dir=Path("dev1"), server=url, enroll_token=token))
    agent.run(stop_event)

The fleet simulator reuses the client side: `DeviceClient` / `AsyncDeviceClient` speak
`/device/v1` (signed requests), `TelemetryBuffer` is the durable buffer, `plan` is the
pure reconcile decision, and `Backoff` the retry policy every uplink shares.
"""

from edgewise.agent import _slim  # noqa: F401  (first: trims what httpx imports)
from edgewise.agent._agent import AGENT_VERSION, Agent, AgentConfig
from edgewise.agent._backoff import Backoff, GiveUp, RetryableError
from edgewise.agent._buffer import TelemetryBuffer
from edgewise.agent._capabilities import collect_capabilities
from edgewise.agent._client import (
    AsyncDeviceClient,
    DesiredPoll,
    DeviceAuthError,
    DeviceClient,
    DeviceKey,
    ResponseTooLarge,
    UplinkError,
)
from edgewise.agent._crash import CRASH_POINTS, crashpoint
from edgewise.agent._durable import DurableJson, atomic_write_bytes
from edgewise.agent._fetch import (
    ArtifactCache,
    ArtifactSource,
    FetchError,
    FetchResult,
    HttpArtifactSource,
    InsufficientDisk,
)
from edgewise.agent._host import Health, Host, RuntimeHost
from edgewise.agent._install import (
    INSTALL_TRANSITIONS,
    IllegalTransition,
    InstallState,
    InstallTracker,
    is_valid_transition,
)
from edgewise.agent._plan import Action, ObservedPipeline, fingerprint, plan
from edgewise.agent._ratelimit import TokenBucket
from edgewise.agent._store import ModelStore, SlotInfo, StoreError

__all__ = [
    "AGENT_VERSION",
    "CRASH_POINTS",
    "INSTALL_TRANSITIONS",
    "Action",
    "Agent",
    "AgentConfig",
    "ArtifactCache",
    "ArtifactSource",
    "AsyncDeviceClient",
    "Backoff",
    "DesiredPoll",
    "DeviceAuthError",
    "DeviceClient",
    "DeviceKey",
    "DurableJson",
    "FetchError",
    "FetchResult",
    "GiveUp",
    "Health",
    "Host",
    "HttpArtifactSource",
    "IllegalTransition",
    "InstallState",
    "InstallTracker",
    "InsufficientDisk",
    "ModelStore",
    "ObservedPipeline",
    "ResponseTooLarge",
    "RetryableError",
    "RuntimeHost",
    "SlotInfo",
    "StoreError",
    "TelemetryBuffer",
    "TokenBucket",
    "UplinkError",
    "atomic_write_bytes",
    "collect_capabilities",
    "crashpoint",
    "fingerprint",
    "is_valid_transition",
    "plan",
]
