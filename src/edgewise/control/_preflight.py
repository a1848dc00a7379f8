"""Deployment pre-flight: who is targeted, who cannot run it, what is plainly wrong.

`preflight` is the pure decision behind `edgewise deploy dry-run` and the check on
deployment create. It reads pipeline specs and model manifests defensively (they come
from clients and bundles), and never raises on their shape: what it cannot use becomes
a conflict or is skipped.

- **conflicts** refuse the create: an invalid selector, a pipeline without a model, a
  model not in the registry, a label-schema mismatch between a model and its pipeline's
  postprocess, or a fallback/cascade model whose label schema differs from the main one.
- **incompatible** devices match the selector but cannot run the pipelines: runtime
  missing or too old, too little memory or disk, a required accelerator, arch or opset
  missing, or an agent that does not know terms a pipeline's spec uses (a field or a
  stage newer than the agent: see `edgewise.protocol._vocabulary`). A capability the
  device did not report is not held against it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgewise.control._selector import SelectorError, parse_selector
from edgewise.protocol import unknown_terms

__all__ = [
    "DeviceView",
    "PreflightResult",
    "device_reasons",
    "preflight",
    "reported_digest",
    "vocabulary_reasons",
]

# Highest ai.onnx opset each onnxruntime release implements (onnxruntime's compatibility
# table). Releases newer than the last row are not held to any limit: a device that
# reports `max_opset` is checked against that instead.
_ORT_MAX_OPSET: dict[tuple[int, int], int] = {
    (1, 10): 15,
    (1, 11): 16,
    (1, 12): 17,
    (1, 13): 17,
    (1, 14): 18,
    (1, 15): 19,
    (1, 16): 19,
    (1, 17): 20,
    (1, 18): 21,
    (1, 19): 21,
}
_VERSION_RE = re.compile(r"^\s*([A-Za-z0-9_.\-]+?)\s*(>=|==|>)?\s*v?(\d+(?:\.\d+)*)?\s*$")


@dataclass(frozen=True)
class DeviceView:
    """A device as the pre-flight sees it.

    Attributes:
        id: Device id.
        labels: Its labels.
        capabilities: What it reported: `arch`, `cores`, `memory_mb`, `disk_free_mb`,
            `runtimes` ({"onnxruntime": "1.20.1"}), `execution_providers`, `accelerators`,
            optionally `max_opset`.
        vocabulary: The pipeline-spec terms its agent reported it knows; None when
            unknown (an agent older than that report, or terms not received).
    """

    id: str
    labels: Mapping[str, str]
    capabilities: Mapping[str, Any] = field(default_factory=dict)
    vocabulary: frozenset[str] | None = None


@dataclass(frozen=True)
class PreflightResult:
    """The answer of a pre-flight.

    Attributes:
        matching: Ids of the devices the selector matches (sorted), compatible or not.
        incompatible: Device id -> reasons it cannot run the pipelines (a subset of
            `matching`).
        conflicts: Hard problems that must refuse the deployment.
    """

    matching: list[str]
    incompatible: dict[str, list[str]]
    conflicts: list[str]

    @property
    def ok(self) -> bool:
        """True when there is no hard conflict."""
        return not self.conflicts

    @property
    def compatible(self) -> list[str]:
        """Matching devices that can run every pipeline."""
        return [d for d in self.matching if d not in self.incompatible]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (for the API and `--json`)."""
        return {
            "matching": list(self.matching),
            "compatible": self.compatible,
            "incompatible": {k: list(v) for k, v in self.incompatible.items()},
            "conflicts": list(self.conflicts),
        }


# ------------------------------------------------------------------ defensive readers


def _as_map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [value]
    return list(value) if isinstance(value, list | tuple | set | frozenset) else []


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _version(text: Any) -> tuple[int, ...] | None:
    if not isinstance(text, str):
        return None
    m = re.match(r"^\s*v?(\d+(?:\.\d+)*)", text)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def _label_schema(value: Any) -> tuple[str, str | None] | None:
    """Normalise a label schema (`{"id", "version"}` or a bare id) to (id, version)."""
    if isinstance(value, str) and value:
        return (value, None)
    if isinstance(value, Mapping) and isinstance(value.get("id"), str) and value["id"]:
        version = value.get("version")
        return (value["id"], None if version is None else str(version))
    return None


def _model_schema(manifest: Mapping[str, Any]) -> tuple[str, str | None] | None:
    # The manifest may hold it at the top or inside `labels` (DESIGN.md: "labels with a
    # label_schema id").
    return _label_schema(manifest.get("label_schema")) or _label_schema(
        _as_map(manifest.get("labels")).get("label_schema")
    )


def _fmt_schema(schema: tuple[str, str | None] | None) -> str:
    if schema is None:
        return "none"
    return schema[0] if schema[1] is None else f"{schema[0]}@{schema[1]}"


