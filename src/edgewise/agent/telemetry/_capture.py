"""Raw input capture under the egress policy: hard examples and random samples, in budget.

The decisions are `edgewise.protocol.decide_capture` (pure); this class holds the budget
between calls, draws the random numbers from an injected generator, and builds the
sample payloads, redacted by the policy before anyone else sees them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edgewise.protocol import CaptureBudget, EgressPolicy, decide_capture, filter_payload

__all__ = ["SampleCapture"]

# Digits of a captured float: enough to reproduce a model's input, not a byte more.
_DIGITS = 6


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return np.round(value.astype(np.float64), _DIGITS).tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


class SampleCapture:
    """Captures raw inputs of one pipeline where, and only where, the policy allows."""

    def __init__(
        self,
        pipeline: str,
        policy: EgressPolicy,
        clock: Callable[[], float],
        input_name: str = "input",
        seed: int | None = None,
    ) -> None:
        """Capture for `pipeline` under `policy`; `seed` fixes the random draws."""
        self.pipeline = pipeline
        self.policy = policy
        self.clock = clock
        self.input_name = input_name
        self.budget = CaptureBudget()
        self.refused: dict[str, int] = {}
        self._rng = np.random.default_rng(seed)

    def offer(
        self,
        inputs: Sequence[Any] | np.ndarray,
        confidences: Sequence[float | None],
        labels: Sequence[str | None],
        drift_score: float | None = None,
        model: str = "",
    ) -> list[dict[str, Any]]:
        """Offer a batch; returns the sample payloads to buffer (cls "sample", kind "input").

        Args:
            inputs: One input per row: an array row, or a mapping of named fields.
            confidences: Top-1 confidence per row.
            labels: Predicted label per row.
            drift_score: The pipeline's latest drift score (drift trigger).
            model: The model key that served the rows.
        """
        if not self.policy.allows("samples"):
            return []  # the common case: one check, no per-row work
        now = self.clock()
        out = []
        draws = self._rng.random(len(confidences))
        for i, (conf, label) in enumerate(zip(confidences, labels, strict=True)):
            row = inputs[i]
            fields = row if isinstance(row, Mapping) else {self.input_name: row}
            payload = {
                "pipeline": self.pipeline,
                "model": model,
                "input": _plain(fields),
                "label": label,
                "confidence": None if conf is None else round(float(conf), _DIGITS),
            }
            kept = filter_payload(self.policy, "sample", "input", payload)
            if kept is None:
                continue
            size = len(json.dumps(kept, separators=(",", ":")))
            decision, self.budget = decide_capture(
                self.policy, self.budget, now, size, float(draws[i]), conf, drift_score
            )
            if not decision.capture:
                self.refused[decision.reason] = self.refused.get(decision.reason, 0) + 1
                continue
            kept["trigger"] = decision.reason
            out.append(kept)
        return out
