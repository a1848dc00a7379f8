"""What this agent understands of a pipeline spec (see `edgewise.protocol._vocabulary`).

The agent reports its vocabulary so that the control plane can tell, before deploying,
which devices run agents too old for a spec; and it refuses a spec with terms it does not
know before downloading anything for it, saying which terms.
"""

from __future__ import annotations

import sys
from functools import cache
from typing import Any

from edgewise.protocol import (
    incompatible_reason,
    spec_terms,
    spec_vocabulary,
    unknown_terms,
    vocabulary_digest,
)

__all__ = ["agent_vocabulary", "spec_refusal"]


def agent_vocabulary() -> tuple[tuple[str, ...], str]:
    """This agent's vocabulary (sorted) and its digest.

    Stages registered in the runtime by other packages count, with any parameters. The
    runtime is not imported for this (numpy alone is 15 MB of an idle agent's RSS): a
    package that registers a stage has imported it, and until then only the built-in
    stages exist. So the vocabulary may grow once a plugin loads; its digest says so.
    """
    stages = sys.modules.get("edgewise.runtime._stages")
    registered: tuple[tuple[str, tuple[str, ...]], ...] = ()
    if stages is not None:
        registries = (stages.SOURCES, stages.PREPROCESS, stages.POSTPROCESS, stages.SINKS)
        registered = tuple((r.kind, tuple(r.names())) for r in registries)
    return _vocabulary(registered)


@cache
def _vocabulary(
    registered: tuple[tuple[str, tuple[str, ...]], ...],
) -> tuple[tuple[str, ...], str]:
    terms = spec_vocabulary(dict(registered))
    return tuple(terms), vocabulary_digest(terms)


def spec_refusal(spec: dict[str, Any]) -> str | None:
    """Why this agent cannot run `spec` (terms it does not know), or None (pure)."""
    unknown = unknown_terms(spec_terms(spec), frozenset(agent_vocabulary()[0]))
    if not unknown:
        return None
    return incompatible_reason(unknown)
