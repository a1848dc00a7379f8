"""Spec vocabularies stored in device reports before 0007 move to `agent_vocabularies`.

Before migration 0007 a device row kept the terms its agent reported inline, in
`report_agent.spec_vocabulary`; 0007 created the table but moved nothing, and an agent
sends its terms only once per start. So after an upgrade every device whose agent had
not restarted since counted as "vocabulary unknown": pre-flight and rollouts no longer
held back the agents too old for a deployment's specs, and device views carried the
whole list. Here each inline list whose digest matches its terms is stored once under
that digest, and the device row keeps the digest only, as it does since 0007.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import hashlib
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_devices = sa.table(
    "devices",
    sa.column("id", sa.String()),
    sa.column("report_agent", sa.JSON()),
    sa.column("reported_at", sa.Float()),
)
_vocabularies = sa.table(
    "agent_vocabularies",
    sa.column("digest", sa.String()),
    sa.column("terms", sa.JSON()),
    sa.column("first_seen", sa.Float()),
    sa.column("last_seen", sa.Float()),
)


def _digest(terms: list[str]) -> str:
    # edgewise.protocol.vocabulary_digest as it was when 0007 shipped (frozen here: a
    # migration must not change meaning when the package does).
    return hashlib.sha256("\n".join(sorted(set(terms))).encode()).hexdigest()[:16]


def _inline(agent: Any) -> tuple[str, list[str]] | None:
    """The (digest, terms) an agent record carries inline, when they agree."""
    if not isinstance(agent, dict):
        return None
    terms, digest = agent.get("spec_vocabulary"), agent.get("spec_digest")
    if not isinstance(terms, list) or not all(isinstance(x, str) for x in terms):
        return None
    return (digest, sorted(set(terms))) if digest == _digest(terms) else None


def upgrade() -> None:
    """Apply."""
    bind = op.get_bind()
    known = set(bind.execute(sa.select(_vocabularies.c.digest)).scalars())
    q = sa.select(_devices.c.id, _devices.c.report_agent, _devices.c.reported_at)
    for row in bind.execute(q).all():
        agent = row.report_agent
        if not isinstance(agent, dict) or "spec_vocabulary" not in agent:
            continue
        found = _inline(agent)
        if found is not None and found[0] not in known:
            seen = row.reported_at or 0.0
            bind.execute(
                sa.insert(_vocabularies).values(
                    digest=found[0], terms=found[1], first_seen=seen, last_seen=seen
                )
            )
            known.add(found[0])
        kept = {k: v for k, v in agent.items() if k != "spec_vocabulary"}
        bind.execute(sa.update(_devices).where(_devices.c.id == row.id).values(report_agent=kept))


def downgrade() -> None:
    """Revert: nothing (rows keep the digest, as 0007 expects)."""
