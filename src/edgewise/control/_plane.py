"""The control plane's operations: the imperative shell around store and pure decisions.

HTTP routes (`_api_admin`, `_api_device`) parse and authorise, then call one method here
(or a function of `_fleet`, `_registry`, `_deployments`); each reads the store, asks a pure
function (merge, preflight, selector, audit chain, RBAC) for the decision, writes the
result and wakes whoever waits on it. Methods are synchronous: operator routes run in the
server's thread pool, and the async device routes call them through `anyio.to_thread`
only on cache misses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgewise.control import _auditchain
from edgewise.control._batch import AsyncBatcher
from edgewise.control._desiredcalc import content_hash, desired_content
from edgewise.control._identity import (
    hash_token,
    load_or_create_signing_key,
    new_secret_token,
    public_key_b64,
    public_key_from_b64,
)
from edgewise.control._live import (
    CachedDevice,
    ChangeMarks,
    DeviceCache,
    NonceCache,
    Notifier,
    SeenTracker,
)
from edgewise.control._rbac import FLEET_WIDE, Permission, Role, allowed, scope_within
from edgewise.control._selector import Selector, SelectorError, parse_selector
from edgewise.control._settings import Settings
from edgewise.control._sodium import sodium_verify
from edgewise.control._store import ConflictError, LastAdminError, SqlStore
from edgewise.protocol import (
    MAX_CHAIN,
    DesiredState,
    RequestAuthError,
    TrustRootError,
    advance_trust_root,
    parse_signed_headers,
    refresh_desired,
    sign_desired,
    signer_key_id,
    verify_request,
    verify_trust_root,
)

__all__ = ["ApiError", "ControlPlane", "Principal", "digest", "ensure_json"]

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as `{"error": {"code", "message"}}` with an HTTP status."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})  # sent with the answer (Content-Range on a 416)


@dataclass(frozen=True)
class Principal:
    """An authenticated operator token."""

    token_id: str
    name: str
    role: str
    scope: Selector | None

    @property
    def actor(self) -> str:
        """How the audit log names this caller.

        The name is cut short so the id always fits: audit records keep 200 characters
        of actor, and a 200-character name must not push out who it really was.
        """
        return f"token:{self.name[:120]}({self.token_id})"


def digest(data: Any) -> str:
    """A stable sha256 of a request payload (for the audit log)."""
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    raw = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(raw).hexdigest()


def ensure_json(value: Any, what: str) -> None:
    """Refuse values JSON cannot carry (NaN, infinities) before they reach the database.

    Raises:
        ApiError: 422 naming `what`.
    """
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError):
        raise ApiError(422, "invalid_request", f"{what}: NaN or infinity is not JSON") from None


class ControlPlane:
    """Service operations shared by every route."""

    def __init__(
        self,
        settings: Settings,
        store: SqlStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.key = load_or_create_signing_key(settings.data_dir)
        self.public_key = self.key.public_key()
        self.key_id = signer_key_id(self.public_key)
        self.notifier = Notifier()
        self.nonces = NonceCache(ttl_s=2 * settings.max_skew_s)
        self.cache = DeviceCache()
        self.reports: AsyncBatcher[tuple[str, Any, float]] = AsyncBatcher(store.save_reports)
        self.seen = SeenTracker()
        self.changes = ChangeMarks()
        # rollout id -> (row version, parsed value): views of a watched rollout parse
        # its document once per change (see `_rollouts._parsed`)
        self.parsed_rollouts: dict[str, tuple[int, Any]] = {}
        self._recompute_lock = threading.Lock()
        self._chain_memo: tuple[str, Any, str] | None = None  # see `_walk_chain`
        # Called with (device id, revision) when this replica commits a new desired
        # revision: the MQTT push (telemetry wiring). Replicas that learn of a change from
        # the watcher wake only their own long-polls, so each change is pushed once.
        self.on_desired: list[Callable[[str, int], None]] = []

    def desired_committed(self, device_ids: Sequence[str], revisions: Sequence[int]) -> None:
        """Run the `on_desired` hooks; a hook that fails is logged, never raised."""
        for hook in list(self.on_desired):
            try:
                for device_id, revision in zip(device_ids, revisions, strict=True):
                    hook(device_id, revision)
            except Exception:  # a push is a hint: polls still carry every change
                log.exception("desired-state push failed")

    # ---------------------------------------------------------------- tokens
    def bootstrap_admin(self) -> str | None:
        """Mint the first admin token, once per database; None if already done."""
        if not self.store.put_meta_if_absent("bootstrap", str(self.clock())):
            return None
        _, secret = self.create_token("admin", Role.ADMIN, None, actor="bootstrap")
        return secret

    def create_token(
        self,
        name: str,
        role: str,
        scope: str | None,
        actor: str,
        within: Selector | None = None,
    ) -> tuple[dict[str, Any], str]:
        """Create an operator token; returns (row without hash, secret text).

        Args:
            name: A name for people (the audit log shows it).
            role: One of `Role`.
            scope: A label selector limiting what the token sees, or None for all.
            actor: Who asks (the audit record's actor).
            within: The creator's scope: a scoped admin mints only tokens scoped inside
                its own (never an unscoped one), so no token widens its own reach.

        Raises:
            ApiError: 400 bad role or scope; 403 `out_of_scope` beyond `within`.
        """
        if role not in {r.value for r in Role}:
            raise ApiError(400, "bad_role", f"role must be one of {', '.join(Role)}")
        scope_text = self._parse_selector(scope, "scope") if scope else None
        if not scope_within(parse_selector(scope_text) if scope_text else None, within):
            self.audit(actor, "token.create", "token:?", digest([name, role, scope]), "refused")
            raise ApiError(
                403,
                "out_of_scope",
                f"a token scoped to {str(within)!r} may only create tokens scoped inside it",
            )
        token_id, secret = new_secret_token("ewo")
        row = {
            "id": token_id,
            "name": name,
            "role": role,
            "scope": scope_text,
            "token_hash": hash_token(secret),
            "created_at": self.clock(),
            "created_by": actor,
            "revoked_at": None,
        }
        self.store.insert_token(row)
        self.audit(actor, "token.create", f"token:{token_id}", digest([name, role, scope]), "ok")
        return _public_token(row), secret

    def authenticate(self, authorization: str | None) -> Principal:
        """Resolve a bearer header to a principal.

        Raises:
            ApiError: 401 when missing, malformed, unknown or revoked.
        """
        if not authorization:
            raise ApiError(401, "unauthenticated", "missing bearer token")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 200:
            raise ApiError(401, "bad_token", "authorization must be 'Bearer <token>'")
        row = self.store.token_by_hash(hash_token(token))
        if row is None:
            raise ApiError(401, "bad_token", "unknown token")
        if row["revoked_at"] is not None:
            raise ApiError(401, "revoked_token", "token has been revoked")
        scope = parse_selector(row["scope"]) if row["scope"] else None
        return Principal(row["id"], row["name"], row["role"], scope)

    @staticmethod
    def authorize(principal: Principal, permission: Permission) -> None:
        """Raise 403 unless the principal's role holds the permission.

        A scoped token never holds a fleet-wide permission (`FLEET_WIDE`): publisher
        keys and the trust root decide what every device trusts, whatever its site.
        """
        if not allowed(principal.role, permission):
            raise ApiError(
                403, "forbidden", f"role {principal.role!r} may not do {permission.value!r}"
            )
        if principal.scope is not None and permission in FLEET_WIDE:
            raise ApiError(
                403,
                "out_of_scope",
                f"{permission.value!r} changes the whole fleet: it needs an unscoped token",
            )

    def list_tokens(self, within: Selector | None = None) -> list[dict[str, Any]]:
        """Operator tokens without their hashes (those scoped inside `within`)."""
        rows = self.store.list_tokens()
        return [_public_token(r) for r in rows if scope_within(_scope_of(r), within)]

    def revoke_token(self, token_id: str, actor: str, within: Selector | None = None) -> None:
        """Revoke an operator token (one scoped inside `within`).

        Raises:
            ApiError: 404 unknown or outside `within` (scope does not leak ids); 409
                `last_admin` for the last unrevoked unscoped admin token, whose loss
                would leave nobody able to mint tokens or manage keys.
        """
        row = next((r for r in self.store.list_tokens() if r["id"] == token_id), None)
        if row is None or not scope_within(_scope_of(row), within):
            raise ApiError(404, "not_found", f"no token {token_id}")
        # The last-admin check is the store's: made in the revoking transaction, so
        # concurrent revokes (threads, replicas) cannot each see the other's token left.
        try:
            known = self.store.revoke_token(token_id, self.clock(), keep_root_admin=True)
        except LastAdminError:
            self.audit(actor, "token.revoke", f"token:{token_id}", digest(token_id), "refused")
            raise ApiError(
                409,
                "last_admin",
                "this is the last unscoped admin token: create another before revoking it",
            ) from None
        if not known:
            raise ApiError(404, "not_found", f"no token {token_id}")
        self.audit(actor, "token.revoke", f"token:{token_id}", digest(token_id), "ok")

    # ----------------------------------------------------------------- audit
    def audit(
        self,
        actor: str,
        action: str,
        obj: str,
        request_digest: str,
        result: str,
        conn: Any = None,
    ) -> None:
        """Append a record to the audit chain (inside `conn`'s transaction if given)."""
        at = round(self.clock(), 6)

        def build(seq: int, prev_hash: str) -> dict[str, Any]:
            record = {
                "id": seq,
                "at": at,
                "actor": actor[:200],
                "action": action[:100],
                "object": obj[:500],
                "request_digest": request_digest,
                "result": result[:200],
            }
            h = _auditchain.record_hash(prev_hash, record)
            del record["id"]
            return {"seq": seq, **record, "prev_hash": prev_hash, "hash": h}

        self.store.append_audit(build, _auditchain.GENESIS, conn=conn)

    def audit_records(self, after: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Audit records as the chain module reads them (`id` = chain position)."""
        out = []
        for row in self.store.list_audit(after, limit):
            rec = dict(row)
            rec["id"] = rec.pop("seq")
            out.append(rec)
        return out

    def verify_audit(self) -> dict[str, Any]:
        """Check the whole chain; names the first broken record."""
        # The head row catches records deleted from the end, which leave a valid prefix.
        # It is read first and the records after it, in another snapshot: records other
        # writers append meanwhile follow the head, which must still be in the chain.
        head = self.store.audit_head()
        records = self.audit_records()
        if head is None and records:
            # The first append (which creates the head row) may have landed between the
            # reads; otherwise the row was deleted, maybe with records at the end (which
            # would leave a valid prefix).
            head = self.store.audit_head()
            records = self.audit_records() if head is not None else records
        missing_head = head is None and bool(records)
        if missing_head:
            head = "(head row missing)"
        broken = _auditchain.verify_chain(records, head=head, appended_since_head=True)
        result: dict[str, Any] = {"records": len(records), "ok": broken is None}
        if broken is None and records:
            # Kept elsewhere, it lets `audit verify --file` catch a truncated export.
            result["head"] = records[-1]["hash"]
        if broken is not None:
            result["first_broken_index"] = broken
            if broken < len(records):
                result["first_broken_id"] = records[broken]["id"]
            result["message"] = (
                f"chain broken at record {records[broken]['id']} (position {broken})"
                if broken < len(records)
                else "the chain's head row is missing: records may be missing at the end"
                if missing_head
                else "records missing at the end of the chain"
            )
        return result

    # -------------------------------------------------------- publisher keys
    def trust_publisher_key(self, public_key: str, name: str, actor: str) -> dict[str, Any]:
        """Trust a publisher key for registry pushes and device trust roots.

        Raises:
            ApiError: 409 `trust_root_managed` once the fleet has a signed trust root:
                its publishers are the trusted ones, changed only by a new version.
        """
        if self.store.trust_roots():
            raise ApiError(
                409,
                "trust_root_managed",
                "publisher keys are set by the fleet's signed trust root: sign a new "
                "version naming this key (edgewise trust sign) and push it (edgewise trust push)",
            )
        try:
            key = public_key_from_b64(public_key)
        except ValueError as exc:
            raise ApiError(400, "bad_key", str(exc)) from None
        kid = signer_key_id(key)
        try:
            created = self.store.add_publisher_key(kid, public_key_b64(key), name, self.clock())
        except ConflictError as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        self.audit(actor, "publisher_key.trust", f"key:{kid}", digest(public_key), "ok")
        return {"key_id": kid, "public_key": public_key_b64(key), "name": name, "created": created}

    def install_trust_root(self, signed: Any, actor: str) -> tuple[dict[str, Any], bool]:
        """Check a signed trust root against the stored chain and make it the fleet's.

        Its publishers become the trusted ones (pushes signed by a key it leaves out are
        refused); devices get it with their next desired document. Returns (the trust
        root's view, whether it was new: the same version again is a no-op).

        Raises:
            ApiError: 400 `bad_trust_root` (malformed, short of signatures, an older
                version, or control-plane keys in force that leave this one's out);
                409 `conflict` (another replica stored this version, or another, first).
        """
        stored = self.store.trust_roots()
        current, problem = self._walk_chain(stored)
        if problem:  # the stored chain was checked link by link as it was stored
            raise ApiError(409, "trust_root_broken", f"the stored trust root chain: {problem}")
        try:
            root = verify_trust_root(signed, current)
        except TrustRootError as exc:
            self.audit(actor, "trust_root.install", "trust_root", digest(str(exc)), "refused")
            raise ApiError(400, "bad_trust_root", str(exc)) from None
        # Left out, the set in force stays: the one the newest stored version named.
        named, where = dict(root.control_plane), f"version {root.version}"
        for row in reversed(stored if not named else []):
            doc = row.get("document")
            if isinstance(doc, dict) and isinstance(doc.get("control_plane"), dict):
                named, where = doc["control_plane"], f"version {doc.get('version')}"
                break
        if named and self.key_id not in named:
            raise ApiError(
                400,
                "bad_trust_root",
                f"version {root.version} would lock every device out: this control plane "
                f"signs with {self.key_id}, which the control_plane of {where} leaves out "
                "(name it: to rotate the key, list the old and the new, switch once devices "
                "hold that version, then list the new alone)",
            )
        if root is current:
            return self.trust_root_view(), False
        try:
            self.store.add_trust_root(
                root.version,
                dict(root.signed),
                root.publishers,
                self.clock(),
                MAX_CHAIN,
                after=current.version if current is not None else 0,
            )
        except ConflictError as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        self.audit(
            actor,
            "trust_root.install",
            f"trust_root:v{root.version}",
            digest(dict(root.signed)),
            "ok",
        )
        return self.trust_root_view(), True

    def trust_root_view(self) -> dict[str, Any]:
        """The fleet's trust root now, and which version devices last said they hold."""
        current, _ = self._walk_chain(self.store.trust_roots())
        held: dict[str, int] = {}
        for agent in self.store.reported_agents():
            version = agent.get("trust_version", 0) if isinstance(agent, dict) else 0
            key = str(version if type(version) is int and version >= 0 else 0)
            held[key] = held.get(key, 0) + 1
        if current is None:
            view = {"version": 0, "publishers": self.store.publisher_keys()}
            return view | {"signing_key": self._signing_key(), "devices": held}
        return {
            "version": current.version,
            "threshold": current.threshold,
            "root_keys": dict(current.root_keys),
            "publishers": dict(current.publishers),
            "control_plane": dict(current.control_plane) or None,
            "signing_key": self._signing_key(),
            "devices": held,
        }

    def _walk_chain(self, stored: list[dict[str, Any]]) -> tuple[Any, str]:
        """`advance_trust_root(stored, None)`, remembered while the stored chain is the same.

        Walking 32 versions of 64 keys checks thousands of signatures (~0.5 s): any
        read-only token asking for the view again and again had cost that each time.
        """
        key = hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()
        memo = self._chain_memo
        if memo is not None and memo[0] == key:
            return memo[1], memo[2]
        current, problem = advance_trust_root(stored, None)
        self._chain_memo = (key, current, problem)
        return current, problem

    def _signing_key(self) -> dict[str, str]:
        return {"key_id": self.key_id, "public_key": public_key_b64(self.public_key)}

    def trust_root(self) -> dict[str, Any]:
        """What an enrolling device should trust."""
        return {
            "publishers": self.store.publisher_keys(),
            "control_plane": {self.key_id: public_key_b64(self.public_key)},
        }

    def agent_settings(self) -> dict[str, Any]:
        """Settings handed to agents at enrollment."""
        s = self.settings
        return {
            "poll_wait_s": s.poll_wait_s,
            "telemetry_window_s": s.telemetry_window_s,
            "max_skew_s": int(s.max_skew_s),
            "desired_ttl_s": int(s.desired_ttl_s),
        }

    # ----------------------------------------------------------- helpers
    @staticmethod
    def _parse_selector(text: str, what: str) -> str:
        try:
            return str(parse_selector(text))
        except SelectorError as exc:
            raise ApiError(400, "bad_selector", f"{what}: {exc}") from None

    # ------------------------------------------------------ device identity
    def load_device(self, device_id: str) -> CachedDevice | None:
        """The poll-path view of a device, from cache or store."""
        cached = self.cache.get(device_id)
        if cached is not None:
            return cached
        since = self.cache.generation()
        row = self.store.get_device(device_id)
        if row is None:
            return None
        item = CachedDevice.from_row(row, int(row["desired_revision"]), row["desired_signed"])
        self.cache.put(device_id, item, since)
        return item

    def device_id_of(self, headers: Mapping[str, str]) -> str:
        """The claimed device id of a signed request (401 when unsigned/malformed)."""
        try:
            return parse_signed_headers(headers)[0]
        except RequestAuthError as exc:
            raise ApiError(401, exc.reason, str(exc)) from None

    def check_device_request(
        self,
        device: CachedDevice | None,
        headers: Mapping[str, str],
        method: str,
        path_qs: str,
        body: bytes,
    ) -> str:
        """Verify a signed device request against a loaded device; returns the device id.

        Raises:
            ApiError: 401 with code unsigned/malformed/unknown_device/decommissioned/
                stale_timestamp/bad_signature/replayed_nonce.
        """
        now = self.clock()
        if device is None:
            raise ApiError(401, "unknown_device", "device is not enrolled")
        if device.status != "active":
            raise ApiError(401, "decommissioned", "device has been decommissioned")
        try:
            signed = verify_request(
                headers,
                method,
                path_qs,
                body,
                device.public_key,
                now,
                self.settings.max_skew_s,
                verify=sodium_verify,
            )
        except RequestAuthError as exc:
            raise ApiError(401, exc.reason, str(exc)) from None
        if self.nonces.seen_before(f"{signed.device_id}:{signed.nonce}", now):
            raise ApiError(401, "replayed_nonce", "nonce already used")
        self.seen.saw(signed.device_id, now)
        return signed.device_id

    def device_changed(self, device_id: str) -> None:
        """Drop cached state and wake waiters after a change to a device."""
        self.cache.drop(device_id)
        self.notifier.notify(device_id)

    # ------------------------------------------------------------ desired
    def recompute(
        self,
        device_id: str,
        deployments: list[dict[str, Any]] | None = None,
        trust_roots: list[dict[str, Any]] | None = None,
    ) -> int:
        """Bring a device's desired document up to date; returns its revision.

        The revision advances only when the content changes, by compare-and-set, so
        replicas recomputing the same device at once agree on one revision.
        `deployments` and `trust_roots` (the newest, as `store.trust_roots(limit=1)`
        reads it) are read here when not given.
        """
        for _ in range(20):
            since = self.cache.generation()
            row = self.store.get_device(device_id)
            if row is None:
                return 0
            deps = deployments if deployments is not None else self.store.list_deployments()
            deps = self._with_rollouts(device_id, deps)
            if trust_roots is None:
                trust_roots = self.store.trust_roots(limit=1)
            content = desired_content(
                deps, row["labels"], self.settings.egress, trust_roots=trust_roots
            )
            new_hash = content_hash(content)
            if new_hash == row["desired_hash"]:
                return int(row["desired_revision"])
            revision = int(row["desired_revision"]) + 1
            now = self.clock()
            doc = DesiredState(
                device_id=device_id,
                revision=revision,
                issued_at=now,
                expires_at=now + self.settings.desired_ttl_s,
                **content,
            )
            signed = sign_desired(doc, self.key, self.key_id).model_dump(mode="json")
            if self.store.cas_desired(
                device_id, row["desired_hash"], revision, new_hash, signed, now, row["labels"]
            ):
                self.changes.mark([device_id], now)
                # Hand the committed document to the cache before waking: the woken
                # long-polls answer from memory instead of each queueing for a worker
                # thread and a store read (the tail of the wake latency under load).
                item = CachedDevice.from_row(row, revision, signed, now)
                self.cache.replace(device_id, item, since)
                self.notifier.notify(device_id)
                self.desired_committed([device_id], [revision])
                return revision
            deployments = trust_roots = None  # lost a race: re-read everything
        raise ApiError(503, "busy", "desired state keeps changing; retry")

    def _with_rollouts(
        self, device_id: str, deployments: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The deployments as this device sees them: a rollout may hold it on a revision."""
        from edgewise.control._revisions import apply_assignments, overrides_for

        assigned = overrides_for(self, [device_id]).get(device_id)
        return [dict(d) for d in apply_assignments(self, deployments, assigned)]

    def recompute_all(self) -> None:
        """Recompute every active device (after a deployment change)."""
        with self._recompute_lock:
            deps = self.store.list_deployments()
            trust = self.store.trust_roots(limit=1)
            for device_id in self.store.device_ids():
                self.recompute(device_id, deps, trust)

    def current_desired(self, device_id: str) -> tuple[CachedDevice, bool]:
        """The device's current signed document, re-signed when past half its lifetime.

        Returns:
            (device, resigned): resigned means the caller must send the document even
            to a matching If-None-Match, so the agent gets the fresh expiry.
        """
        device = self.load_device(device_id)
        if device is None or device.signed_json is None:
            self.recompute(device_id)
            self.cache.drop(device_id)
            device = self.load_device(device_id)
            if device is None or device.signed_json is None:
                raise ApiError(404, "not_found", "no desired state")
        now = self.clock()
        half_life = (device.expires_at - device.issued_at) / 2
        if now >= device.issued_at + half_life:
            fresh = refresh_desired(
                json.loads(device.signed_json),
                now,
                now + self.settings.desired_ttl_s,
                self.key,
                self.key_id,
            )
            self.store.resign_desired(device_id, int(fresh["document"]["revision"]), fresh)
            self.cache.drop(device_id)
            return self.load_device(device_id) or device, True
        return device, False


def _public_token(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "token_hash"}


def _scope_of(row: Mapping[str, Any]) -> Selector | None:
    return parse_selector(row["scope"]) if row["scope"] else None
