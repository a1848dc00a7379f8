"""Crash-safe files: write temp, fsync, rename, fsync the directory.

A committed JSON state file keeps its previous committed copy beside it (`NAME.prev`),
so a torn or corrupt file found at start (a disk that lied about fsync, a bit flip, a
hand edit) falls back to the last state that was known good instead of to nothing.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> state = DurableJson(d / "state.json")
    >>> state.commit({"revision": 3})
    >>> state.load()
    {'revision': 3}
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DurableJson", "atomic_write_bytes", "fsync_dir", "remove_tree"]

# The envelope lets a reader tell a complete document from a torn one even when the torn
# prefix happens to be valid JSON.
_MAGIC = "edgewise-state/1"


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Delete a directory tree (if present) and make the removal durable."""
    if path.exists():
        shutil.rmtree(path)
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
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            self._read(self.path)
            os.replace(self.path, self.prev)
        except (OSError, ValueError, TypeError):
            pass
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
