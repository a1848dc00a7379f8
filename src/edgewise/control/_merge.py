"""Layered desired state: merge the deployments that match a device.

Each deployment targets a label selector and carries named pipelines. A device runs,
per pipeline name, the pipeline of the matching deployment with the highest priority;
ties go to the newest deployment (largest `created_seq`), and, should two share both,
to the largest id, so the answer never depends on the order deployments are listed.
Deleting a deployment simply drops it from the input: the next one takes over.

Example::

    >>> base = DeploymentView("d1", "base", "", 0, 1, {"digits": {"model": "m@1.0.0"}})
    >>> pilot = DeploymentView("d2", "pilot", "site=lab", 10, 2, {"digits": {"model": "m@2.0.0"}})
    >>> merge_desired([base, pilot], {"site": "lab"})["digits"][0]
    'd2'
    >>> merge_desired([base, pilot], {"site": "store-1"})["digits"][0]
    'd1'
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgewise.control._selector import Selector, parse_selector

__all__ = ["DeploymentView", "matching_deployments", "merge_desired", "merge_egress"]


@dataclass(frozen=True)
class DeploymentView:
    """What the merge needs to know about one deployment.

    Attributes:
        id: Stable deployment id (the last tie-breaker).
        name: Human name, for messages only.
        selector: Target label selector text (Kubernetes syntax).
        priority: Higher wins per pipeline name.
        created_seq: Monotonic creation sequence; higher is newer and wins ties.
        pipelines: Pipeline name -> pipeline spec (opaque to the merge).
        egress: The deployment's egress policy (a protocol `EgressPolicy` as JSON), or
            None to leave it to weaker deployments and the server's default.
    """

    id: str
    name: str
    selector: str
    priority: int
    created_seq: int
    pipelines: Mapping[str, Mapping[str, Any]]
    egress: Mapping[str, Any] | None = None

    def rank(self) -> tuple[int, int, str]:
        """The ordering key of the merge: larger wins."""
        return (self.priority, self.created_seq, self.id)


@functools.lru_cache(maxsize=4096)
def _parsed(text: str) -> Selector:
    # Selectors are immutable, so sharing parsed ones across calls is safe; the cache
    # matters when the control plane recomputes desired state for many devices.
    return parse_selector(text)


def matching_deployments(
    deployments: Iterable[DeploymentView], labels: Mapping[str, str]
) -> list[DeploymentView]:
    """The deployments whose selector matches `labels`, strongest first.

    Raises:
        SelectorError: if a deployment holds an invalid selector.
    """
    found = [d for d in deployments if _parsed(d.selector).matches(labels)]
    return sorted(found, key=DeploymentView.rank, reverse=True)


def merge_desired(
    deployments: Iterable[DeploymentView], labels: Mapping[str, str]
) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """Merge the deployments matching a device into its desired pipelines.

    Args:
        deployments: All live deployments (any order).
        labels: The device's labels.

    Returns:
        Pipeline name -> (winning deployment id, that deployment's pipeline spec),
        sorted by pipeline name. Empty when nothing matches.

    Raises:
        SelectorError: if a deployment holds an invalid selector.
    """
    winners: dict[str, DeploymentView] = {}
    for dep in matching_deployments(deployments, labels):
        for pipeline in dep.pipelines:
            # Strongest first, so the first deployment to name a pipeline keeps it.
            winners.setdefault(pipeline, dep)
    return {name: (winners[name].id, winners[name].pipelines[name]) for name in sorted(winners)}


def merge_egress(
    deployments: Iterable[DeploymentView], labels: Mapping[str, str]
) -> Mapping[str, Any] | None:
    """The egress policy of the strongest matching deployment that sets one, else None.

    Raises:
        SelectorError: if a deployment holds an invalid selector.
    """
    for dep in matching_deployments(deployments, labels):
        if dep.egress is not None:
            return dep.egress
    return None
