"""The device's signed trust root (`edgewise.protocol._trust`), kept in DIR/trust.json.

Desired documents carry the fleet's trust root chain; the agent walks it from the
version it holds, each step checked against the root keys of the one before, and then
trusts exactly the publishers of the newest good version (and its control-plane keys,
when it names them): bundles signed by a key the fleet revoked are refused from then
on, and bundles signed by a key it added install.
The publishers are written to identity.json too, so an agent built before trust roots
(started on this data directory) trusts the same keys.

A trust.json that does not verify (torn, edited) is set aside as if absent: the next
chain is then taken from its first version on the control plane's word, as at
enrollment, which is no more trust than the device had before.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgewise.agent._durable import DurableJson
from edgewise.agent._identity import Identity, save_identity
from edgewise.agent._state import PipelineRecord
from edgewise.protocol import TrustRoot, TrustRootError, advance_trust_root, verify_trust_root

__all__ = ["TRUST_FILE", "TrustChange", "TrustKeeper", "retry_unsigned"]

TRUST_FILE = "trust.json"
log = logging.getLogger("edgewise.agent.trust")


@dataclass(frozen=True)
class TrustChange:
    """What one walk of the chain did: the version held, keys added and removed, trouble."""

    version: int
    previous: int = 0
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    problem: str = ""  # why the walk stopped short, or why the result was not written


class TrustKeeper:
    """Holds the trust root this device accepted, and advances it."""

    def __init__(self, data_dir: Path) -> None:
        """Read DIR/trust.json (none, or one that does not verify: no trust root)."""
        self.dir = data_dir
        self._file = DurableJson(data_dir / TRUST_FILE)
        self.current: TrustRoot | None = None
        stored = self._file.load(default=None)
        if stored is not None:
            try:
                self.current = verify_trust_root(stored, None)
            except TrustRootError as exc:
                log.warning("%s does not verify (%s): holding no trust root", TRUST_FILE, exc)

    @property
    def version(self) -> int:
        """The version held (0: none)."""
        return self.current.version if self.current is not None else 0

    def advance(self, chain: Sequence[Any], identity: Identity) -> TrustChange | None:
        """Walk `chain` and trust the newest good version's publishers.

        Returns:
            None when nothing changed and nothing is wrong; else what happened. The
            publishers change in memory even when the disk will not take them (the
            change is written with the next document that carries the chain).
        """
        if not chain:
            return None
        before, previous = self.current, self.version
        held, problem = advance_trust_root(chain, before)
        if held is None or held is before:
            return TrustChange(self.version, self.version, problem=problem) if problem else None
        old = set(identity.publishers)
        identity.publishers = dict(held.publishers)
        if held.control_plane:  # named: the keys whose desired documents are accepted
            identity.control_plane = dict(held.control_plane)
        self.current = held
        try:
            self._file.commit(dict(held.signed))
            save_identity(self.dir, identity)
        except OSError as exc:
            problem = problem or f"{TRUST_FILE} not written: {exc.strerror or exc}"
        new = set(held.publishers)
        return TrustChange(
            held.version, previous, tuple(sorted(new - old)), tuple(sorted(old - new)), problem
        )


def retry_unsigned(pipelines: dict[str, PipelineRecord]) -> list[str]:
    """Let installs refused for their signatures be tried again (publishers were added).

    A bundle signed by a key the device did not trust yet is never retried on its own
    (the same bundle fails the same way); once a trust root adds keys, it may now pass.
    Returns the pipelines concerned.
    """
    retried = []
    for name, rec in pipelines.items():
        if rec.refused and rec.tracker.reason.startswith("signature"):
            rec.refused, rec.retry_at = "", None
            retried.append(name)
    return retried
