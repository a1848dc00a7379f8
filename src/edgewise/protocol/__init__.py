"""The wire contract between the control plane and the agents.

`control/` and `agent/` are separate programs that may not import each other, yet they
must agree byte for byte on how a device signs a request, how a desired-state document is
signed, what a report and a telemetry batch hold, and what a pipeline spec means. That
contract lives here, in one leaf package that both import (it imports only `bundle`).

Modules: `_pipeline` (pipeline spec, owned with the runtime), `_stages` (the built-in
stages' parameters), `_auth` (device request signatures), `_desired` (desired-state
documents and reports), `_telemetry` (telemetry batches), `_egress` (what telemetry may
leave a device), `_vocabulary` (which spec terms an agent understands), `_trust` (the
signed trust root: publisher keys changed without re-enrolling).
"""

from edgewise.protocol import (
    _auth,
    _desired,
    _egress,
    _pipeline,
    _stages,
    _telemetry,
    _trust,
    _vocabulary,
)
from edgewise.protocol._auth import *  # noqa: F403
from edgewise.protocol._desired import *  # noqa: F403
from edgewise.protocol._egress import *  # noqa: F403
from edgewise.protocol._pipeline import *  # noqa: F403
from edgewise.protocol._stages import *  # noqa: F403
from edgewise.protocol._telemetry import *  # noqa: F403
from edgewise.protocol._trust import *  # noqa: F403
from edgewise.protocol._vocabulary import *  # noqa: F403

__all__ = sorted(
    [
        *_auth.__all__,
        *_desired.__all__,
        *_egress.__all__,
        *_pipeline.__all__,
        *_stages.__all__,
        *_telemetry.__all__,
        *_trust.__all__,
        *_vocabulary.__all__,
    ]
)
