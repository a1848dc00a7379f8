"""The pure heart of reconciliation: `plan(desired, observed, now) -> list[Action]`.

No I/O and no clock reads: the agent observes (committed slots, running pipelines,
refused bundles), calls `plan`, and executes the actions in order. Stops come first so
an install has the memory the removed pipelines held; installs of critical pipelines
come before normal and best-effort ones.

Example:
    >>> from edgewise.protocol import DesiredModelRef, DesiredPipeline
    >>> ref = DesiredModelRef(name="m", version="1", sha256="0" * 64, size=1, url="/u")
    >>> plan({"p": DesiredPipeline(deployment="d", model=ref)}, {}, now=0.0)[0].kind
    'install'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgewise.protocol import DesiredModelRef, DesiredPipeline

__all__ = ["Action", "ObservedPipeline", "fingerprint", "plan"]

_PRIORITY_RANK = {"critical": 0, "normal": 1, "best_effort": 2}


@dataclass(frozen=True)
class ObservedPipeline:
    """What the agent knows about one pipeline on this device.

    Attributes:
        fingerprint: `fingerprint()` of the committed models (serving or ready to serve);
            "" if none.
        spec: the spec the pipeline runs with.
        running: whether the runtime currently serves it.
        refused: the fingerprint of an install this pipeline refused (bad signature,
            failed health check, insufficient disk, ...); not retried before `retry_at`.
        retry_at: when a refused install may be tried again; None means never (the same
            bytes will fail the same way).
        settled: whether the install record is about the committed models and ended
            `active`. False when it still tells of another install (cut short by a crash,
            abandoned, refused) that the desired state no longer asks for: the device
            would go on reporting that install instead of the model it serves.
    """

    fingerprint: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    running: bool = False
    refused: str = ""
    retry_at: float | None = None
    settled: bool = True


@dataclass(frozen=True)
class Action:
    """One step for the agent to execute.

    `kind` is "stop", "start" (serve the committed model), "reconfigure" (same model,
    new spec) or "install" (fetch, verify, install into the inactive slot, health-check,
    switch, commit).
    """

    kind: str
    pipeline: str
    model: DesiredModelRef | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    deployment: str = ""
    fallback: DesiredModelRef | None = None
    cascade: DesiredModelRef | None = None
    fingerprint: str = ""


def fingerprint(want: DesiredPipeline) -> str:
    """The identity of a pipeline's models: primary, fallback and cascade digests."""
    refs = (want.model, want.fallback, want.cascade)
    return "+".join(r.sha256 if r is not None else "-" for r in refs)


def _action(kind: str, name: str, want: DesiredPipeline) -> Action:
    return Action(
        kind,
        name,
        want.model,
        want.spec,
        want.deployment,
        want.fallback,
        want.cascade,
        fingerprint(want),
    )


def _rank(want: DesiredPipeline) -> int:
    return _PRIORITY_RANK.get(str(want.spec.get("priority", "normal")), 1)


def plan(
    desired: Mapping[str, DesiredPipeline],
    observed: Mapping[str, ObservedPipeline],
    now: float,
) -> list[Action]:
    """The actions that move `observed` toward `desired`.

    Args:
        desired: pipeline name -> what the accepted desired state asks for.
        observed: pipeline name -> what this device has.
        now: current time (for refused bundles' retry times).
    """
    stops = [Action("stop", name) for name in sorted(set(observed) - set(desired))]
    stops = [a for a in stops if observed[a.pipeline].running or observed[a.pipeline].fingerprint]
    rest: list[tuple[int, str, Action]] = []
    for name, want in desired.items():
        have = observed.get(name, ObservedPipeline())
        wanted = fingerprint(want)
        action: Action | None
        held_off = have.refused == wanted and (have.retry_at is None or now < have.retry_at)
        if have.fingerprint == wanted and (have.settled or held_off):
            kind = "start" if not have.running else "reconfigure"
            action = None if have.running and have.spec == want.spec else _action(kind, name, want)
        elif held_off:
            action = None
        else:
            # Also when the committed models are the wanted ones but the record is not
            # settled: installing them again finds them in their slot, re-checks their
            # health and closes the record `active`.
            action = _action("install", name, want)
        if action is not None:
            rest.append((_rank(want), name, action))
    return stops + [a for _, _, a in sorted(rest, key=lambda t: (t[0], t[1]))]
