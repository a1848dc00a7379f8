"""The egress gate for records that apps on the device hand to the agent.

Windows built by the agent pass the egress filter when they close; records posted to
the local `POST /telemetry` endpoint come from elsewhere and pass here instead, so
nothing outside the policy enters the buffer (and so nothing outside it leaves):

    gate = EgressGate(EgressPolicy.from_desired(desired.egress), clock=time.time)
    kept = gate.admit([("sample", "input", {"input": [...], "confidence": 0.4}, ts)])

Events and metrics are kept, trimmed or dropped by `filter_payload` (groups and
redaction). A sample is raw data: besides the groups and redaction it must be triggered
by the capture policy (low confidence, the random rate) and fit the capture budget, the
same rules that govern inputs the agent captures itself.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from edgewise.protocol import CaptureBudget, EgressPolicy, decide_capture, filter_payload

__all__ = ["EgressGate"]

NewRecord = tuple[str, str, dict[str, Any], float]


class EgressGate:
    """Admits local records under one egress policy, keeping the capture budget."""

    def __init__(
        self,
        policy: EgressPolicy | None = None,
        clock: Callable[[], float] | None = None,
        draw: Callable[[], float] | None = None,
    ) -> None:
        """Gate under `policy` (default: the default policy, no capture).

        Args:
            policy: The egress policy in force.
            clock: Device clock for the capture budget (default: wall time).
            draw: Uniform [0, 1) numbers for the capture rate (default: `random.random`).
        """
        self.policy = policy or EgressPolicy()
        self.clock = clock or time.time
        self.draw = draw or random.random
        self.budget = CaptureBudget()
        self.refused: dict[str, int] = {}

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def admit(self, records: Iterable[NewRecord]) -> list[NewRecord]:
        """The records as they may be buffered (dropped, trimmed or redacted by policy)."""
        out: list[NewRecord] = []
        for cls, kind, data, ts in records:
            kept = filter_payload(self.policy, cls, kind, data)
            if kept is None:
                self._refuse(f"{cls} not allowed")
                continue
            if cls == "sample":
                conf = kept.get("confidence")
                confidence = float(conf) if isinstance(conf, int | float) else None
                size = len(json.dumps(kept, separators=(",", ":"), default=str))
                decision, self.budget = decide_capture(
                    self.policy, self.budget, self.clock(), size, self.draw(), confidence
                )
                if not decision.capture:
                    self._refuse(decision.reason)
                    continue
                kept["trigger"] = decision.reason
            out.append((cls, kind, kept, ts))
        return out
