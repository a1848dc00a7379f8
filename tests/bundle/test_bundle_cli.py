"""The CLI forms of issue 2, through real subprocesses and through `main()` in process."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgewise.cli import main

from .conftest import EDGEWISE, TINY_MANIFEST, rewrite_zip


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEWISE, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def run_main(
    args: list[str | Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """Run `edgewise ARGS` in this process, exactly as the console script does."""
    monkeypatch.setattr(sys, "argv", ["edgewise", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_refusal(code: int, err: str, reason: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert f"[{reason}]" in lines[0]
    assert "Traceback" not in err


def test_cli_round_trip_keys_pack_sign_verify_inspect(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "manifest.json").write_text(json.dumps(TINY_MANIFEST))
    (src / "model.onnx").write_bytes(b"\x08\x07" * 500)
    gen = run("keys", "generate", "release", "--dir", tmp_path / "keys")
    assert gen.returncode == 0, gen.stderr
    assert (tmp_path / "keys" / "release.key").stat().st_mode & 0o777 == 0o600

    out = tmp_path / "OUT.ewb"
    packed = run("model", "pack", src, "-o", out)
    assert packed.returncode == 0, packed.stderr
    assert "tiny@1.0.0" in packed.stdout
    signed = run("model", "sign", out, "--key", tmp_path / "keys" / "release.key")
    assert signed.returncode == 0, signed.stderr
    ok = run("model", "verify", out, "--trust", tmp_path / "keys" / "release.pub")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: tiny@1.0.0")

    inspected = run("model", "inspect", out, "--json")
    assert inspected.returncode == 0
    info = json.loads(inspected.stdout)
    assert info["manifest"]["files"]["model.onnx"]["size"] == 1000
    assert len(info["signatures"]) == 1
    assert "tiny@1.0.0" in run("model", "inspect", out).stdout

    keys = json.loads(run("keys", "list", "--dir", tmp_path / "keys", "--json").stdout)
    assert [k["key_id"] for k in keys] == info["signatures"]


def test_cli_verify_of_a_tampered_bundle_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "manifest.json").write_text(json.dumps(TINY_MANIFEST))
    (src / "model.onnx").write_bytes(b"model")
    assert run("keys", "generate", "k", "--dir", tmp_path).returncode == 0
    assert run("model", "pack", src, "-o", tmp_path / "a.ewb").returncode == 0
    assert run("model", "sign", tmp_path / "a.ewb", "--key", tmp_path / "k.key").returncode == 0
    rewrite_zip(tmp_path / "a.ewb", tmp_path / "b.ewb", replace={"model.onnx": b"MODEL"})
    result = run("model", "verify", tmp_path / "b.ewb", "--trust", tmp_path / "k.pub")
    assert_one_line_refusal(result.returncode, result.stderr, "hash_mismatch")


def test_cli_sign_with_a_world_readable_key_is_refused(tmp_path: Path, signed: Path) -> None:
    assert run("keys", "generate", "loose", "--dir", tmp_path).returncode == 0
    (tmp_path / "loose.key").chmod(0o644)
    result = run("model", "sign", signed, "--key", tmp_path / "loose.key")
    assert_one_line_refusal(result.returncode, result.stderr, "key_permissions")


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ({"add": {"x.bin": b"1"}}, "unexpected_file"),
        ({"drop": ("extra/notes.txt",)}, "missing_file"),
        ({"drop_sigs": True}, "unsigned"),
        ({"add": {"../../evil": b"1"}}, "unsafe_path"),
        ({"manifest": {"version": "9.9.9"}}, "bad_signature"),
    ],
)
def test_cli_verify_refusals_name_their_reason(
    tamper: dict[str, object],
    reason: str,
    signed: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with zipfile.ZipFile(signed) as zf:
        sigs = tuple(n for n in zf.namelist() if n.startswith("signatures/"))
        manifest = json.loads(zf.read("manifest.json"))
    replace = {}
    if "manifest" in tamper:
        manifest.update(tamper["manifest"])  # type: ignore[call-overload]
        replace["manifest.json"] = json.dumps(manifest).encode()
    drop = sigs if tamper.get("drop_sigs") else tuple(tamper.get("drop", ()))  # type: ignore[call-overload]
    bad = rewrite_zip(
        signed, tmp_path / "bad.ewb", drop=drop, replace=replace, add=tamper.get("add")
    )  # type: ignore[arg-type]
    pub = tmp_path / "keys" / "alice.pub"
    code, _, err = run_main(["model", "verify", bad, "--trust", pub], monkeypatch, capsys)
    assert_one_line_refusal(code, err, reason)


@pytest.mark.parametrize("edit", [{"description": "\ud800"}, {"size": 10**30}])
def test_cli_verify_and_inspect_of_a_manifest_without_a_canonical_form(
    edit: dict[str, object],
    signed: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with zipfile.ZipFile(signed) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    if "size" in edit:
        manifest["files"]["model.onnx"]["size"] = edit["size"]
    else:
        manifest.update(edit)
    replace = {"manifest.json": json.dumps(manifest).encode()}
    bad = rewrite_zip(signed, tmp_path / "bad.ewb", replace=replace)
    code, _, err = run_main(["model", "inspect", bad], monkeypatch, capsys)
    assert_one_line_refusal(code, err, "schema_invalid")
    assert "no canonical JSON form" in err
    pub = tmp_path / "keys" / "alice.pub"
    code, _, err = run_main(["model", "verify", bad, "--trust", pub], monkeypatch, capsys)
    assert_one_line_refusal(code, err, "schema_invalid")


def test_cli_verify_threshold_and_untrusted_signer(
    signed: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice = tmp_path / "keys" / "alice.pub"
    code, _, _ = run_main(
        ["keys", "generate", "bob", "--dir", tmp_path / "keys"], monkeypatch, capsys
    )
    assert code == 0
    bob = tmp_path / "keys" / "bob.pub"
    code, _, err = run_main(["model", "verify", signed, "--trust", bob], monkeypatch, capsys)
    assert_one_line_refusal(code, err, "untrusted_signer")
    args = ["model", "verify", signed, "--trust", alice, "--trust", bob, "--threshold", "2"]
    code, _, err = run_main(args, monkeypatch, capsys)
    assert_one_line_refusal(code, err, "threshold_not_met")
    code, out, _ = run_main(
        ["model", "verify", signed, "--trust", alice, "--json"], monkeypatch, capsys
    )
    assert code == 0
    assert json.loads(out)["valid"] is True


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"PK\x03\x04truncated", "truncated_archive"), (b"garbage", "corrupt_archive")],
)
def test_cli_inspect_and_verify_of_a_broken_file(
    content: bytes,
    reason: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    signed: Path,
) -> None:
    broken = tmp_path / "broken.ewb"
    broken.write_bytes(content)
    code, _, err = run_main(["model", "inspect", broken], monkeypatch, capsys)
    assert_one_line_refusal(code, err, reason)
    pub = tmp_path / "keys" / "alice.pub"
    code, _, err = run_main(["model", "verify", broken, "--trust", pub], monkeypatch, capsys)
    assert_one_line_refusal(code, err, reason)


def test_cli_pack_of_a_manifest_breaking_the_schema(
    src_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (src_dir / "manifest.json").write_text(json.dumps({**TINY_MANIFEST, "version": "one"}))
    code, _, err = run_main(
        ["model", "pack", src_dir, "-o", tmp_path / "x.ewb"], monkeypatch, capsys
    )
    assert_one_line_refusal(code, err, "schema_invalid")
    assert "version" in err


def test_cli_missing_files_and_bad_threshold_are_user_errors(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    signed: Path,
) -> None:
    code, _, err = run_main(
        ["model", "verify", tmp_path / "none.ewb", "--trust", tmp_path / "none.pub"],
        monkeypatch,
        capsys,
    )
    assert_one_line_refusal(code, err, "key_not_found")
    pub = tmp_path / "keys" / "alice.pub"
    code, _, err = run_main(
        ["model", "verify", signed, "--trust", pub, "--threshold", "0"], monkeypatch, capsys
    )
    assert code == 1
    assert "threshold" in err
    code, _, err = run_main(
        ["model", "verify", tmp_path / "none.ewb", "--trust", pub], monkeypatch, capsys
    )
    assert_one_line_refusal(code, err, "not_found")


def test_cli_pack_and_generate_into_an_unwritable_place_are_one_line_errors(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    src_dir: Path,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for args, message in (
        (["model", "pack", src_dir, "-o", tmp_path], f"{tmp_path}: it is a directory"),
        (["model", "pack", src_dir, "-o", blocker / "x.ewb"], f"{blocker} is not a directory"),
        (["keys", "generate", "k", "--dir", blocker / "sub"], f"{blocker} is not a directory"),
        (["keys", "generate", "k", "--dir", blocker], f"{blocker} is not a directory"),
    ):
        code, out, err = run_main(args, monkeypatch, capsys)
        assert code == 1 and out == "", (args, err)
        assert len(err.splitlines()) == 1 and err.startswith("error: "), (args, err)
        assert message in err, (args, err)


def test_every_command_has_help() -> None:
    for args in (
        ["keys", "generate"], ["keys", "list"], ["model", "pack"], ["model", "sign"],
        ["model", "verify"], ["model", "inspect"], ["model", "schema"], ["examples", "build"],
        ["demo"],
    ):  # fmt: skip
        result = run(*args, "--help")
        assert result.returncode == 0, (args, result.stderr)
        assert "Usage" in result.stdout
