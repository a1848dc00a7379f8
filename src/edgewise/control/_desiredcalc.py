"""What a device should run: the pure step from deployments and labels to document content.

The content (pipelines, egress, settings) is what the revision tracks: its hash decides
whether a recompute bumps the revision. Timestamps and the signature live outside it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from edgewise.bundle import canonical_json
from edgewise.control._merge import DeploymentView, merge_desired, merge_egress

__all__ = ["content_hash", "deployment_views", "desired_content"]


def deployment_views(deployments: Sequence[Mapping[str, Any]]) -> list[DeploymentView]:
    """Store rows as the merge's input."""
    return [
        DeploymentView(
            id=d["id"],
            name=d["name"],
            selector=d["selector"],
            priority=int(d["priority"]),
            created_seq=int(d["seq"]),
            pipelines=d["pipelines"],
            egress=d.get("egress"),
        )
        for d in deployments
    ]


def desired_content(
    deployments: Sequence[Mapping[str, Any]],
    labels: Mapping[str, str],
    egress: Mapping[str, Any],
    settings: Mapping[str, Any] | None = None,
    trust_roots: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The content of a device's desired document.

    Args:
        deployments: deployment rows (id, name, selector, priority, seq, pipelines, where
            each pipeline is {"model", "fallback", "cascade", "spec"} already pinned).
        labels: the device's labels.
        egress: the server's default egress policy: it applies unless a matching
            deployment sets its own (the strongest such deployment wins).
        settings: extra agent settings.
        trust_roots: the signed trust root chain, oldest first (`protocol._trust`): the
            document carries its newest version, and is left without one while there is
            none, so documents read as before.
    """
    views = deployment_views(deployments)
    merged = merge_desired(views, labels)
    chosen = merge_egress(views, labels)
    pipelines = {
        name: {"deployment": dep_id, **dict(pipeline)}
        for name, (dep_id, pipeline) in merged.items()
    }
    policy = dict(egress if chosen is None else chosen)
    content: dict[str, Any] = {
        "pipelines": pipelines,
        "egress": policy,
        "settings": dict(settings or {}),
    }
    if trust_roots:
        # The newest version only: a device behind it fetches the chain (a document of
        # every version of 64 keys each would be ~700 KB, for every device, every poll).
        content["trust_roots"] = [dict(trust_roots[-1])]
    return content


def content_hash(content: Mapping[str, Any]) -> str:
    """The sha256 of a document's content in canonical JSON."""
    return hashlib.sha256(canonical_json(dict(content))).hexdigest()
