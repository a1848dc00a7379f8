"""The fleet simulator: many simulated devices in one process, speaking the real protocol.

Usage::

    from edgewise.sim import Faults, Fleet
    async with Fleet(url, 1000, seed=1, admin_token=token, faults=Faults(flaky=0.05)) as f:
        await f.run_until(lambda f: f.count_running("digits-mlp@1.1.0") == 1000, 120)

Modules: `_profile` (labels and per-device random streams, pure), `_behaviour` (model
version behaviour and telemetry windows, pure), `_faults` (fault rates and the faulty
transport), `_artifacts` (bundle verdicts per digest), `_download` (ranged, resumable
artifact fetch), `_env` (what devices share), `_pipes` (a device's pipelines and report),
`_device` (one device), `_fleet` (the fleet).
"""

from edgewise.sim._artifacts import ArtifactBook, ArtifactInfo
from edgewise.sim._behaviour import (
    CONFIDENCE_EDGES,
    LATENCY_BOUNDS_MS,
    REGRESSED,
    BehaviourBook,
    ModelBehaviour,
    synth_window,
)
from edgewise.sim._device import SimDevice
from edgewise.sim._env import FleetStats, SimEnv
from edgewise.sim._faults import Faults, FaultyTransport
from edgewise.sim._fleet import Fleet, default_capabilities, run
from edgewise.sim._profile import (
    DeviceProfile,
    LabelSpec,
    assign_labels,
    device_rng,
    parse_labels,
    plan_fleet,
)

__all__ = [
    "CONFIDENCE_EDGES",
    "LATENCY_BOUNDS_MS",
    "REGRESSED",
    "ArtifactBook",
    "ArtifactInfo",
    "BehaviourBook",
    "DeviceProfile",
    "Faults",
    "FaultyTransport",
    "Fleet",
    "FleetStats",
    "LabelSpec",
    "ModelBehaviour",
    "SimDevice",
    "SimEnv",
    "assign_labels",
    "default_capabilities",
    "device_rng",
    "parse_labels",
    "plan_fleet",
    "run",
    "synth_window",
]
