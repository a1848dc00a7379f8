"""Process-level tuning and readings for a long-running agent on a small device."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["quiet_onnxruntime", "resources", "trim_malloc", "tune_malloc"]


def tune_malloc() -> None:
    """Cap glibc malloc arenas: each thread otherwise gets its own, and RSS grows with them.

    A device agent runs a handful of threads that allocate little; two arenas serve them
    without contention that matters, and keep the idle footprint inside its budget.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def quiet_onnxruntime() -> None:
    """Turn off onnxruntime's own usage telemetry before it is first imported.

    On Linux, onnxruntime >= 1.32 starts a telemetry system at import: an extra thread,
    a SQLite store under ~/.cache and about 2 MB of RSS, and upload attempts a device
    should not make. An operator who wants it sets ORT_DISABLE_TELEMETRY=0 explicitly.
    """
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def trim_malloc() -> None:
    """Give freed heap pages back to the OS (after a model load or swap)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resources() -> dict[str, Any]:
    """This process's RSS, CPU seconds and thread count (best effort)."""
    try:
        import psutil

        proc = psutil.Process(os.getpid())
        return {
            "rss_mb": round(proc.memory_info().rss / 1e6, 1),
            "cpu_s": round(sum(proc.cpu_times()[:2]), 2),
            "threads": proc.num_threads(),
        }
    except Exception:  # resource readings are best effort
        return {}
