"""`edgewise demo` end to end: the story holds and no process outlives it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

EDGEWISE = str(Path(sys.executable).with_name("edgewise"))


def _mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if text in cmdline and proc.pid != os.getpid():
            found.append(proc)
    return found


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_demo_tells_the_whole_story_and_leaves_no_process_behind(tmp_path: Path) -> None:
    where = tmp_path / "demo"
    demo = subprocess.Popen(
        [EDGEWISE, "demo", "--json", "--devices", "20", "--dir", str(where)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = demo.communicate(timeout=360)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()

    assert demo.returncode == 0, err[-3000:]
    summary = json.loads(out)
    for key in (
        "canary_caught", "rollback_done", "int8_completed",
        "crash_recovered", "offline_served", "backfilled",
    ):  # fmt: skip
        assert summary[key] is True, (key, summary["chapters"])
    assert summary["devices"] == 23
    tripped = {g["name"] for g in summary["figures"]["canary_2_0_0"]["tripped"]}
    assert tripped, "the canary must name the gates that tripped"
    assert summary["figures"]["crash"]["exit_code"] == -9
    assert summary["admin_token"] and summary["console_url"].startswith("http://127.0.0.1:")

    assert _mentioning(str(where)) == []
    pids = [summary["control_plane"]["pid"], *(a["pid"] for a in summary["real_agents"])]
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def test_a_non_empty_directory_is_refused_without_starting_anything(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    result = subprocess.run(
        [EDGEWISE, "demo", "--json", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "not empty" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert _mentioning(str(tmp_path)) == []


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_sigterm_mid_story_stops_every_process_and_exits_130(tmp_path: Path) -> None:
    where = tmp_path / "demo"
    demo = subprocess.Popen(
        [EDGEWISE, "demo", "--devices", "3", "--dir", str(where)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 150
        # Wait until the real agents run: the story is then well under way.
        while not (where / "agents" / "lab-3" / "local.json").exists():
            assert demo.poll() is None, demo.stderr.read() if demo.stderr else ""
            assert time.monotonic() < deadline, "the agents never started"
            time.sleep(0.2)
        assert len(_mentioning(str(where))) >= 4  # control plane + three agents

        demo.send_signal(signal.SIGTERM)
        _, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()

    assert demo.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    assert _mentioning(str(where)) == []
