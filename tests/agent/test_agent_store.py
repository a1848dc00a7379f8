"""The A/B model store against real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgewise.agent._store import ModelStore, StoreError


def _install(store: ModelStore, version: str, content: bytes) -> str:
    slot = store.begin_write("m", version, version * 64)
    (store.slot_dir("m", slot) / "model.onnx").write_bytes(content)
    store.finish_write("m", slot)
    store.commit("m", slot)
    return slot


def test_install_writes_only_the_inactive_slot(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    a = _install(store, "1", b"one")
    before = (store.slot_dir("m", a) / "model.onnx").read_bytes()
    b = store.begin_write("m", "2", "2" * 64)
    assert b != a
    (store.slot_dir("m", b) / "model.onnx").write_bytes(b"two")
    assert (store.slot_dir("m", a) / "model.onnx").read_bytes() == before
    assert store.active_slot("m") == a
    store.finish_write("m", b)
    store.commit("m", b)
    assert store.active_slot("m") == b
    assert store.verify_slot("m", b)


def test_a_slot_being_written_is_discarded_on_start(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    a = _install(store, "1", b"one")
    b = store.begin_write("m", "2", "2" * 64)
    (store.slot_dir("m", b) / "model.onnx").write_bytes(b"tw")  # the crash happens here
    reopened = ModelStore(tmp_path)
    assert reopened.recover() == [f"m/{b}"]
    assert reopened.active_slot("m") == a
    assert not reopened.slot_dir("m", b).exists()
    assert reopened.slots("m")[b].state == "empty"


def test_tampered_slot_fails_verification(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    a = _install(store, "1", b"one")
    (store.slot_dir("m", a) / "model.onnx").write_bytes(b"evil")
    assert not store.verify_slot("m", a)


def test_commit_of_a_slot_that_is_not_ready_raises(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    slot = store.begin_write("m", "1", "1" * 64)
    with pytest.raises(StoreError):
        store.commit("m", slot)


def test_previous_version_stays_ready_for_a_rollback(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    a = _install(store, "1", b"one")
    _install(store, "2", b"two")
    assert store.find_ready("m", "1" * 64) == a


def test_torn_pointer_file_falls_back_to_last_committed_pointer(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    a = _install(store, "1", b"one")
    b = store.begin_write("m", "2", "2" * 64)
    (tmp_path / "m" / "slots.json").write_bytes(b'{"magic": "edgewise-state/1", "do')
    reopened = ModelStore(tmp_path)
    reopened.recover()
    assert reopened.active_slot("m") == a
    assert reopened.verify_slot("m", a)
    assert b != a
