"""The A/B model store: two slots per model, an install writes only the inactive one.

Layout under the store root::

    <name>/slots.json      the durable pointer file (DurableJson)
    <name>/a/  <name>/b/   slot directories (the extracted bundle)

`slots.json` says which slot is active and what each slot holds, with its state:
`empty`, `writing` (an install is filling it: never loadable) or `ready` (fully
written; the sha256 of every file recorded). The pointer flips with one atomic rename,
so a power cut at any instant leaves either the old or the new slot active, never a
half-written one. `recover()` at start discards any slot still marked `writing`.

Example:
    >>> import tempfile, pathlib
    >>> store = ModelStore(pathlib.Path(tempfile.mkdtemp()))
    >>> slot = store.begin_write("m", "1.0.0", "ab" * 32)
    >>> _ = (store.slot_dir("m", slot) / "model.onnx").write_bytes(b"x")
    >>> store.finish_write("m", slot)
    >>> store.commit("m", slot)
    >>> store.active("m").version
    '1.0.0'
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgewise.agent._durable import DurableJson, fsync_dir, remove_tree

__all__ = ["ModelStore", "Slot", "SlotInfo", "StoreError"]

Slot = Literal["a", "b"]
_SLOTS: tuple[Slot, Slot] = ("a", "b")


class StoreError(Exception):
    """A store operation that would break the A/B invariants."""


@dataclass
class SlotInfo:
    """What one slot holds."""

    slot: Slot
    state: Literal["empty", "writing", "ready"] = "empty"
    version: str = ""
    sha256: str = ""  # of the .ewb the slot was extracted from
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256


_STATES = ("empty", "writing", "ready")


def _pointer_doc(doc: Any) -> Any:
    """A `slots.json` document as the store reads it; raises for one it cannot use.

    Flash that rots inside a string leaves valid JSON with a key or a state no slot has;
    such a file counts as torn (`DurableJson` then reads the previous commit) instead of
    failing every start with a TypeError.

    Raises:
        ValueError, TypeError: the document does not have the shape the store writes.
    """
    if not isinstance(doc, dict) or doc.get("active") not in (None, *_SLOTS):
        raise ValueError("slots.json: the active pointer names no slot")
    slots = doc.get("slots", {})
    if not isinstance(slots, dict):
        raise ValueError("slots.json: slots is not an object")
    for key, raw in slots.items():
        if key not in _SLOTS or not isinstance(raw, dict):
            raise ValueError(f"slots.json: {key!r} is not a slot")
        info = SlotInfo(**raw)  # TypeError for a missing or unknown field
        texts = (info.slot, info.state, info.version, info.sha256)
        if not all(isinstance(t, str) for t in texts) or not isinstance(info.files, dict):
            raise TypeError(f"slots.json: slot {key} has a field of the wrong type")
        if info.slot != key or info.state not in _STATES:
            raise ValueError(f"slots.json: slot {key} has no valid state")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in info.files.items()):
            raise TypeError(f"slots.json: slot {key} has a malformed file list")
    return doc


def _other(slot: Slot) -> Slot:
    return "b" if slot == "a" else "a"


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path, known: dict[str, str]) -> dict[str, str]:
    """Sync every file and directory under root; return relative path -> sha256."""
    files: dict[str, str] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            rel = path.relative_to(root).as_posix()
            files[rel] = known.get(rel) or _hash_file(path)
        fsync_dir(Path(dirpath))
    return files


class ModelStore:
    """Two slots per model name, with an atomically flipped active pointer."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _pointer(self, name: str) -> DurableJson:
        if not name or "/" in name or name.startswith("."):
            raise StoreError(f"bad model name {name!r}")
        return DurableJson(self.root / name / "slots.json", _pointer_doc)

    def _load(self, name: str) -> dict[str, Any]:
        doc = self._pointer(name).load(default=None)
        if not isinstance(doc, dict):
            doc = {"active": None, "slots": {}}
        return doc

    def _info(self, doc: dict[str, Any], slot: Slot) -> SlotInfo:
        raw = doc.get("slots", {}).get(slot)
        return SlotInfo(**raw) if isinstance(raw, dict) else SlotInfo(slot)

    def _save(self, name: str, doc: dict[str, Any]) -> None:
        pointer = self._pointer(name)
        own = pointer.path.parent
        if own.is_symlink() or (own.exists() and not own.is_dir()):
            remove_tree(own)  # damage: the store never writes through a link
        pointer.commit(doc)

    def names(self) -> list[str]:
        """Model names that have a pointer file."""
        return sorted(p.parent.name for p in self.root.glob("*/slots.json"))

    def slot_dir(self, name: str, slot: Slot) -> Path:
        """Where a slot's files live."""
        return self.root / name / slot

    def slots(self, name: str) -> dict[Slot, SlotInfo]:
        """Both slots of a model."""
        doc = self._load(name)
        return {s: self._info(doc, s) for s in _SLOTS}

    def active_slot(self, name: str) -> Slot | None:
        """The committed active slot of a model, if any."""
        active = self._load(name).get("active")
        return active if active in _SLOTS else None

    def active(self, name: str) -> SlotInfo | None:
        """The committed active slot's info, if any."""
        doc = self._load(name)
        active = doc.get("active")
        return self._info(doc, active) if active in _SLOTS else None

    def next_slot(self, name: str) -> Slot:
        """The slot the next `begin_write` of `name` claims (never the active one)."""
        active = self._load(name).get("active")
        return _other(active) if active in _SLOTS else "a"

    def reclaimable_bytes(self, name: str) -> int:
        """Disk held by the slot the next install of `name` empties before writing.

        On a device whose flash holds two slots and little more, that space is what the
        next version goes into: a free-space check that ignored it would refuse every
        update. Symlinks are not followed (their targets are not ours to count or free).
        """
        total = 0
        for dirpath, _dirs, names in os.walk(self.slot_dir(name, self.next_slot(name))):
            for entry in names:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, entry)).st_blocks * 512
        return total

    def find_ready(self, name: str, sha256: str) -> Slot | None:
        """A ready slot already holding this bundle (e.g. the previous version)."""
        for slot, info in self.slots(name).items():
            if info.state == "ready" and info.sha256 == sha256:
                return slot
        return None

    def recover(self) -> list[str]:
        """Discard every slot left `writing` by a crash; returns what was discarded.

        Also whatever damage sits where a slot belongs (a file, a symlink: the link is
        dropped, its target untouched) and the temp files and directories of writes cut
        short, so their space comes back.
        """
        discarded: list[str] = []
        for name in self.names():
            if (self.root / name).is_symlink():  # points out of the store: drop the link
                remove_tree(self.root / name)
                discarded.append(name)
                continue
            # Temp directories of an extraction cut short (bundle.extract renames at end),
            # and `.slots.json.tmp`: nothing of the store's starts with a dot otherwise.
            for tmp in (self.root / name).glob(".*"):
                remove_tree(tmp)
                if tmp.name != ".slots.json.tmp":
                    discarded.append(f"{name}/{tmp.name}")
            doc = self._load(name)
            changed = False
            for slot in _SLOTS:
                info = self._info(doc, slot)
                where = self.slot_dir(name, slot)
                present = where.exists() or where.is_symlink()
                if (
                    info.state == "writing"
                    or (info.state == "empty" and present)
                    or (present and (where.is_symlink() or not where.is_dir()))
                ):
                    remove_tree(self.slot_dir(name, slot))
                    doc.setdefault("slots", {})[slot] = asdict(SlotInfo(slot))
                    changed = True
                    discarded.append(f"{name}/{slot}")
            if doc.get("active") in _SLOTS and self._info(doc, doc["active"]).state != "ready":
                doc["active"] = None
                changed = True
            if changed:
                self._save(name, doc)
        return discarded

    def verify_slot(self, name: str, slot: Slot) -> bool:
        """Whether a ready slot's files still match the digests recorded when written."""
        info = self.slots(name)[slot]
        if info.state != "ready" or not info.files:
            return False
        root = self.slot_dir(name, slot)
        try:
            actual = {
                p.relative_to(root).as_posix(): _hash_file(p)
                for p in root.rglob("*")
                if p.is_file()
            }
        except OSError:
            return False
        return actual == info.files

    def begin_write(
        self, name: str, version: str, sha256: str, avoid: Collection[str] = ()
    ) -> Slot:
        """Claim the inactive slot for an install: mark it `writing`, then empty it.

        The mark is durable before the first byte is written, so a crash mid-write is
        always recognised at the next start.

        Args:
            name: the model.
            version: what is being written.
            sha256: of the bundle being written.
            avoid: slots the caller still needs (one an install just wrote for another
                model of the same name, one another pipeline serves).

        Raises:
            StoreError: the only slot an install may write is in `avoid`.
        """
        doc = self._load(name)
        active = doc.get("active")
        free = [s for s in ((_other(active),) if active in _SLOTS else _SLOTS) if s not in avoid]
        if not free:
            raise StoreError(f"no free slot for {name}: both slots hold models in use")
        slot: Slot = free[0]
        doc.setdefault("slots", {})[slot] = asdict(
            SlotInfo(slot, "writing", version=version, sha256=sha256)
        )
        self._save(name, doc)
        remove_tree(self.slot_dir(name, slot))
        self.slot_dir(name, slot).mkdir(parents=True)
        fsync_dir(self.root / name)
        return slot

    def finish_write(self, name: str, slot: Slot, known: dict[str, str] | None = None) -> None:
        """Make the slot's files durable, record their digests and mark it `ready`.

        Args:
            name: the model.
            slot: the slot being written.
            known: digests the writer already checked (a bundle's signed file list);
                only the other files are hashed here.
        """
        doc = self._load(name)
        info = self._info(doc, slot)
        if info.state != "writing":
            raise StoreError(f"{name}/{slot} is not being written")
        if doc.get("active") == slot:
            raise StoreError(f"{name}/{slot} is the active slot")
        info.files = _fsync_tree(self.slot_dir(name, slot), known or {})
        info.state = "ready"
        doc["slots"][slot] = asdict(info)
        self._save(name, doc)

    def commit(self, name: str, slot: Slot) -> None:
        """Flip the active pointer to a ready slot (one atomic rename)."""
        doc = self._load(name)
        if self._info(doc, slot).state != "ready":
            raise StoreError(f"{name}/{slot} is not ready")
        doc["active"] = slot
        self._save(name, doc)

    def discard(self, name: str, slot: Slot) -> None:
        """Empty an inactive slot (a failed install).

        The files go first: on a full disk their space is what lets the pointer file be
        written. A crash between the two leaves a slot marked `writing` (discarded at the
        next start) or `ready` without its files (fails `verify_slot`, never served).
        """
        doc = self._load(name)
        if doc.get("active") == slot:
            raise StoreError(f"{name}/{slot} is the active slot")
        remove_tree(self.slot_dir(name, slot))
        doc.setdefault("slots", {})[slot] = asdict(SlotInfo(slot))
        self._save(name, doc)