def _schemas_differ(a: tuple[str, str | None], b: tuple[str, str | None]) -> bool:
    if a[0] != b[0]:
        return True
    return a[1] is not None and b[1] is not None and a[1] != b[1]


def _pipeline_models(spec: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(role, model ref) pairs of a pipeline: main, fallback, cascade."""
    refs: list[tuple[str, Any]] = [("model", spec.get("model"))]
    if spec.get("fallback") is not None:
        refs.append(("fallback", spec.get("fallback")))
    cascade = spec.get("cascade")
    if isinstance(cascade, Mapping) and cascade.get("model") is not None:
        refs.append(("cascade", cascade.get("model")))
    elif isinstance(cascade, str):
        refs.append(("cascade", cascade))
    return refs


# -------------------------------------------------------------------------- checks


def _pipeline_conflicts(
    name: str, spec: Any, models: Mapping[str, Mapping[str, Any]]
) -> tuple[list[str], list[Mapping[str, Any]]]:
    """Conflicts of one pipeline, and the manifests it uses (for device checks)."""
    if not isinstance(spec, Mapping):
        return [f"pipeline {name!r}: spec must be an object"], []
    conflicts: list[str] = []
    used: list[Mapping[str, Any]] = []
    schemas: dict[str, tuple[str, tuple[str, str | None] | None]] = {}
    for role, ref in _pipeline_models(spec):
        if not isinstance(ref, str) or "@" not in ref:
            what = "no model" if ref is None else f"{role} {ref!r} is not 'name@version'"
            conflicts.append(f"pipeline {name!r}: {what}")
            continue
        manifest = models.get(ref)
        if not isinstance(manifest, Mapping):
            conflicts.append(f"pipeline {name!r}: {role} {ref!r} is not in the registry")
            continue
        used.append(manifest)
        schemas[role] = (ref, _model_schema(manifest))

    main = schemas.get("model")
    if main is not None:
        for role in ("fallback", "cascade"):
            other = schemas.get(role)
            if other is None:
                continue
            if (main[1] is None) != (other[1] is None) or (
                main[1] is not None and other[1] is not None and _schemas_differ(main[1], other[1])
            ):
                conflicts.append(
                    f"pipeline {name!r}: {role} {other[0]!r} has label schema "
                    f"{_fmt_schema(other[1])}, model {main[0]!r} has {_fmt_schema(main[1])}"
                )

    for step in _as_list(spec.get("postprocess")):
        wanted = _label_schema(_as_map(step).get("label_schema"))
        if wanted is None:
            continue
        step_name = _as_map(step).get("name", "?")
        for ref, schema in schemas.values():
            if schema is None or _schemas_differ(schema, wanted):
                conflicts.append(
                    f"pipeline {name!r}: postprocess {step_name!r} expects label schema "
                    f"{_fmt_schema(wanted)}, model {ref!r} has {_fmt_schema(schema)}"
                )
    return conflicts, used


def _runtime_reasons(requires: Mapping[str, Any], caps: Mapping[str, Any]) -> list[str]:
    raw = requires.get("runtime")
    if isinstance(raw, Mapping):
        rt_name = raw.get("name")
        min_text = raw.get("min_version", raw.get("version"))
    elif isinstance(raw, str):
        m = _VERSION_RE.match(raw)
        rt_name, min_text = (m.group(1), m.group(3)) if m else (raw, None)
    else:
        return []
    if not isinstance(rt_name, str) or not rt_name:
        return []
    runtimes = caps.get("runtimes")
    if not isinstance(runtimes, Mapping):
        return []  # not reported: not held against the device
    have = runtimes.get(rt_name)
    if have is None:
        return [f"runtime {rt_name} missing"]
    need_v, have_v = _version(str(min_text)) if min_text else None, _version(str(have))
    if need_v and have_v and have_v < need_v:
        return [f"runtime {rt_name} {have} older than required {min_text}"]
    return []


def _opset_reasons(requires: Mapping[str, Any], caps: Mapping[str, Any]) -> list[str]:
    need = _number(requires.get("min_opset", requires.get("opset")))
    if need is None:
        return []
    have = _number(caps.get("max_opset"))
    if have is None:
        ort = _version(str(_as_map(caps.get("runtimes")).get("onnxruntime", "")))
        if ort is None or len(ort) < 2 or ort[:2] > max(_ORT_MAX_OPSET):
            return []
        have = float(_ORT_MAX_OPSET.get((ort[0], ort[1]), 0)) or None
        if have is None:
            return []
    if have < need:
        return [f"opset {int(need)} required, device supports up to {int(have)}"]
    return []


def _accelerator_reasons(requires: Mapping[str, Any], caps: Mapping[str, Any]) -> list[str]:
    wanted = [str(a) for a in _as_list(requires.get("accelerators"))]
    if not wanted:
        return []
    offered = {str(a).lower() for a in _as_list(caps.get("accelerators"))}
    offered |= {
        str(ep).lower().removesuffix("executionprovider")
        for ep in _as_list(caps.get("execution_providers"))
    }
    return [f"accelerator {a} missing" for a in wanted if a.lower() not in offered]


def reported_digest(agent: Any) -> str:
    """The vocabulary digest in a device's stored `report_agent` ("" when none)."""
    digest = agent.get("spec_digest") if isinstance(agent, Mapping) else None
    return digest if isinstance(digest, str) else ""


def vocabulary_reasons(
    vocabulary: frozenset[str] | None, terms: Mapping[str, Sequence[str]]
) -> list[str]:
    """Per pipeline (name -> its spec's terms), the terms an agent does not know."""
    if vocabulary is None:
        return []
    reasons = []
    for name, used in terms.items():
        unknown = unknown_terms(used, vocabulary)
        if unknown:
            reasons.append(
                f"pipeline {name!r}: the agent does not know {', '.join(unknown)} "
                "(upgrade the agent)"
            )
    return reasons


def device_reasons(
    device: DeviceView,
    manifests: Sequence[Mapping[str, Any]],
    terms: Mapping[str, Sequence[str]],
) -> list[str]:
    """Why `device` cannot run these pipelines; empty when it can.

    `manifests` are the manifests of every model the pipelines use, `terms` each
    pipeline's spec terms by pipeline name. Vocabulary reasons come first.
    """
    caps = _as_map(device.capabilities)
    reasons = vocabulary_reasons(device.vocabulary, terms)
    memory_need = disk_need_bytes = 0.0
    for manifest in manifests:
        requires = _as_map(manifest.get("requires"))
        reasons += _runtime_reasons(requires, caps)
        reasons += _opset_reasons(requires, caps)
        reasons += _accelerator_reasons(requires, caps)
        arch = requires.get("arch")
        if arch is not None and isinstance(caps.get("arch"), str):
            archs = {str(a) for a in _as_list(arch)}
            if caps["arch"] not in archs:
                reasons.append(f"arch {caps['arch']} not in {sorted(archs)}")
        memory_need += _number(requires.get("memory_mb")) or 0.0
        for f in _as_list(manifest.get("files")):
            disk_need_bytes += _number(_as_map(f).get("size")) or 0.0
    # Every model of the deployment is resident at once (fallbacks are preloaded so a
    # failover is instant), so memory needs add up.
    memory_have = _number(caps.get("memory_mb"))
    if memory_have is not None and memory_need > memory_have:
        reasons.append(f"memory {memory_need:g} MB required, device has {memory_have:g} MB")
    disk_have = _number(caps.get("disk_free_mb"))
    disk_need = disk_need_bytes / (1024 * 1024)
    if disk_have is not None and disk_need > disk_have:
        reasons.append(f"disk {disk_need:.1f} MB required, device has {disk_have:g} MB free")
    return list(dict.fromkeys(reasons))  # dedupe, keep order


def preflight(
    selector: str,
    pipelines: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    devices: Sequence[DeviceView],
) -> PreflightResult:
    """Check a deployment against the registry and the fleet.

    Args:
        selector: Target selector text.
        pipelines: Pipeline name -> spec ({"model": "name@version", "fallback": ...,
            "cascade": {"model": ...}, "postprocess": [{"name", "label_schema"}], ...,
            "terms": the spec's terms as devices get it, see `spec_terms`}).
        models: "name@version" -> manifest dict (`requires`, `label_schema`, `labels`,
            `files`), for every model the registry holds that the pipelines may name.
        devices: The fleet (or the part the caller may see).

    Returns:
        The matching devices, the incompatible ones with reasons, and hard conflicts.
    """
    conflicts: list[str] = []
    try:
        sel = parse_selector(selector)
    except SelectorError as exc:
        return PreflightResult([], {}, [f"selector: {exc}"])
    if not isinstance(pipelines, Mapping) or not pipelines:
        conflicts.append("deployment has no pipelines")
        pipelines = {}
    manifests: dict[int, Mapping[str, Any]] = {}
    terms: dict[str, list[str]] = {}
    for name in sorted(pipelines):
        found, used = _pipeline_conflicts(str(name), pipelines[name], models)
        conflicts += found
        manifests.update({id(m): m for m in used})
        terms[str(name)] = [str(t) for t in _as_list(_as_map(pipelines[name]).get("terms"))]

    matching = sorted(d.id for d in devices if sel.matches(d.labels))
    by_id = {d.id: d for d in devices}
    incompatible: dict[str, list[str]] = {}
    for dev_id in matching:
        reasons = device_reasons(by_id[dev_id], list(manifests.values()), terms)
        if reasons:
            incompatible[dev_id] = reasons
    return PreflightResult(matching, incompatible, conflicts)
