"""Per-process hot state that keeps the device poll path free of database work.

- `Notifier`: long-poll waiters per device, woken from any thread when the device's
  desired state (or status) changes.
- `NonceCache`: nonces seen within the skew window. It is per process: a nonce replayed
  to a *different* replica inside the window is not caught. That is the documented
  trade-off for a poll path without a database write; the timestamp bound still limits a
  replay to the window, and every request a replay could repeat is idempotent
  (desired fetch, report, telemetry by seq, artifact fetch).
- `DeviceCache`: what verifying and answering a poll needs (public key, status, current
  signed document), loaded on a miss, dropped when this replica changes the device or the
  replica watcher sees another replica change it.
- `SeenTracker`: last-seen times collected in memory and written in batches.
- `ChangeMarks`: the device changes (id, changed_at) this replica has already acted on,
  its own writes included, so the replica watcher passes over them.
- `stale_entries`: the resync's safety net under the watcher's look-back window: cached
  devices whose stored `changed_at` is no longer the one the entry was built from.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgewise.control._identity import public_key_from_b64

__all__ = [
    "CachedDevice",
    "ChangeMarks",
    "DeviceCache",
    "NonceCache",
    "Notifier",
    "SeenTracker",
    "stale_entries",
]


class _Slot:
    """The futures of the requests waiting on one device."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: set[asyncio.Future[bool]] = set()


