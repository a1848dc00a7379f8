"""The agent's view of the runtime: load, health-check, serve, swap, stop.

The runtime (and onnxruntime with it) is imported on first use, so an agent with no
pipelines stays small. The agent code talks to this narrow `Host` interface only; the
fleet simulator can plug a host that pretends to run models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from edgewise.runtime import Runtime

log = logging.getLogger(__name__)

__all__ = ["TELEMETRY_SAMPLE_RATE", "Health", "Host", "RuntimeHost"]

# Share of served requests whose inputs the runtime keeps for on-device drift.
TELEMETRY_SAMPLE_RATE = 0.1


@dataclass(frozen=True)
class Health:
    """Outcome of the install gate."""

    ok: bool
    reason: str


class Host(Protocol):
    """What the agent needs from a runtime."""

    def load(self, directory: Path) -> Any:
        """Load and warm up the model unpacked in `directory`."""
        ...

    def health(self, model: Any) -> Health:
        """Run the bundle's health samples on a loaded model."""
        ...

    def serve(self, spec: dict[str, Any], model: Any, companions: dict[str, Any]) -> None:
        """Start the pipeline, or hot-swap its primary model if it runs with the same spec."""
        ...

    def stop(self, pipeline: str) -> None:
        """Stop a pipeline (no error if it is not running)."""
        ...

    def running(self) -> dict[str, str]:
        """Pipeline name -> model key currently served."""
        ...

    def stats(self) -> dict[str, dict[str, Any]]:
        """Pipeline name -> runtime counters."""
        ...

    def close(self) -> None:
        """Stop everything."""
        ...


def _shape(spec: dict[str, Any]) -> dict[str, Any]:
    # Everything but the model pins: equal shapes mean a hot swap is enough.
    shape = {k: v for k, v in spec.items() if k not in ("model", "fallback")}
    shape["has_fallback"] = bool(spec.get("fallback"))
    return shape


class RuntimeHost:
    """A `Host` over `edgewise.runtime.Runtime`, created lazily."""

    def __init__(self, **runtime_kwargs: Any) -> None:
        self._kwargs = runtime_kwargs
        self._rt: Runtime | None = None
        self._specs: dict[str, dict[str, Any]] = {}

    @property
    def runtime(self) -> Runtime:
        """The runtime, created on first use."""
        if self._rt is None:
            from edgewise.runtime import Runtime

            self._rt = Runtime(**self._kwargs)
        return self._rt

    @property
    def started(self) -> bool:
        """Whether the runtime exists yet."""
        return self._rt is not None

    def load(self, directory: Path) -> Any:
        """Load and warm up the model unpacked in `directory`."""
        return self.runtime.load_model(directory)

    def health(self, model: Any) -> Health:
        """Run the bundle's health samples on a loaded model."""
        result = self.runtime.health_check(model)
        return Health(result.ok, result.reason)

    def serve(self, spec: dict[str, Any], model: Any, companions: dict[str, Any]) -> None:
        """Start the pipeline, or hot-swap its models when only they changed.

        A swap drops no request (the runtime finishes queued work on the old lane);
        any other spec change restarts the pipeline.
        """
        from edgewise.protocol import PipelineSpec, unknown_stage_params

        name = str(spec["name"])
        rt = self.runtime
        old = self._specs.get(name)
        if old is not None and _shape(old) == _shape(spec):
            changed = old.get("fallback") != spec.get("fallback") and "fallback" in companions
            # Both checked before either changes: a refused primary left a new fallback.
            rt.swap_models(name, model, companions["fallback"] if changed else None)
            self._specs[name] = spec
            return
        parsed = PipelineSpec.model_validate(spec)
        for problem in unknown_stage_params(parsed):  # the control plane refuses these now
            log.warning("pipeline %s: %s; ignored", name, problem)
        if parsed.sample_rate < TELEMETRY_SAMPLE_RATE:
            # On-device drift needs the served inputs. The samples stay on the device
            # (only the egress policy's capture sends inputs out), so a floor is safe; a
            # spec may ask for more.
            parsed = parsed.model_copy(update={"sample_rate": TELEMETRY_SAMPLE_RATE})
        if old is not None:
            rt.stop_pipeline(name)
            del self._specs[name]
        rt.start_pipeline(
            parsed,
            model,
            fallback=companions.get("fallback"),
            cascade_model=companions.get("cascade"),
        )
        self._specs[name] = spec

    def stop(self, pipeline: str) -> None:
        """Stop a pipeline (no error if it is not running)."""
        if pipeline in self._specs:
            self.runtime.stop_pipeline(pipeline)
            del self._specs[pipeline]

    def running(self) -> dict[str, str]:
        """Pipeline name -> model key currently served."""
        if self._rt is None:
            return {}
        return {str(p["name"]): str(p["model"]) for p in self._rt.pipelines()}

    def stats(self) -> dict[str, dict[str, Any]]:
        """Pipeline name -> runtime counters."""
        if self._rt is None:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for name in list(self._specs):
            try:
                out[name] = self._rt.stats(name)
            except Exception:  # a pipeline that stopped meanwhile has no stats
                continue
        return out

    def sampled_inputs(self, pipeline: str) -> list[tuple[Any, str | None]]:
        """The latest inputs the runtime sampled, oldest first, with their labels."""
        if self._rt is None or pipeline not in self._specs:
            return []
        try:
            return self._rt.sampled_inputs(pipeline)
        except Exception:  # stopped meanwhile
            return []

    def close(self) -> None:
        """Stop everything."""
        if self._rt is not None:
            self._rt.close()
            self._rt = None
        self._specs.clear()
