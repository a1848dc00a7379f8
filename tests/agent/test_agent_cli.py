"""`edgewise agent` user errors: one line, exit 1, no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ._harness import EDGEWISE


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGEWISE, "agent", *args], capture_output=True, text=True, timeout=60)


def test_first_start_without_a_token_is_a_one_line_error(tmp_path: Path) -> None:
    out = _run("--server", "http://127.0.0.1:9", "--data", str(tmp_path / "d"))
    assert out.returncode == 1
    assert out.stderr.startswith("error:") and "--enroll-token" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("labels", ["novalue", "=x", "a=1,,=2"])
def test_bad_labels_are_refused(tmp_path: Path, labels: str) -> None:
    out = _run("--server", "http://x", "--data", str(tmp_path / "d"), "--labels", labels)
    assert out.returncode == 1 and "bad label" in out.stderr


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    from edgewise.agent._identity import load_or_create_key

    data = tmp_path / "d"
    data.mkdir()
    load_or_create_key(data)
    assert (data / "device.key").stat().st_mode & 0o777 == 0o600
    (data / "device.key").chmod(0o644)
    out = _run("--server", "http://127.0.0.1:9", "--data", str(data), "--enroll-token", "t")
    assert out.returncode == 1 and "chmod 600" in out.stderr


def test_a_negative_busy_poll_window_is_refused(tmp_path: Path) -> None:
    out = _run("--data", str(tmp_path / "d"), "--local-busy-poll-us", "-5")
    assert out.returncode == 2 and "--local-busy-poll-us" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "d").exists()
