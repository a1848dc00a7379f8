"""Registry pushes: verified, immutable, content-addressed and served with Range."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgewise import bundle
from edgewise.examples import example_manifests

from .conftest import Plane


def _fields() -> tuple[dict[str, Any], bytes]:
    for fields, model_bytes in example_manifests():
        if fields["name"] == "digits-logreg":
            return dict(fields), model_bytes
    raise AssertionError("no digits-logreg example")


@pytest.fixture(scope="module")
def logreg() -> tuple[dict[str, Any], bytes]:
    return _fields()


def _unsigned(tmp: Path, logreg: tuple[dict[str, Any], bytes], version: str = "9.0.0") -> Path:
    fields, model_bytes = logreg
    path = tmp / f"unsigned-{version}.ewb"
    bundle.pack_files({**fields, "version": version}, {fields["model"]: model_bytes}, path)
    return path


def _push_code(p: Plane, path: Path) -> tuple[int, str]:
    r = p.push(path)
    return r.status_code, r.json().get("error", {}).get("code", "")


def test_unsigned_bundle_is_refused(
    sqlite_plane: Plane, examples: dict[str, Any], tmp_path: Path, logreg: Any
) -> None:
    sqlite_plane.trust(examples["pub"])
    status, _ = _push_code(sqlite_plane, _unsigned(tmp_path, logreg))
    assert status == 400


def test_bundle_signed_by_unknown_key_is_refused(
    sqlite_plane: Plane, examples: dict[str, Any], tmp_path: Path, logreg: Any
) -> None:
    sqlite_plane.trust(examples["pub"])
    path = _unsigned(tmp_path, logreg)
    bundle.sign(path, Ed25519PrivateKey.generate())
    status, _ = _push_code(sqlite_plane, path)
    assert status == 400


def test_tampered_bundle_is_refused(
    sqlite_plane: Plane, examples: dict[str, Any], tmp_path: Path
) -> None:
    sqlite_plane.trust(examples["pub"])
    src = examples["bundles"]["digits-logreg@1.0.0"]
    out = tmp_path / "tampered.ewb"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith(".onnx"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            zout.writestr(info, data)
    status, _ = _push_code(sqlite_plane, out)
    assert status == 400


def test_not_a_bundle_and_empty_uploads_are_refused(sqlite_plane: Plane, tmp_path: Path) -> None:
    junk = tmp_path / "junk.ewb"
    junk.write_bytes(b"not a zip at all")
    assert _push_code(sqlite_plane, junk)[0] == 400
    empty = tmp_path / "empty.ewb"
    empty.write_bytes(b"")
    assert _push_code(sqlite_plane, empty)[0] == 400


def test_a_refused_upload_does_not_reveal_server_paths(sqlite_plane: Plane, tmp_path: Path) -> None:
    junk = tmp_path / "junk.ewb"
    junk.write_bytes(b"not a zip at all")
    r = sqlite_plane.push(junk)
    error = r.json()["error"]
    assert (r.status_code, error["code"]) == (400, "bundle_corrupt_archive")
    assert "not a readable zip archive" in error["message"]
    assert str(sqlite_plane.settings.data_dir) not in error["message"]
    assert "upload-" not in error["message"]


def _manifest_edited(src: Path, out: Path, field: str, value: Any) -> Path:
    """A copy of a signed bundle with one manifest field set (signatures kept)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "manifest.json":
                manifest = json.loads(data)
                if field == "size":
                    manifest["files"][manifest["model"]]["size"] = value
                else:
                    manifest[field] = value
                data = json.dumps(manifest).encode()  # "\ud800" stays an escape
            zout.writestr(info, data)
    return out


@pytest.mark.parametrize(("field", "value"), [("size", 10**30), ("description", "\ud800")])
def test_a_manifest_without_a_canonical_form_is_a_schema_error_not_a_500(
    sqlite_plane: Plane, examples: dict[str, Any], tmp_path: Path, field: str, value: Any
) -> None:
    sqlite_plane.trust(examples["pub"])
    src = examples["bundles"]["digits-logreg@1.0.0"]
    bad = _manifest_edited(src, tmp_path / "bad.ewb", field, value)
    assert _push_code(sqlite_plane, bad) == (400, "bundle_schema_invalid")


def test_same_version_with_other_content_conflicts_and_same_content_is_a_no_op(
    sqlite_plane: Plane, examples: dict[str, Any], tmp_path: Path, logreg: Any
) -> None:
    p = sqlite_plane
    p.trust(examples["pub"])
    first = examples["bundles"]["digits-logreg@1.0.0"]
    assert p.push(first).status_code == 201
    again = p.push(first)
    assert again.status_code == 200 and again.json()["created"] is False
    other = _unsigned(tmp_path, logreg, version="1.0.0")
    bundle.sign(other, bundle.load_private_key(examples["key"]))
    extra = Ed25519PrivateKey.generate()  # a second signature makes other bytes
    bundle.sign(other, extra)
    r = p.push(other)
    assert r.status_code == 409, r.text
    assert len(p.api("GET", "/api/v1/models").json()) == 1


