"""Process-level tuning of the agent: onnxruntime's own telemetry stays off by default;
clean library pages are handed back after a start or a model load."""

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


_SMAPS = """\
55d0a0000000-55d0a0001000 r--p 00000000 08:01 100 /usr/bin/python3.11
Rss:                   4 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd mr mw me
7f0000000000-7f0000800000 r-xp 00010000 08:01 200 /opt/lib/libort.so
Size:               8192 kB
Rss:                6000 kB
Private_Clean:         0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd ex mr mw me
7f0000800000-7f0000900000 r--p 00810000 08:01 200 /opt/lib/libort.so
Rss:                 352 kB
Private_Dirty:       352 kB
Anonymous:           352 kB
Swap:                  0 kB
7f0000900000-7f0000910000 rw-p 00910000 08:01 200 /opt/lib/libort.so
Rss:                  28 kB
Private_Dirty:        28 kB
7f0000a00000-7f0000b00000 r-xp 00000000 08:01 300 /opt/lib/swapped.so
Rss:                 100 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
Swap:                  8 kB
7f0000b00000-7f0000c00000 r--s 00000000 08:01 400 /opt/data/shared.bin
Rss:                  64 kB
Private_Dirty:         0 kB
7f0000c00000-7f0000d00000 r--p 00000000 00:05 500 /dev/nvidia0
Rss:                  64 kB
Private_Dirty:         0 kB
7f0000d00000-7f0000e00000 r--p 00000000 00:01 600 /memfd:weights (deleted)
Rss:                  64 kB
Private_Dirty:         0 kB
7f0000e00000-7f0000f00000 r--p 00000000 00:00 0
Rss:                  64 kB
Private_Dirty:         0 kB
7f0000f00000-7f0001000000 ---p 00000000 08:01 200 /opt/lib/libort.so
Rss:                   0 kB
Private_Dirty:         0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   8 kB
Private_Dirty:         0 kB
"""


def test_cold_ranges_are_clean_private_read_only_file_mappings_with_pages_resident() -> None:
    from edgewise.agent._process import cold_ranges

    # Kept out: relocated read-only data (private dirty), writable data, a mapping
    # with a page in swap, a shared mapping, a device, a memfd, anonymous memory, an
    # empty guard region and the vdso.
    assert cold_ranges(_SMAPS) == [
        (0x55D0A0000000, 0x55D0A0001000, 4 * 1024),
        (0x7F0000000000, 0x7F0000800000, 6000 * 1024),
    ]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")
def test_dropping_cold_pages_shrinks_rss_and_onnxruntime_still_serves() -> None:
    # A fresh interpreter that imported onnxruntime and ran a session: what it drops
    # is really gone from its RSS, and the session, numpy and the interpreter keep
    # working on the pages they touch again.
    code = (
        "import numpy as np, onnxruntime as ort, psutil\n"
        "from edgewise.agent._process import drop_cold_pages\n"
        "from edgewise.examples import load_split, train_mlp\n"
        "split = load_split()\n"
        "model, _ = train_mlp(split)\n"
        "s = ort.InferenceSession(model, providers=['CPUExecutionProvider'])\n"
        "x = split.x_test[:50].astype(np.float32)\n"
        "want = s.run(None, {'input': x})[0]\n"
        "rss = lambda: psutil.Process().memory_info().rss\n"
        "before = rss()\n"
        "dropped = drop_cold_pages()\n"
        "after = rss()\n"
        "got = s.run(None, {'input': x})[0]\n"
        "assert (got == want).all()\n"
        "print(dropped, before - after)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    dropped, shrunk = (int(v) for v in out.stdout.split())
    assert dropped > 10 * 2**20  # onnxruntime's code alone leaves more than that
    assert shrunk > dropped // 2
