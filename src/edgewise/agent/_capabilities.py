"""What this device can do, collected once at enrollment and refreshed in reports.

Everything here reads the local machine; nothing fails hard: a probe that cannot read
its source reports nothing rather than stopping the agent.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["collect_capabilities", "probe_key", "stale"]

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


_PROBE = (
    "import json, onnxruntime as o; print(json.dumps([o.__version__, o.get_available_providers()]))"
)


def _onnxruntime() -> tuple[dict[str, str], list[str]]:
    # Probed in a child process: importing onnxruntime (and numpy) costs ~30 MB of RSS,
    # which an agent with no pipeline should not carry.
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120
        )
        version, providers = json.loads(out.stdout)
        return {"onnxruntime": str(version)}, [str(p) for p in providers]
    except (OSError, ValueError, TypeError, subprocess.SubprocessError):
        pass
    try:
        return {"onnxruntime": importlib.metadata.version("onnxruntime")}, []
    except importlib.metadata.PackageNotFoundError:
        return {}, []


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


def probe_key() -> dict[str, str | None]:
    """What an upgrade changes of a capabilities document: the packages' versions.

    Those of edgewise and of the inference runtimes, read from package metadata (so
    without importing them).
    """
    out: dict[str, str | None] = {}
    for dist in ("edgewise", "onnxruntime", "ai-edge-litert"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def stale(cached: Any, key: dict[str, str | None]) -> bool:
    """Whether a cached capabilities document must be probed again (pure).

    It must when it is not one, or was probed with other versions (an agent or runtime
    upgrade): a device would otherwise report its enrollment's runtimes forever.
    """
    return not isinstance(cached, dict) or cached.get("probed_with") != key


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
