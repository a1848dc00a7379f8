"""The agent-facing hub: pipelines from the desired state, model swaps, policy on events."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from edgewise.agent.telemetry import PipelineInfo, ResourceReaders, TelemetryHub

from .conftest import Digits, FakeClock


def _hub(clock: FakeClock) -> TelemetryHub:
    readers = ResourceReaders(
        cpu=lambda: 1.0, memory=lambda: None, thermal=lambda: None, throttled=lambda: None
    )
    return TelemetryHub(window_s=10, clock=clock, readers=readers)


def test_hub_closes_due_windows_with_drift_from_the_manifest(digits: Digits) -> None:
    clock = FakeClock()
    hub = _hub(clock)
    hub.configure({}, {"digits": PipelineInfo("digits-mlp", "1.0.0", "dep-a", digits.manifest)})
    x = digits.split.x_test[:150]
    probs = digits.predict(x)
    for i in range(len(x)):
        hub.record(
            "digits",
            x[i : i + 1],
            SimpleNamespace(confidences=[float(probs[i].max())], labels=[str(probs[i].argmax())]),
        )
    assert hub.tick() == []  # not due yet
    clock.advance(10)
    stats = {"digits": {"nv_inference_request_success": 150}}
    (record,) = hub.tick(stats, uplink={"state": "online"})
    cls, kind, data, _ = record
    assert (cls, kind, data["deployment"]) == ("metric", "window", "dep-a")
    assert data["drift"]["samples"] == 150 and data["drift"]["sufficient"]
    assert data["resources"]["cpu_percent"] == 1.0


def test_model_swap_and_removal_close_the_open_window(digits: Digits) -> None:
    clock = FakeClock()
    hub = _hub(clock)
    hub.configure({}, {"p": PipelineInfo("m", "1", manifest=digits.manifest)})
    hub.record("p", np.zeros((1, 64)), SimpleNamespace(confidences=[0.9], labels=["0"]))
    hub.configure({}, {"p": PipelineInfo("m", "2", manifest=digits.manifest)})
    hub.configure({}, {})
    closed = hub.tick()
    assert [(d["version"], k) for _, k, d, _ in closed] == [("1", "window"), ("2", "window")]
    assert hub.windows == {}


def test_events_follow_the_policy_and_bad_policy_is_refused() -> None:
    hub = _hub(FakeClock())
    hub.configure({"groups": ["counts"]}, {})
    assert hub.event("install.failed", {"reason": "x"}) == []
    hub.configure({"redact": ["reason"]}, {})
    assert hub.event("install.failed", {"reason": "x", "model": "m"})[0][2] == {"model": "m"}
    with pytest.raises(ValidationError):
        hub.configure({"groups": "all"}, {})