def _settle(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


class Notifier:
    """Wakes long-poll requests waiting on a device."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}
        # Bumped on every wake: a request reads it before looking at the device and waits
        # only if it is unchanged, so a change between the look and the wait is not lost.
        self._versions: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # Wakes from worker threads queue here and reach the loop in one callback: a
        # wave of 5,000 devices is one write to the loop's self-pipe, not 5,000.
        self._queued: list[str] = []
        self._queue_lock = threading.Lock()
        self._closing = False  # the server is stopping: long-polls answer at once

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the server's event loop (waiters live there)."""
        self._loop = loop

    @property
    def waiting(self) -> int:
        """Requests currently waiting."""
        return sum(len(slot.waiters) for slot in self._slots.values())

    def version(self, device_id: str) -> int:
        """The device's change counter (read on the event loop thread)."""
        return self._versions.get(device_id, 0)

    async def wait(self, device_id: str, timeout: float, since: int | None = None) -> bool:
        """Wait for a change of this device; True if woken, False on timeout.

        Args:
            device_id: the device.
            timeout: seconds.
            since: a `version()` read earlier; returns at once if it moved on.
        """
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        if since is not None and self._versions.get(device_id, 0) != since:
            return True
        if self._closing:  # the caller checks `closing` before it waits again
            return False
        slot = self._slots.get(device_id)
        if slot is None:
            slot = self._slots[device_id] = _Slot()
        # A bare future and a timer, not `asyncio.wait_for`: that wraps every wait in a
        # task of its own, and with 10,000 devices long-polling those tasks were a sixth
        # of the control plane's CPU.
        fut: asyncio.Future[bool] = loop.create_future()
        timer = loop.call_later(max(0.0, timeout), _settle, fut, False)
        slot.waiters.add(fut)
        try:
            return await fut
        finally:
            timer.cancel()
            slot.waiters.discard(fut)
            if not slot.waiters and self._slots.get(device_id) is slot:
                del self._slots[device_id]

    @property
    def closing(self) -> bool:
        """Whether the server is stopping: a long-poll answers instead of waiting."""
        return self._closing

    def release_all(self) -> None:
        """Answer every waiting long-poll now, as unchanged, and any later one at once.

        A stopping server calls this on its loop: it otherwise waits for each long-poll
        to run out before it exits, and a client may ask to wait for up to a day. The
        agents poll again and find the next replica, or this one restarted.
        """
        self._closing = True
        slots, self._slots = self._slots, {}
        for slot in slots.values():
            for fut in slot.waiters:
                _settle(fut, False)

    def notify(self, device_id: str) -> None:
        """Wake the device's waiters; safe to call from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake(device_id)
            return
        with self._queue_lock:
            first = not self._queued
            self._queued.append(device_id)
        if first:
            try:
                loop.call_soon_threadsafe(self._wake_queued)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                with self._queue_lock:
                    self._queued.clear()

    def _wake_queued(self) -> None:
        with self._queue_lock:
            queued, self._queued = self._queued, []
        for device_id in queued:
            self._wake(device_id)

    def _wake(self, device_id: str) -> None:
        self._versions[device_id] = self._versions.get(device_id, 0) + 1
        slot = self._slots.pop(device_id, None)
        if slot is not None:
            for fut in slot.waiters:
                _settle(fut, True)


class NonceCache:
    """Nonces seen recently; `seen_before` both checks and remembers."""

    def __init__(self, ttl_s: float, max_entries: int = 2_000_000) -> None:
        self._ttl = ttl_s
        self._max = max_entries
        self._entries: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def seen_before(self, key: str, now: float) -> bool:
        """True when `key` was already used inside the window; records it otherwise."""
        with self._lock:
            self._expire(now)
            if key in self._entries:
                return True
            self._entries[key] = now + self._ttl
            return False

    def _expire(self, now: float) -> None:
        entries = self._entries
        # Insertion order is expiry order (constant TTL), so expired ones sit in front.
        while entries:
            _key, expiry = next(iter(entries.items()))
            if expiry > now and len(entries) < self._max:
                break
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class CachedDevice:
    """What the poll path needs about one device."""

    public_key: Ed25519PublicKey
    status: str
    labels: dict[str, str]
    revision: int
    signed_json: bytes | None
    expires_at: float
    issued_at: float
    # The row's changed_at this entry reflects: the replica resync compares it with the
    # store's (see `stale_entries`).
    changed_at: float = 0.0

    @classmethod
    def from_row(
        cls,
        row: Mapping[str, Any],
        revision: int,
        signed: Mapping[str, Any] | None,
        changed_at: float | None = None,
    ) -> CachedDevice:
        """The poll-path view of a device row and its signed desired document.

        `changed_at` is the stamp a writer just committed; by default the row's own.
        """
        doc = signed["document"] if signed else {}
        return cls(
            public_key=public_key_from_b64(row["public_key"]),
            status=row["status"],
            labels=dict(row["labels"]),
            revision=revision,
            signed_json=json.dumps(signed, separators=(",", ":")).encode() if signed else None,
            expires_at=float(doc.get("expires_at", 0.0)),
            issued_at=float(doc.get("issued_at", 0.0)),
            changed_at=float(row["changed_at"] if changed_at is None else changed_at),
        )


class DeviceCache:
    """A bounded LRU of `CachedDevice`, thread-safe.

    A loader reads `generation()` before it reads the store and passes it to `put`: if
    any entry was dropped or replaced meanwhile, what it read may predate that change,
    so it is not cached (a stale entry would keep serving an old revision, and a woken
    long-poll would go back to sleep on it).
    """

    def __init__(self, max_entries: int = 200_000) -> None:
        self._max = max_entries
        self._items: OrderedDict[str, CachedDevice] = OrderedDict()
        self._lock = threading.Lock()
        self._generation = 0

    def generation(self) -> int:
        """A counter bumped by every `drop`, `replace` and `clear`."""
        with self._lock:
            return self._generation

    def get(self, device_id: str) -> CachedDevice | None:
        """The cached entry, if any."""
        with self._lock:
            item = self._items.get(device_id)
            if item is not None:
                self._items.move_to_end(device_id)
            return item

    def put(self, device_id: str, item: CachedDevice, since: int | None = None) -> bool:
        """Cache an entry loaded from the store; False (not cached) if stale.

        Args:
            device_id: the device.
            item: what was loaded.
            since: `generation()` read before loading; None skips the check.
        """
        with self._lock:
            if since is not None and since != self._generation:
                return False
            self._store(device_id, item)
            return True

    def replace(self, device_id: str, item: CachedDevice, since: int) -> None:
        """Install the state a writer just committed, so waiters answer from memory.

        Counts as a change: loads that started earlier are refused. If anything changed
        since `since` (read before the writer read the store), the entry is dropped
        instead, and the next request loads it afresh.
        """
        with self._lock:
            if since == self._generation:
                self._store(device_id, item)
            else:
                self._items.pop(device_id, None)
            self._generation += 1

    def replace_many(self, items: dict[str, CachedDevice], since: int) -> None:
        """`replace` for many devices at once (one bulk recompute), one change in all.

        If anything changed since `since`, every entry is dropped instead.
        """
        with self._lock:
            for device_id, item in items.items():
                if since == self._generation:
                    self._store(device_id, item)
                else:
                    self._items.pop(device_id, None)
            self._generation += 1

    def _store(self, device_id: str, item: CachedDevice) -> None:
        self._items[device_id] = item
        self._items.move_to_end(device_id)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def stamps(self) -> dict[str, float]:
        """Each cached device's `changed_at` (a copy, for the replica resync)."""
        with self._lock:
            return {k: v.changed_at for k, v in self._items.items()}

    def drop(self, device_id: str) -> None:
        """Forget an entry (it changed)."""
        with self._lock:
            self._items.pop(device_id, None)
            self._generation += 1

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._items.clear()
            self._generation += 1


class SeenTracker:
    """Last-seen times, flushed to the store in batches."""

    def __init__(self) -> None:
        self._pending: dict[str, float] = {}
        self._lock = threading.Lock()

    def saw(self, device_id: str, at: float) -> None:
        """Note a request from a device."""
        with self._lock:
            self._pending[device_id] = at

    def take(self) -> dict[str, float]:
        """The batch to write, emptied."""
        with self._lock:
            batch, self._pending = self._pending, {}
            return batch


class ChangeMarks:
    """`changed_at` stamps already acted on, per device; thread-safe.

    A writer on this replica marks what it committed (it has updated the cache and woken
    the device itself); the replica watcher marks what it handled. Without the writers'
    marks the watcher took every change of this replica for another's: in a wave of
    5,000 devices it dropped the 5,000 cache entries the recompute had just filled and
    woke each long-poll a second time, and every device's next request read the store.
    """

    def __init__(self) -> None:
        self._marks: dict[str, float] = {}
        self._lock = threading.Lock()

    def mark(self, device_ids: list[str], stamp: float) -> None:
        """Record that these devices' change stamped `stamp` is handled."""
        with self._lock:
            for device_id in device_ids:
                self._marks[device_id] = stamp

    def first_sight(self, device_id: str, stamp: float) -> bool:
        """True (and marks it) when this change was not handled yet."""
        with self._lock:
            if self._marks.get(device_id) == stamp:
                return False
            self._marks[device_id] = stamp
            return True

    def forget_before(self, stamp: float) -> None:
        """Drop marks older than `stamp` (the watcher no longer looks that far back)."""
        with self._lock:
            self._marks = {k: v for k, v in self._marks.items() if v >= stamp}


def stale_entries(cached: Mapping[str, float], stored: Mapping[str, float]) -> dict[str, float]:
    """Cached devices whose store row changed since the entry was built.

    Args:
        cached: device id -> the `changed_at` each cache entry reflects.
        stored: device id -> `changed_at` read from the store afterwards.

    Returns:
        device id -> stored stamp (0.0 for a device the store no longer has).
    """
    return {
        device_id: stored.get(device_id, 0.0)
        for device_id, stamp in cached.items()
        if stored.get(device_id) != stamp
    }