def test_artifact_is_served_with_etag_and_ranges(
    sqlite_plane: Plane, examples: dict[str, Any]
) -> None:
    p = sqlite_plane
    p.trust(examples["pub"])
    path = examples["bundles"]["digits-logreg@1.0.0"]
    sha = p.push(path).json()["sha256"]
    raw = path.read_bytes()
    dev = p.enroll()
    url = f"/device/v1/artifacts/{sha}"
    r = dev.get(url)
    assert r.status_code == 200 and r.content == raw and r.headers["etag"] == f'"{sha}"'
    r = dev.get(url, range="bytes=10-")
    assert r.status_code == 206 and r.content == raw[10:]
    assert r.headers["content-range"] == f"bytes 10-{len(raw) - 1}/{len(raw)}"
    r = dev.get(url, range="bytes=5-9")
    assert r.status_code == 206 and r.content == raw[5:10]
    past = dev.get(url, range=f"bytes={len(raw)}-")
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(raw)}"
    assert dev.get(f"/device/v1/artifacts/{'0' * 64}").status_code == 404
    assert p.client.get(url).status_code == 401


def test_yanked_model_cannot_be_deployed(sqlite_plane: Plane, examples: dict[str, Any]) -> None:
    p = sqlite_plane
    p.trust(examples["pub"])
    p.push(examples["bundles"]["digits-logreg@1.0.0"])
    assert p.api("POST", "/api/v1/models/digits-logreg/1.0.0/yank").status_code == 200
    r = p.api(
        "POST",
        "/api/v1/deployments",
        json={"name": "d", "pipelines": {"digits": {"model": "digits-logreg@1.0.0"}}},
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "yanked"


def test_unsigned_bundle_is_accepted_only_when_policy_allows(tmp_path: Path, logreg: Any) -> None:
    from edgewise.control import open_store

    from .conftest import TestClient, make_plane

    store = open_store(f"sqlite:///{tmp_path / 'cp.db'}")
    app, clock, settings = make_plane(store, tmp_path / "data", allow_unsigned_models=True)
    admin = app.state.plane.bootstrap_admin()
    with TestClient(app, raise_server_exceptions=False) as client:
        p = Plane(client, admin, clock, settings)
        r = p.push(_unsigned(tmp_path, logreg))
        assert r.status_code == 201, r.text
        assert r.json()["signers"] == []
    store.close()


def test_artifact_cache_keeps_small_files_within_its_budget(tmp_path: Path) -> None:
    from edgewise.control._registry import ArtifactCache

    cache = ArtifactCache(max_file=10, budget=20)
    files, sha = {}, {}
    for name, size in (("a", 8), ("b", 8), ("c", 8), ("big", 11)):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode()[:1] * size)
        sha[name] = hashlib.sha256(files[name].read_bytes()).hexdigest()
    assert cache.load(files["big"], sha["big"]) is None and cache.get(sha["big"]) is None
    assert cache.load(files["a"], sha["a"]) == b"a" * 8
    assert cache.load(files["b"], sha["b"]) == b"b" * 8
    assert cache.get(sha["a"]) == b"a" * 8  # a is now the most recently used
    cache.load(files["c"], sha["c"])  # over the budget: the least recently used (b) goes
    got = (cache.get(sha["a"]), cache.get(sha["b"]), cache.get(sha["c"]))
    assert got == (b"a" * 8, None, b"c" * 8)


@pytest.mark.parametrize("served", ["from memory", "streamed"])
def test_a_stored_artifact_damaged_on_disk_is_refused_and_a_push_repairs_it(
    served: str, sqlite_plane: Plane, examples: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The damaged copy had been sent to every device, each failing its digest check and
    # downloading again every 30 s, with nothing on the control plane saying why.
    from edgewise.control import _api_device, _app
    from edgewise.control._registry import ArtifactCache

    cache = ArtifactCache(max_file=8 << 20 if served == "from memory" else 0)
    monkeypatch.setattr(_api_device, "_ARTIFACTS", cache)  # this test's own
    monkeypatch.setattr(_app, "ARTIFACTS", cache)
    p = sqlite_plane
    p.trust(examples["pub"])
    path = examples["bundles"]["digits-logreg@1.0.0"]
    sha = p.push(path).json()["sha256"]
    stored = p.settings.artifacts_dir / sha[:2] / sha
    raw = bytearray(stored.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit, same size
    stored.write_bytes(bytes(raw))
    dev = p.enroll()
    url = f"/device/v1/artifacts/{sha}"
    for _ in range(2):
        r = dev.get(url)
        assert r.status_code == 503 and r.json()["error"]["code"] == "artifact_damaged"
    assert "edgewise_artifacts_damaged 1.0" in p.client.get("/metrics").text
    assert p.push(path).status_code == 200  # the same bundle again: the copy is replaced
    r = dev.get(url)
    assert r.status_code == 200 and r.content == path.read_bytes()
    assert "edgewise_artifacts_damaged 0.0" in p.client.get("/metrics").text
