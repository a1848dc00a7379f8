"""Crash-safe files: write temp, fsync, rename, fsync the directory.

A committed JSON state file keeps its previous committed copy beside it (`NAME.prev`),
so a torn or corrupt file found at start (a disk that lied about fsync, a bit flip, a
hand edit) falls back to the last state that was known good instead of to nothing.

Damaged storage is expected, not exceptional: a temp file is always created afresh
(`O_EXCL | O_NOFOLLOW`), so a stale one left by a crash, a directory in its place or a
symlink planted there is removed, never written through; a write cut short by a full
disk removes its temp file, so the space is given back; nothing here deletes through a
symlink (`remove_tree` drops the link itself).

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> state = DurableJson(d / "state.json")
    >>> state.commit({"revision": 3})
    >>> state.load()
    {'revision': 3}
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "DurableJson",
    "atomic_write_bytes",
    "fsync_dir",
    "out_of_space",
    "remove_tree",
    "replace_file",
    "write_new",
]

# The envelope lets a reader tell a complete document from a torn one even when the torn
# prefix happens to be valid JSON.
_MAGIC = "edgewise-state/1"

# The errors that mean "no room for these bytes": the disk (or the quota) is full, or the
# file may not grow (RLIMIT_FSIZE, FAT's 4 GiB).
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc` says the storage has no room (as opposed to read-only or failing)."""
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create `path` afresh holding `data`, fsynced; on any failure nothing is left.

    Whatever is at `path` first (a stale temp file, a directory, a symlink) is removed,
    not followed: `O_EXCL | O_NOFOLLOW` makes sure the bytes land in a new file of ours.
    A write that fails (a full disk) removes the partial file so its space comes back.
    """
    remove_tree(path, sync=False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write_new(tmp, data, mode)
    try:
        replace_file(tmp, path)
    except BaseException:
        remove_tree(tmp, sync=False)
        raise
    fsync_dir(path.parent)


def replace_file(tmp: Path, path: Path) -> None:
    """`os.replace`, first clearing a directory found where the file belongs (damage)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(tmp, path)


def remove_tree(path: Path, sync: bool = True) -> None:
    """Delete whatever is at `path` (a tree, a file or a symlink: the link, not its target).

    With `sync`, the removal is made durable.
    """
    if not os.path.lexists(path):  # (unlinking nothing on a read-only disk raises EROFS)
        return
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return
    if sync:
        fsync_dir(path.parent)


class DurableJson:
    """A JSON document committed atomically, with the previous commit kept as a fallback."""

    def __init__(self, path: Path, check: Callable[[Any], Any] | None = None) -> None:
        """Keep the document at `path` and its previous commit beside it (`.prev`).

        `check` reads a document into what the caller keeps, raising ValueError or
        TypeError for one it cannot use: such a file counts as torn, like unreadable JSON.
        """
        self.path = path
        self.prev = path.with_name(path.name + ".prev")
        self._check = check
        #: Set by `load` when the current file was unreadable and `.prev` was used.
        self.recovered_from_prev = False

    @staticmethod
    def _encode(doc: Any) -> bytes:
        return json.dumps({"magic": _MAGIC, "doc": doc}, sort_keys=True).encode()

    @staticmethod
    def _decode(raw: bytes) -> Any:
        env = json.loads(raw)
        if not isinstance(env, dict) or env.get("magic") != _MAGIC or "doc" not in env:
            raise ValueError("not a committed state envelope")
        return env["doc"]

    def _read(self, path: Path) -> Any:
        doc = self._decode(path.read_bytes())
        return doc if self._check is None else self._check(doc)

    def load(self, default: Any = None) -> Any:
        """The last committed document; `.prev` if the current one is torn; else `default`.

        With a `check`, the document as it returns it.
        """
        self.recovered_from_prev = False
        try:
            return self._read(self.path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError):
            self.recovered_from_prev = True
        try:
            return self._read(self.prev)
        except (OSError, ValueError, TypeError):
            return default

    def commit(self, doc: Any) -> None:
        """Durably replace the document; the old commit becomes `.prev`.

        Two renames around one fsynced temp file: a crash between them leaves no current
        file, and `load` then reads `.prev`, which is the last commit. Only a readable
        commit may become `.prev`, so a torn file never replaces the fallback.
        """
        data = self._encode(doc)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        write_new(tmp, data)
        try:
            self._read(self.path)
            replace_file(self.path, self.prev)
        except (OSError, ValueError, TypeError):
            pass
        try:
            replace_file(tmp, self.path)
        except BaseException:
            remove_tree(tmp, sync=False)
            raise
        fsync_dir(self.path.parent)
