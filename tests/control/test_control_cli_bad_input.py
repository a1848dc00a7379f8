"""Bad input to the operator CLI: one clear line and a non-zero exit, never a false success.

Where the input must be refused before any request, the server is an unreachable port:
a request that went out would fail with "cannot reach" instead.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from .test_control_cli import run

NOWHERE = ["--server", "http://127.0.0.1:1", "--token", "x"]


def refusal(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run `edgewise ARGS`, check it failed with one error line, and return that line."""
    code, out, err = run(capsys, *args)
    assert code == 1 and out == "", (out, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.mark.parametrize(
    "args",
    [
        ["token", "revoke", ""],
        ["deploy", "delete", ""],
        ["deploy", "show", ""],
        ["deploy", "history", ""],
        ["device", "show", ""],
        ["device", "decommission", ""],
        ["rollout", "status", ""],
        ["rollout", "abort", ""],
        ["alerts", "delete-rule", ""],
    ],
)
def test_an_empty_id_is_refused_before_any_request(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    err = refusal(capsys, *args, *NOWHERE)
    assert err.endswith("must not be empty"), err


@pytest.mark.parametrize(
    "args",
    [
        ["token", "revoke", "/"],
        ["deploy", "delete", "/"],
        ["device", "show", "a/b"],
        ["model", "show", "a/b@1.0.0"],
    ],
)
def test_an_id_holding_a_slash_is_refused_before_any_request(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    err = refusal(capsys, *args, *NOWHERE)
    assert err.endswith("must not contain '/'"), err


@pytest.mark.parametrize("ident", ["#", "?", "..", ".", "tök"])
def test_an_id_reaches_the_server_as_one_path_segment(
    live_server: dict[str, Any], capsys: pytest.CaptureFixture[str], ident: str
) -> None:
    conn = ["--server", live_server["base"], "--token", live_server["admin"]]
    err = refusal(capsys, "device", "show", ident, *conn)
    assert err == f"error: 404 not_found: no device {ident}"
    err = refusal(capsys, "token", "revoke", ident, *conn)
    assert err == f"error: 404 not_found: no token {ident}"


@pytest.mark.parametrize(("method", "path"), [("DELETE", "/api/v1/tokens/"), ("GET", "/")])
def test_a_redirect_is_an_error_not_a_success(
    live_server: dict[str, Any], method: str, path: str
) -> None:
    from edgewise.cli._common import CliError
    from edgewise.cli._server import call_api

    with pytest.raises(CliError, match=r"^30[37] .* redirects .* do not follow redirects"):
        call_api(method, path, live_server["base"], live_server["admin"])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("flag", "args"),
    [
        ("--soak", ["rollout", "start", "-d", "base", "--to", "2"]),
        ("--success-threshold", ["rollout", "start", "-d", "base", "--to", "2"]),
        ("--ttl", ["device", "enroll-token"]),
        ("--window", ["fleet", "health"]),
    ],
)
def test_a_float_option_that_is_not_finite_is_named(
    capsys: pytest.CaptureFixture[str], flag: str, args: list[str], value: str
) -> None:
    err = refusal(capsys, *args, f"{flag}={value}", *NOWHERE)
    assert err == f"error: {flag} must be a finite number"


def test_waves_that_are_not_finite_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["rollout", "start", "-d", "base", "--to", "2", "--waves", "25,nan", *NOWHERE]
    err = refusal(capsys, *args)
    assert "must be a finite number" in err


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("soak_s: .nan\n", "soak_s is not a finite number"),
        ('{"soak_s": Infinity}', "soak_s is not a finite number"),
        ("gates: {success_pct: .inf}\n", "gates.success_pct is not a finite number"),
        ("note: 2024-01-01\n", "note: a date is not a JSON value; quote it"),
        ("2024-01-01: x\n", "2024-01-01: a date key is not JSON; quote it"),
        ("loop: &a [1, *a]\n", "loop[1]: circular reference"),
    ],
)
def test_a_spec_file_without_a_json_value_names_the_field(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, problem: str
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    for args in (
        ["deploy", "create", "--name", "b", "-p", "d=m@1", "--file", str(spec)],
        ["deploy", "create", "--name", "b", "-p", "d=m@1", "--egress", str(spec)],
        ["rollout", "start", "-d", "b", "--to", "2", "--spec", str(spec)],
    ):
        err = refusal(capsys, *args, *NOWHERE)
        assert err == f"error: {spec}: {problem}", args


@pytest.mark.parametrize("where", ["flag", "env"])
def test_a_token_that_is_not_ascii_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    if where == "flag":
        args = ["token", "list", "--server", "http://127.0.0.1:1", "--token", "tök"]
    else:
        monkeypatch.setenv("EDGEWISE_TOKEN", "ewo_\n")
        args = ["token", "list", "--server", "http://127.0.0.1:1"]
    err = refusal(capsys, *args)
    assert err.startswith("error: token must be ASCII")


def test_model_schema_out_that_cannot_be_written_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    err = refusal(capsys, "model", "schema", "--out", str(tmp_path))
    assert err == f"error: cannot write {tmp_path}: it is a directory; name a file"
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "schema.json"
    err = refusal(capsys, "model", "schema", "--out", str(out))
    assert err == f"error: cannot write {out}: {blocker} is not a directory"


def test_audit_export_out_that_cannot_be_written_is_one_line(
    live_server: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    conn = ["--server", live_server["base"], "--token", live_server["admin"]]
    err = refusal(capsys, "audit", "export", "-o", str(tmp_path), *conn)
    assert err == f"error: cannot write {tmp_path}: it is a directory; name a file"
    out = tmp_path / "missing" / "audit.jsonl"
    err = refusal(capsys, "audit", "export", "-o", str(out), *conn)
    assert err == f"error: cannot write {out}: directory {out.parent} does not exist"


@pytest.mark.parametrize("value", ["/nonexistent.pub", "keys/release.pub", "release.pem"])
def test_trust_key_names_a_missing_key_file(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    value: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    err = refusal(capsys, "server", "trust-key", value, *NOWHERE)
    assert err == f"error: no such file: {value}"


def test_trust_key_still_takes_a_base64_key_holding_a_slash(
    live_server: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    while "/" not in (
        b64 := base64.b64encode(
            Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        ).decode()
    ):
        pass  # about half of all keys hold a "/" in base64
    conn = ["--server", live_server["base"], "--token", live_server["admin"]]
    code, out, err = run(capsys, "server", "trust-key", b64, "--name", "slashy", *conn)
    assert code == 0 and out.startswith("trusted publisher key"), err


@pytest.mark.parametrize(
    ("flag", "refused", "accepted"),
    [
        ("--devices", ["0", "1000000"], ["1", "100000"]),
        ("--poll-wait-s", ["-5", "0", "0.5", "1e308"], ["1", "86400"]),
        ("--window-s", ["-5", "0", "1e308"], ["1", "86400"]),
        ("--clock-skew-s", ["-1", "1e308"], ["0", "86400"]),
        ("--duration", ["-1", "1e308"], ["0", "31536000"]),
        ("--time-scale", ["0", "1e308"], ["0.0001", "1000"]),
        ("--accuracy-floor", ["-0.1", "1.5"], ["0", "1"]),
        ("--regressed", ["nover", "digits-mlp@2", "@1.0.0", "Big@1.0.0"], ["m@1.0.0-rc.1"]),
    ],
)
def test_a_sim_option_outside_its_range_is_refused_before_the_fleet_is_built(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flag: str,
    refused: list[str],
    accepted: list[str],
) -> None:
    import edgewise.sim

    built: list[dict[str, Any]] = []

    def fleet(*args: Any, **kwargs: Any) -> None:
        built.append(kwargs)
        raise ValueError("the fleet was built")  # the command reports it and stops

    monkeypatch.setattr(edgewise.sim, "Fleet", fleet)
    for value in refused:
        code, _, err = run(capsys, "sim", flag, value, *NOWHERE)
        assert code != 0 and flag in err and "Traceback" not in err, (value, err)
        assert not built, value
    for value in accepted:
        code, _, err = run(capsys, "sim", flag, value, *NOWHERE)
        assert err == "error: the fleet was built\n", (value, err)
    assert len(built) == len(accepted)


@pytest.mark.parametrize("value", ["notaurl", "ftp://host/hook", "http://"])
def test_a_rollout_webhook_that_is_not_an_http_url_is_refused_before_serving(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, value: str
) -> None:
    err = refusal(capsys, "server", "--data", str(tmp_path / "cp"), "--rollout-webhook", value)
    assert (
        err == f"error: --rollout-webhook {value!r} is not an http:// or https:// URL with a host"
    )
    assert not (tmp_path / "cp").exists()  # refused before anything was created
