"""What this device can do, collected once at enrollment and refreshed in reports.

Everything here reads the local machine; nothing fails hard: a probe that cannot read
its source reports nothing rather than stopping the agent.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

__all__ = ["collect_capabilities"]

_ACCELERATOR_PROVIDERS = {
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "tensorrt",
    "OpenVINOExecutionProvider": "openvino",
    "CoreMLExecutionProvider": "coreml",
    "DmlExecutionProvider": "directml",
    "ROCMExecutionProvider": "rocm",
    "QNNExecutionProvider": "qnn",
    "NnapiExecutionProvider": "nnapi",
}


def _onnxruntime() -> tuple[dict[str, str], list[str]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return {}, []
    return {"onnxruntime": str(ort.__version__)}, list(ort.get_available_providers())


def _accelerators(providers: list[str], sys_root: Path) -> list[str]:
    found = {_ACCELERATOR_PROVIDERS[p] for p in providers if p in _ACCELERATOR_PROVIDERS}
    # Device nodes reveal hardware even when the matching runtime is not installed.
    probes = {
        "nvidia-gpu": sys_root / "dev" / "nvidia0",
        "jetson": sys_root / "etc" / "nv_tegra_release",
        "coral-tpu": sys_root / "dev" / "apex_0",
        "hailo": sys_root / "dev" / "hailo0",
        "intel-npu": sys_root / "dev" / "accel" / "accel0",
    }
    found.update(name for name, path in probes.items() if path.exists())
    return sorted(found)


def _thermal_zones(sys_root: Path) -> list[dict[str, Any]]:
    zones: list[dict[str, Any]] = []
    for zone in sorted((sys_root / "sys" / "class" / "thermal").glob("thermal_zone*")):
        try:
            millideg = int((zone / "temp").read_text().strip())
            kind = (zone / "type").read_text().strip()
        except (OSError, ValueError):
            continue
        zones.append({"zone": zone.name, "type": kind, "temp_c": millideg / 1000.0})
    return zones


def _power() -> str:
    try:
        import psutil

        battery = psutil.sensors_battery()
    except (ImportError, AttributeError, RuntimeError, OSError):
        battery = None
    if battery is not None and not battery.power_plugged:
        return "battery"
    return "mains"


def collect_capabilities(data_dir: Path, sys_root: Path = Path("/")) -> dict[str, Any]:
    """The capabilities document sent at enrollment.

    Args:
        data_dir: the agent's data directory (free disk is measured there).
        sys_root: filesystem root to probe (tests point it at a fake tree).
    """
    import psutil

    runtimes, providers = _onnxruntime()
    data_dir.mkdir(parents=True, exist_ok=True)
    return {
        "arch": platform.machine() or "unknown",
        "os": platform.system().lower(),
        "cores": os.cpu_count() or 1,
        "memory_mb": int(psutil.virtual_memory().total // (1024 * 1024)),
        "disk_free_mb": int(shutil.disk_usage(data_dir).free // (1024 * 1024)),
        "runtimes": runtimes,
        "execution_providers": providers,
        "accelerators": _accelerators(providers, sys_root),
        "thermal_zones": _thermal_zones(sys_root),
        "power": _power(),
    }
