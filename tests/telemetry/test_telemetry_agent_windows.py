"""The agent's window loop over a real runtime: drift from served inputs, egress on locals."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgewise.agent._host import RuntimeHost
from edgewise.agent._windows import TelemetryWindows
from edgewise.agent.telemetry import EgressGate
from edgewise.protocol import EgressPolicy

from .conftest import Digits, FakeClock

Record = tuple[str, str, dict[str, Any], float]


@pytest.fixture
def bundle_dir(tmp_path: Path, digits: Digits) -> Path:
    """digits-mlp 1.0.0 unpacked the way the model store keeps a slot."""
    (tmp_path / "manifest.json").write_text(json.dumps(digits.manifest))
    (tmp_path / str(digits.manifest["model"])).write_bytes(digits.model)
    return tmp_path


@pytest.fixture
def host() -> Iterator[RuntimeHost]:
    h = RuntimeHost(cores=1, monitor_interval_s=None)
    yield h
    h.close()


def _serve(host: RuntimeHost, bundle_dir: Path, **spec: Any) -> None:
    model = host.load(bundle_dir)
    host.serve(
        {"name": "digits", "model": {"name": "digits-mlp", "version": "1.0.0"}, **spec}, model, {}
    )


def _windows(
    host: RuntimeHost, bundle_dir: Path, clock: FakeClock, out: list[Record], egress: Any = None
) -> TelemetryWindows:
    return TelemetryWindows(
        host,
        out.extend,
        lambda name: (bundle_dir, "dep-a"),
        lambda: dict(egress or {}),
        lambda: True,
        lambda: 10.0,
        clock,
    )


def _infer_rows(host: RuntimeHost, windows: TelemetryWindows, x: np.ndarray) -> None:
    for i in range(len(x)):
        host.runtime.infer("digits", x[i : i + 1].astype(np.float32))
        if i % 40 == 39:  # the runtime keeps only the latest samples: pull as the loop does
            windows.tick()


def _window(records: list[Record]) -> dict[str, Any]:
    (data,) = [d for cls, kind, d, _ in records if kind == "window"]
    return data


def test_windows_carry_drift_counts_of_the_inputs_served_at_the_default_sample_rate(
    host: RuntimeHost, bundle_dir: Path, digits: Digits
) -> None:
    clock, out = FakeClock(), []
    _serve(host, bundle_dir, sample_rate=0.0)  # below the floor: the agent samples anyway
    windows = _windows(host, bundle_dir, clock, out)
    windows.tick()
    _infer_rows(host, windows, digits.split.x_test[:300])
    clock.advance(10)
    windows.tick()
    data = _window(out)
    assert data["counts"]["ok"] == 300 and data["deployment"] == "dep-a"
    assert sum(data["features"]["classes"]) == 30  # every 10th request's input
    assert sum(data["confidence"]["counts"]) == 300  # confidence of every request
    assert data["drift"]["samples"] == 30 and not data["drift"]["sufficient"]


def test_brightened_inputs_raise_a_drift_alarm_and_unshifted_ones_do_not(
    host: RuntimeHost, bundle_dir: Path, digits: Digits
) -> None:
    clock, out = FakeClock(), []
    _serve(host, bundle_dir, sample_rate=1.0)
    windows = _windows(host, bundle_dir, clock, out)
    windows.tick()
    x = digits.split.x_test[:200]
    _infer_rows(host, windows, x)
    clock.advance(10)
    windows.tick()
    calm = _window(out)
    assert calm["drift"]["sufficient"] and not calm["drift"]["drifted"]
    out.clear()
    _infer_rows(host, windows, np.clip(x * 1.6 + 4.0, 0.0, 16.0))
    clock.advance(10)
    windows.tick()
    shifted = _window(out)
    assert shifted["drift"]["drifted"]
    assert [k for _, k, _, _ in out if k.startswith("drift.")] == ["drift.alarm"]


def test_windows_follow_the_egress_policy_of_the_desired_state(
    host: RuntimeHost, bundle_dir: Path, digits: Digits
) -> None:
    clock, out = FakeClock(), []
    egress = {"groups": ["counts"], "redact": ["deployment"]}
    _serve(host, bundle_dir, sample_rate=1.0)
    windows = _windows(host, bundle_dir, clock, out, egress)
    windows.tick()
    _infer_rows(host, windows, digits.split.x_test[:50])
    clock.advance(10)
    windows.tick()
    data = _window(out)
    assert data["counts"]["ok"] == 50
    assert not {"drift", "features", "confidence", "latency", "resources"} & set(data)
    assert "deployment" not in data


def test_an_invalid_egress_policy_keeps_the_last_valid_one(
    host: RuntimeHost, bundle_dir: Path
) -> None:
    clock, out = FakeClock(), []
    egress: dict[str, Any] = {"groups": ["counts"]}
    _serve(host, bundle_dir)
    windows = _windows(host, bundle_dir, clock, out, egress)
    windows.egress = lambda: egress
    windows.tick()
    egress = {"groups": ["no-such-group"]}
    windows.tick()
    clock.advance(10)
    windows.tick()
    assert windows.policy_errors == 1
    assert set(_window(out)) & {"counts", "latency"} == {"counts"}


def test_a_stopped_pipeline_gets_its_last_window_closed(
    host: RuntimeHost, bundle_dir: Path, digits: Digits
) -> None:
    clock, out = FakeClock(), []
    _serve(host, bundle_dir)
    windows = _windows(host, bundle_dir, clock, out)
    windows.tick()
    _infer_rows(host, windows, digits.split.x_test[:5])
    windows.tick()
    host.stop("digits")
    windows.tick()
    assert _window(out)["model"] == "digits-mlp"
    out.clear()
    assert windows.tick() == 0 and out == []


def test_gate_keeps_events_and_drops_samples_when_capture_is_off() -> None:
    gate = EgressGate(EgressPolicy())
    kept = gate.admit(
        [
            ("event", "app.started", {"user": "x"}, 1.0),
            ("sample", "input", {"input": [1, 2]}, 1.0),
        ]
    )
    assert [k for _, k, _, _ in kept] == ["app.started"]
    assert gate.refused == {"sample not allowed": 1}


def test_gate_redacts_and_keeps_samples_within_the_capture_budget() -> None:
    policy = EgressPolicy.from_desired(
        {
            "groups": ["events", "samples"],
            "redact": ["user"],
            "capture": {"enabled": True, "rate": 1.0, "max_samples_per_hour": 2},
        }
    )
    gate = EgressGate(policy, clock=lambda: 1000.0, draw=lambda: 0.5)
    sample = ("sample", "input", {"input": [1, 2], "user": "alice"}, 1.0)
    kept = gate.admit([sample, sample, sample, ("metric", "app.rate", {"user": "b"}, 1.0)])
    assert [(c, d) for c, _, d, _ in kept] == [
        ("sample", {"input": [1, 2], "trigger": "sampled"}),
        ("sample", {"input": [1, 2], "trigger": "sampled"}),
        ("metric", {}),  # an app's own metric belongs to no group; redaction still holds
    ]
    assert gate.refused == {"hourly sample budget spent": 1}


def test_a_pipeline_with_a_parameter_its_stage_does_not_take_still_serves_and_says_so(
    host: RuntimeHost, bundle_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Deployed before the control plane refused such specs: an agent upgrade keeps it up.
    typo = {"type": "threshold", "params": {"min_conf": 0.9}}
    with caplog.at_level(logging.WARNING, logger="edgewise.agent._host"):
        _serve(host, bundle_dir, postprocess=[typo])
    assert host.running() == {"digits": "digits-mlp@1.0.0"}
    assert "unknown parameter 'min_conf'" in caplog.text
