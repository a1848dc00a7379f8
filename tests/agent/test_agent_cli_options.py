"""`edgewise agent` option values: a bad one is refused, named, before anything starts.

The command runs in-process with `Agent` replaced by a stub that records its config, so
an accepted value shows up there and a refused one never gets that far.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

import edgewise.agent
from edgewise.cli import main


class _StubAgent:
    """Stands in for `Agent`: records the config and returns at once from `run`."""

    configs: ClassVar[list[Any]] = []

    def __init__(self, config: Any) -> None:
        self.configs.append(config)

    def run(self, stop: object, ready: object = None) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Configs of the agents the command started (none, when it refused)."""
    monkeypatch.setattr(edgewise.agent, "Agent", _StubAgent)
    monkeypatch.setattr(_StubAgent, "configs", [])
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's handlers
    return _StubAgent.configs


def _agent(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> tuple[int, str]:
    """Run `edgewise agent ARGS` (data under `tmp_path` unless given); exit code, stderr."""
    data = [] if "--data" in args else ["--data", str(tmp_path / "d")]
    old = sys.argv
    sys.argv = ["edgewise", "agent", "--server", "http://127.0.0.1:1", *data, *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "refused", "accepted"),
    [
        ("--local-port", ["-1", "70000"], ["0", "65535"]),
        ("--local-busy-poll-us", ["-5", "1e308"], ["0", "100000"]),
        ("--poll-interval", ["0", "-1", "1e300"], ["1", "86400"]),
        ("--telemetry-budget-mb", ["-5", "0", "1e308"], ["0.1", "1048576"]),
        ("--telemetry-rate", ["0", "-1", "1e308"], ["0.01", "1000000"]),
        ("--disk-reserve-mb", ["-1", "1e308"], ["0", "1e12"]),
        ("--metrics-interval", ["0", "-1", "1e308"], ["1", "86400"]),
    ],
)
def test_a_number_outside_its_range_is_refused_naming_the_option(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    started: list[Any],
    flag: str,
    refused: list[str],
    accepted: list[str],
) -> None:
    for value in refused:
        code, err = _agent(capsys, tmp_path, flag, value)
        assert code != 0 and flag in err and "Traceback" not in err, (value, err)
        assert not started, value
    for value in accepted:
        code, err = _agent(capsys, tmp_path, flag, value)
        assert code == 0, (value, err)
    assert len(started) == len(accepted)


@pytest.mark.parametrize("value", ["-5", "0.5", "1e300"])
def test_a_poll_wait_that_is_not_off_nor_a_second_to_a_day_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, started: list[Any], value: str
) -> None:
    code, err = _agent(capsys, tmp_path, "--poll-wait", value)
    assert code == 1 and not started
    use = "use 0 (off) or 1 to 86400 seconds"
    assert err == f"error: --poll-wait {float(value):g} is out of range: {use}\n"


def test_a_poll_wait_of_0_or_a_second_to_a_day_is_taken(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, started: list[Any]
) -> None:
    for value in ["0", "1", "86400"]:
        code, err = _agent(capsys, tmp_path, "--poll-wait", value, "--poll-interval", "1")
        assert code == 0, err
    assert [c.poll_wait_s for c in started] == [0, 1, 86400]
    assert _agent(capsys, tmp_path, "--poll-wait", "0", "--poll-interval", "0")[0] == 2
    assert len(started) == 3


def test_data_that_is_a_file_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, started: list[Any]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    code, err = _agent(capsys, tmp_path, "--data", str(afile))
    assert (code, err) == (1, f"error: --data {afile} is a file, not a directory\n")
    code, err = _agent(capsys, tmp_path, "--data", str(afile / "sub"))
    assert (
        code == 1 and err == f"error: --data {afile / 'sub'}: {afile} is a file, not a directory\n"
    )
    assert not started


def test_empty_data_is_refused_not_taken_as_the_current_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, started: list[Any]
) -> None:
    code, err = _agent(capsys, tmp_path, "--data", "")
    assert (code, err) == (1, "error: --data must not be empty\n")
    assert not started


def test_a_server_that_is_not_an_http_url_with_a_host_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, started: list[Any]
) -> None:
    for value in ("notaurl", "ftp://cp.example", "http://", "127.0.0.1:8080"):
        code, err = _agent(capsys, tmp_path, "--server", value)
        expected = f"error: --server {value!r} is not an http:// or https:// URL with a host\n"
        assert (code, err) == (1, expected), value
    assert not started
    for value in ("http://127.0.0.1:8080", "https://cp.example:8443/edge"):
        assert _agent(capsys, tmp_path, "--server", value)[0] == 0
    assert [c.server for c in started] == ["http://127.0.0.1:8080", "https://cp.example:8443/edge"]
