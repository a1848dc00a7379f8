"""Resource readings for telemetry windows: CPU, memory, temperature, throttling.

Each reading comes from a reader passed in (defaults read the real device), so tests
and the fleet simulator plug in their own values. A reader that fails or does not
apply on this device yields None rather than an exception: a missing thermal zone must
not cost a telemetry window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgewise.runtime import read_cpu_percent, read_thermal_c

__all__ = ["ResourceReaders", "read_memory", "read_throttled"]

# Below this share of its maximum frequency a CPU is taken to be throttled.
_THROTTLE_FREQ_RATIO = 0.8


def read_memory() -> dict[str, float] | None:
    """System memory use in percent and this process's resident size in MB (psutil)."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        rss = psutil.Process().memory_info().rss
    except Exception:  # psutil may be denied /proc on locked-down devices
        return None
    return {"memory_percent": float(vm.percent), "rss_mb": round(rss / 2**20, 2)}


def read_throttled(root: Path = Path("/sys/devices/system/cpu")) -> bool | None:
    """Whether any CPU runs well below its maximum frequency (None: no cpufreq here)."""
    seen = False
    for cpu in root.glob("cpu[0-9]*/cpufreq"):
        try:
            cur = int((cpu / "scaling_cur_freq").read_text().strip())
            top = int((cpu / "cpuinfo_max_freq").read_text().strip())
        except (OSError, ValueError):
            continue
        seen = True
        if top > 0 and cur < _THROTTLE_FREQ_RATIO * top:
            return True
    return False if seen else None


def _safe(reader: Callable[[], Any]) -> Any:
    try:
        return reader()
    except Exception:  # a broken reader costs its field, never the window
        return None


@dataclass
class ResourceReaders:
    """Where resource readings come from; every reader is injectable.

    Attributes:
        cpu: CPU use in percent.
        memory: Memory figures (`read_memory`'s shape).
        thermal: Hottest thermal zone in degrees C.
        throttled: Frequency throttling flag.
        accelerators: Per-accelerator figures (utilisation, memory), if any.
        throttle_c: Temperature at or above which the device counts as throttled even
            where cpufreq says nothing.
    """

    cpu: Callable[[], float | None] = read_cpu_percent
    memory: Callable[[], dict[str, float] | None] = read_memory
    thermal: Callable[[], float | None] = read_thermal_c
    throttled: Callable[[], bool | None] = read_throttled
    accelerators: Callable[[], dict[str, Any] | None] = field(default=lambda: None)
    throttle_c: float = 85.0

    def read(self) -> dict[str, Any]:
        """One reading of everything, JSON-ready; unavailable readings are None."""
        temp = _safe(self.thermal)
        throttled = _safe(self.throttled)
        if temp is not None and temp >= self.throttle_c:
            throttled = True
        out: dict[str, Any] = {
            "cpu_percent": _safe(self.cpu),
            "temperature_c": temp,
            "throttled": throttled,
        }
        out.update(_safe(self.memory) or {"memory_percent": None, "rss_mb": None})
        acc = _safe(self.accelerators)
        if acc:
            out["accelerators"] = acc
        return out
