"""Process-level tuning and readings for a long-running agent on a small device."""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "cold_ranges",
    "drop_cold_pages",
    "quiet_onnxruntime",
    "resources",
    "trim",
    "trim_malloc",
    "tune_malloc",
]

_MADV_DONTNEED = 4


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


def cold_ranges(smaps: str) -> list[tuple[int, int, int]]:
    """Mappings whose resident pages are all clean copies of a file, from /proc/PID/smaps.

    Such a page holds what the file holds: dropping it from this process's page table
    loses nothing, and the next touch maps it again from the page cache (or the file),
    as after the kernel reclaims it under memory pressure. Kept out: anything writable
    or shared, anything with a page this process changed (private dirty, anonymous or
    swapped: relocated data, for one), and what is not a regular file (devices, memfd,
    deleted files, the vdso).

    Returns:
        (start, end, resident bytes) per such mapping that has pages resident.
    """
    out: list[tuple[int, int, int]] = []
    head: tuple[int, int] | None = None
    rss = changed = 0

    def close() -> None:
        if head is not None and rss and not changed:
            out.append((*head, rss))

    for line in smaps.splitlines():
        field, _, rest = line.partition(" ")
        if field.endswith(":"):
            if head is None:
                continue
            if field == "Rss:":
                rss = int(rest.split()[0]) * 1024
            elif field in ("Private_Dirty:", "Anonymous:", "Swap:"):
                changed |= int(rest.split()[0])
            continue
        close()
        parts = line.split(maxsplit=5)
        path = parts[5] if len(parts) > 5 else ""
        perms = parts[1] if len(parts) > 1 else ""
        regular = path.startswith("/") and not path.startswith(("/dev/", "/memfd:"))
        if regular and "(deleted)" not in path and perms[1:2] == "-" and perms[3:] == "p":
            start, _, end = field.partition("-")
            head = (int(start, 16), int(end, 16))
        else:
            head = None
        rss = changed = 0
    close()
    return out


def drop_cold_pages() -> int:
    """Unmap this process's clean file-backed pages (library code, read-only data).

    Importing onnxruntime runs its static initialisers across its 28 MB of code and
    leaves ~18 MB of it resident that serving never touches again; numpy, cryptography
    and pydantic do the same at a smaller scale. After a start or a model load, this
    hands those pages back; what the agent still uses comes back on its first touch.
    Linux only; returns the resident bytes dropped (0 where it cannot).
    """
    try:
        import ctypes

        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
            ranges = cold_ranges(f.read())
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return 0
    dropped = 0
    for start, end, rss in ranges:
        if madvise(start, end - start, _MADV_DONTNEED) == 0:
            dropped += rss
    return dropped


def trim() -> None:
    """After a start, model load or swap: return freed heap and cold library pages."""
    trim_malloc()
    drop_cold_pages()


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
