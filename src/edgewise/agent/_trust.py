"""The device's signed trust root (`edgewise.protocol._trust`), kept in DIR/trust.json.

Desired documents carry the fleet's newest trust root (the agent fetches the chain when
it is behind); the agent walks from the version it holds, each step checked against the
root keys of the one before, and then
trusts exactly the publishers of the newest good version (and its control-plane keys,
when it names them): bundles signed by a key the fleet revoked are refused from then
on, and bundles signed by a key it added install.
The publishers are written to identity.json too, so an agent built before trust roots
(started on this data directory) trusts the same keys.

A trust.json that does not verify (torn, edited) is set aside for its previous commit
(a version this device checked before); with neither, as if absent: the next chain is
then taken from its first version on the control plane's word, as at enrollment, which
is no more trust than the device had before.

identity.json is written before trust.json, and made to agree with the version held
whenever a chain arrives: a stop between the two writes never leaves a revoked
publisher trusted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgewise.agent._durable import DurableJson
from edgewise.agent._identity import Identity, save_identity
from edgewise.agent._installer import retry_refused
from edgewise.agent._state import PipelineRecord
from edgewise.protocol import TrustRoot, TrustRootError, advance_trust_root

__all__ = ["TRUST_FILE", "TrustChange", "TrustKeeper", "TrustWalk", "retry_unsigned"]

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


@dataclass(frozen=True)
class TrustWalk:
    """One walk of a chain from the version held (`TrustKeeper.walk`), not yet taken."""

    chain: tuple[Any, ...]
    before: TrustRoot | None  # the version held when it was walked
    held: TrustRoot | None  # where the walk got
    problem: str = ""  # why it stopped short


class TrustKeeper:
    """Holds the trust root this device accepted, and advances it."""

    def __init__(self, data_dir: Path) -> None:
        """Read DIR/trust.json (none, or one that does not verify: no trust root)."""
        self.dir = data_dir
        # A file that does not verify counts as torn (TrustRootError is a ValueError):
        # the previous commit, a version this device checked before, is read instead of
        # none, which would take the next chain's first version on the control plane's
        # word; the chain then walks the device forward again.
        self._file = DurableJson(data_dir / TRUST_FILE, check=_held_before)
        self.current: TrustRoot | None = self._file.load(default=None)
        self._unwritten = False  # `current` is not on disk yet (a write failed)
        if self._file.recovered_from_prev:
            held = f"version {self.current.version}" if self.current else "no trust root"
            log.warning("%s is damaged or does not verify: holding %s", TRUST_FILE, held)

    @property
    def version(self) -> int:
        """The version held (0: none)."""
        return self.current.version if self.current is not None else 0

    def walk(self, chain: Sequence[Any]) -> TrustWalk:
        """Walk `chain` from the version held, changing nothing (`take` acts on it)."""
        held, problem = advance_trust_root(chain, self.current)
        return TrustWalk(tuple(chain), self.current, held, problem)

    def advance(self, chain: Sequence[Any], identity: Identity) -> TrustChange | None:
        """Walk `chain` and trust the newest good version's publishers (`take(walk(...))`)."""
        return self.take(self.walk(chain), identity)

    def take(self, walk: TrustWalk, identity: Identity) -> TrustChange | None:
        """Trust the publishers of the newest good version `walk` reached.

        A walk made from a version no longer held (another was taken since) is walked
        again from the one held now.

        Returns:
            None when nothing changed and nothing is wrong; else what happened. The
            publishers change in memory even when the disk will not take them (the
            change is written again with the next document that carries the chain).
        """
        chain = walk.chain
        if not chain:
            return None
        if walk.before is not self.current:
            walk = self.walk(chain)
        before, previous = self.current, self.version
        held, problem = walk.held, walk.problem
        if held is None:
            return TrustChange(0, 0, problem=problem) if problem else None
        old = set(identity.publishers)
        if held is before and not self._unwritten and not self._disagrees(held, identity):
            return TrustChange(self.version, self.version, problem=problem) if problem else None
        # Also when the version is the one held: identity.json can be behind trust.json
        # (an agent stopped between the two writes by an older build, or a disk that took
        # one and refused the other), and the keys in force are the trust root's.
        identity.publishers = dict(held.publishers)
        named = _named_control_plane(chain, before, held)
        if named:  # the keys whose desired documents are accepted, as last named
            identity.control_plane = named
        self.current = held
        try:
            # identity.json first: a stop between the writes leaves the new keys in force
            # and the old version held, so the same chain is walked (and written) again;
            # the other way round left a revoked publisher trusted for good.
            save_identity(self.dir, identity)
            if held is not before or self._unwritten:
                self._file.commit(dict(held.signed))
            self._unwritten = False
        except OSError as exc:
            self._unwritten = True
            problem = problem or f"trust root not written: {exc.strerror or exc}"
        new = set(held.publishers)
        return TrustChange(
            held.version, previous, tuple(sorted(new - old)), tuple(sorted(old - new)), problem
        )

    @staticmethod
    def _disagrees(held: TrustRoot, identity: Identity) -> bool:
        """Whether identity.json's keys are not the ones trust root `held` puts in force."""
        if identity.publishers != dict(held.publishers):
            return True
        return bool(held.control_plane) and identity.control_plane != dict(held.control_plane)


def _held_before(signed: Any) -> TrustRoot:
    """A trust.json this device wrote: checked by itself, as the first link of a chain.

    Not `verify_trust_root(signed, None)`: that also refuses a first version too high to
    leave room for later ones, which a version reached step by step may be.
    """
    held, problem = advance_trust_root([signed], None)
    if held is None:
        raise TrustRootError(problem)
    return held


def _version(signed: Any) -> int:
    doc = signed.get("document") if isinstance(signed, dict) else None
    version = doc.get("version") if isinstance(doc, dict) else None
    return version if type(version) is int else 0


def _named_control_plane(
    chain: Sequence[Any], before: TrustRoot | None, held: TrustRoot
) -> dict[str, str]:
    """The control-plane keys the newest version from `before` to `held` names ({}: none).

    A version that leaves them out keeps the set in force, so a device that walks several
    versions at once must take the last set named on the way, not only `held`'s: a
    device that was off while a version listed the new control-plane key alone (the
    old one revoked, say stolen) would otherwise keep trusting the old key for good once
    a later version left the set out.
    """
    if held.control_plane or held is before:
        return dict(held.control_plane)
    named: dict[str, str] = {}
    at = before
    for signed in sorted(chain, key=_version):
        if at is held or _version(signed) > held.version:
            break
        step, problem = advance_trust_root([signed], at)
        if problem or step is None or step is at:
            continue
        at = step
        if step.control_plane:
            named = dict(step.control_plane)
    return named


def retry_unsigned(pipelines: dict[str, PipelineRecord]) -> list[str]:
    """Let installs refused for their signatures be tried again (publishers were added).

    A bundle signed by a key the device did not trust yet is never retried on its own
    (the same bundle fails the same way); once a trust root adds keys, it may now pass.
    Returns the pipelines concerned.
    """
    return retry_refused(pipelines, "signature")
