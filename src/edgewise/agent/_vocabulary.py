"""What this agent understands of a pipeline spec (see `edgewise.protocol._vocabulary`).

The agent reports its vocabulary so that the control plane can tell, before deploying,
which devices run agents too old for a spec; and it refuses a spec with terms it does not
know before downloading anything for it, saying which terms.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from edgewise.protocol import spec_terms, spec_vocabulary, unknown_terms, vocabulary_digest

__all__ = ["agent_vocabulary", "spec_refusal"]


@cache
def agent_vocabulary() -> tuple[tuple[str, ...], str]:
    """This agent's vocabulary (sorted) and its digest.

    Stages registered in the runtime by other packages count, with any parameters; so
    they must be registered before the first report (at start, as plugins are).
    """
    from edgewise.runtime._stages import POSTPROCESS, PREPROCESS, SINKS, SOURCES

    registries = (SOURCES, PREPROCESS, POSTPROCESS, SINKS)
    terms = spec_vocabulary({r.kind: r.names() for r in registries})
    return tuple(terms), vocabulary_digest(terms)


def spec_refusal(spec: dict[str, Any]) -> str | None:
    """Why this agent cannot run `spec` (terms it does not know), or None (pure)."""
    unknown = unknown_terms(spec_terms(spec), frozenset(agent_vocabulary()[0]))
    if not unknown:
        return None
    return (
        f"incompatible: this agent does not know {', '.join(unknown)} "
        "(the spec needs a newer agent)"
    )
