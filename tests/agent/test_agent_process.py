"""Process-level tuning of the agent: onnxruntime's own telemetry stays off by default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgewise.agent._process import quiet_onnxruntime


def test_quiet_onnxruntime_turns_telemetry_off_when_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    quiet_onnxruntime()
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"


def test_quiet_onnxruntime_keeps_an_operators_explicit_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "0")
    quiet_onnxruntime()
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "0"


@pytest.mark.skipif(sys.platform != "linux", reason="counts threads in /proc")
def test_onnxruntime_imported_after_quieting_starts_no_telemetry_thread() -> None:
    # onnxruntime's telemetry runs a dispatcher thread from import on: one thread fewer
    # in a fresh interpreter is the observable difference.
    code = (
        "import os, sys, threading\n"
        "if sys.argv[1] == 'quiet':\n"
        "    from edgewise.agent._process import quiet_onnxruntime\n"
        "    quiet_onnxruntime()\n"
        "import numpy\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "import onnxruntime\n"
        "print(len(os.listdir('/proc/self/task')) - before)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env["OPENBLAS_NUM_THREADS"] = "1"

    def new_threads(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", code, mode],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=120,
        )
        return int(out.stdout.strip().splitlines()[-1])

    default = new_threads("default")
    if default == 0:
        pytest.skip("this onnxruntime build starts no telemetry thread")
    assert new_threads("quiet") < default
