"""The operator CLI against a real server: flags, environment, config file, --json."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgewise.cli import main

EDGEWISE = str(Path(sys.executable).parent / "edgewise")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    old = sys.argv
    sys.argv = ["edgewise", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def test_server_init_prints_the_admin_token_last_and_only_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = subprocess.run(
        [EDGEWISE, "server", "init", "--data", str(data)], capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    token = first.stdout.strip().splitlines()[-1]
    assert token.startswith("ewo_") and " " not in token
    assert (data / "control-plane.key").exists()
    again = subprocess.run(
        [EDGEWISE, "server", "init", "--data", str(data)], capture_output=True, text=True
    )
    assert again.returncode == 1 and again.stderr.startswith("error: already initialised")
    assert "Traceback" not in again.stderr


def test_operator_commands_round_trip(
    live_server: dict[str, Any],
    examples: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    conn = ["--server", live_server["base"], "--token", live_server["admin"]]
    code, out, _ = run(capsys, "server", "trust-key", str(examples["dir"] / "examples.pub"), *conn)
    assert code == 0 and "trusted publisher key" in out
    code, out, _ = run(capsys, "model", "push", str(examples["bundles"]["digits-mlp@1.0.0"]), *conn)
    assert code == 0 and out.startswith("pushed digits-mlp@1.0.0")

    # From here on the connection comes from the environment, then from the config file.
    monkeypatch.setenv("EDGEWISE_SERVER", live_server["base"])
    monkeypatch.setenv("EDGEWISE_TOKEN", live_server["admin"])
    code, out, _ = run(capsys, "model", "list", "--json")
    assert code == 0 and json.loads(out)[0]["ref"] == "digits-mlp@1.0.0"
    code, out, _ = run(capsys, "device", "enroll-token", "--label", "site=a", "--max-uses", "2")
    assert code == 0 and out.strip().splitlines()[-1].startswith("ewe_")
    code, out, _ = run(
        capsys, "deploy", "create", "--name", "base", "-p", "digits=digits-mlp@1.0.0"
    )
    assert code == 0 and "digits-mlp@1.0.0" in out
    code, out, _ = run(capsys, "deploy", "list", "--json")
    assert [d["name"] for d in json.loads(out)] == ["base"]
    code, out, _ = run(capsys, "deploy", "dry-run", "--name", "x", "-p", "d=nope@1.0.0")
    assert code == 1 and "not in the registry" in out
    code, _, err = run(capsys, "deploy", "create", "--name", "x", "-p", "d=nope@1.0.0")
    assert code == 1 and err.startswith("error: 409") and "Traceback" not in err

    monkeypatch.delenv("EDGEWISE_SERVER")
    monkeypatch.delenv("EDGEWISE_TOKEN")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"server": live_server["base"], "token": live_server["admin"]}))
    monkeypatch.setenv("EDGEWISE_CONFIG", str(cfg))
    code, out, _ = run(capsys, "token", "create", "--name", "ci", "--role", "viewer")
    viewer = out.strip().splitlines()[-1]
    code, out, _ = run(capsys, "token", "list", "--json")
    assert {t["name"] for t in json.loads(out)} == {"admin", "ci"}
    code, _, err = run(capsys, "deploy", "delete", "base", "--token", viewer)
    assert code == 1 and "403" in err
    code, out, _ = run(capsys, "device", "list", "--json")
    assert code == 0 and json.loads(out) == []
    code, out, _ = run(capsys, "audit", "verify")
    assert code == 0 and "intact" in out
    export = tmp_path / "audit.jsonl"
    code, out, _ = run(capsys, "audit", "export", "--out", str(export))
    assert code == 0 and len(export.read_text().splitlines()) >= 5
    code, out, _ = run(capsys, "model", "yank", "digits-mlp@1.0.0")
    assert code == 0 and out.strip() == "yanked digits-mlp@1.0.0"
    code, out, _ = run(capsys, "model", "list", "--json")
    assert [m["yanked"] for m in json.loads(out) if m["ref"] == "digits-mlp@1.0.0"] == [True]
    code, out, _ = run(capsys, "model", "unyank", "digits-mlp@1.0.0")
    assert code == 0 and out.strip() == "unyanked digits-mlp@1.0.0"
    code, out, _ = run(capsys, "model", "list", "--json")
    assert [m["yanked"] for m in json.loads(out) if m["ref"] == "digits-mlp@1.0.0"] == [False]
    code, _, err = run(capsys, "model", "unyank", "digits-mlp@9.9.9")
    assert code == 1 and "no model digits-mlp@9.9.9" in err
    code, out, _ = run(capsys, "deploy", "delete", "base")
    assert code == 0


def test_unreachable_server_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "token", "list", "--server", "http://127.0.0.1:1", "--token", "x")
    assert code == 1 and err.startswith("error: cannot reach") and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("name", "content"),
    [
        pytest.param("nested.json", b"[" * 100_000 + b"]" * 100_000, id="nested-past-the-parser"),
        pytest.param("latin1.json", '{"name": "caf\xe9"}'.encode("latin-1"), id="not-utf8"),
    ],
)
def test_unreadable_spec_and_config_files_are_one_line_errors(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    name: str,
    content: bytes,
) -> None:
    bad = tmp_path / name
    bad.write_bytes(content)
    conn = ["--server", "http://127.0.0.1:1", "--token", "x"]  # never reached
    for args in (
        ["deploy", "create", "--name", "b", "--file", str(bad), *conn],
        ["deploy", "create", "--name", "b", "-p", "d=m@1", "--egress", str(bad), *conn],
        ["rollout", "start", "-d", "b", "--to", "2", "--spec", str(bad), *conn],
    ):
        code, _, err = run(capsys, *args)
        assert code == 1 and err.startswith("error: ") and str(bad) in err, (args, err)
        assert len(err.splitlines()) == 1, err
    monkeypatch.setenv("EDGEWISE_CONFIG", str(bad))
    code, _, err = run(capsys, "token", "list")
    assert code == 1 and err.startswith("error: cannot read config file"), err
    assert len(err.splitlines()) == 1, err


def test_an_inline_egress_nested_past_the_parser_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    deep = "{" + '"a":[' * 50_000 + "]" * 50_000 + "}"
    args = ["deploy", "create", "--name", "b", "-p", "d=m@1", "--egress", deep]
    code, _, err = run(capsys, *args, "--server", "http://127.0.0.1:1", "--token", "x")
    assert code == 1 and err.startswith("error: --egress is not valid JSON")
    assert len(err.splitlines()) == 1


def test_deploy_stages_lists_what_the_server_checks_without_a_server(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "deploy", "stages")
    assert code == 0
    lines = out.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("postprocess threshold")))
    assert lines[at + 1].split() == [
        "min_confidence",
        "number",
        "default",
        "0.5",
        ">=",
        "0,",
        "<=",
        "1",
    ]
    assert any(line.split()[:3] == ["path", "string", "required"] for line in lines)
    assert any(line.startswith("sink summary") and "(no parameters)" in line for line in lines)
    code, out, _ = run(capsys, "deploy", "stages", "--json")
    stages = {(s["kind"], s["type"]): s["params"] for s in json.loads(out)}
    from edgewise.protocol import BUILTIN_STAGE_PARAMS

    assert set(stages) == set(BUILTIN_STAGE_PARAMS)  # every built-in stage, 17 of them
    assert stages[("preprocess", "transpose")]["required"] == ["axes"]
    topk = stages[("postprocess", "topk")]
    assert topk["properties"]["k"]["minimum"] == 1 and topk["additionalProperties"] is False


def test_first_server_start_prints_the_admin_token_once(tmp_path: Path) -> None:
    import os
    import signal

    import httpx

    from .conftest import free_port

    port = free_port()
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [EDGEWISE, "server", "--data", str(data), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(2)]
        assert lines[0].startswith("first start: admin token")
        token = lines[1]
        for _ in range(200):
            try:
                r = httpx.get(
                    f"http://127.0.0.1:{port}/api/v1/whoami",
                    headers={"authorization": f"Bearer {token}"},
                )
                break
            except httpx.HTTPError:
                import time

                time.sleep(0.05)
        assert r.json()["role"] == "admin"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    again = subprocess.run(
        [EDGEWISE, "server", "init", "--data", str(data)], capture_output=True, text=True
    )
    assert again.returncode == 1


@pytest.mark.parametrize("value", ["broker", "broker:0", "broker:99999", "broker:x"])
@pytest.mark.parametrize("command", ["server", "agent"])
def test_a_bad_mqtt_broker_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str, value: str
) -> None:
    code, _, err = run(capsys, command, "--data", str(tmp_path / "d"), "--mqtt", value)
    assert code == 1 and err.startswith(f"error: bad --mqtt '{value}'")
    assert len(err.splitlines()) == 1


def test_the_server_hands_its_mqtt_broker_to_telemetry(tmp_path: Path) -> None:
    from edgewise.cli._common import parse_broker
    from edgewise.control import Settings, create_app, open_store
    from edgewise.control.telemetry._wiring import TelemetryConfig

    assert parse_broker(":1883") == ("127.0.0.1", 1883)
    store = open_store(f"sqlite:///{tmp_path / 'cp.db'}")
    try:
        app = create_app(
            Settings(data_dir=tmp_path / "data"),
            store,
            background=False,
            telemetry=TelemetryConfig(mqtt="10.0.0.5:1884"),
        )
        assert app.state.telemetry_runtime.config.mqtt == "10.0.0.5:1884"
    finally:
        store.close()


def test_deploy_warns_and_rollout_refuses_when_targeted_agents_are_too_old(
    live_server: dict[str, Any],
    examples: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    import time

    import httpx

    from edgewise.protocol import spec_vocabulary, vocabulary_digest

    from .conftest import Plane

    with httpx.Client(base_url=live_server["base"], timeout=10) as http:
        p = Plane(http, live_server["admin"], time.time, None)  # type: ignore[arg-type]
        p.deploy_digits(examples, "base", "site=a")
        old = p.enroll(labels={"site": "a"})
        p.enroll(labels={"site": "a"})  # an agent that reported nothing
        terms = [t for t in spec_vocabulary() if not t.startswith("batching.overflow")]
        agent = {"version": "0.0.9", "spec_digest": vocabulary_digest(terms)}
        agent["spec_vocabulary"] = terms
        assert old.post("/device/v1/report", {"revision": 0, "agent": agent}).status_code == 200
    conn = ["--server", live_server["base"], "--token", live_server["admin"]]
    code, out, _ = run(capsys, "device", "list", "-l", "site=a", *conn)
    listed = {line.split()[0]: line.split()[5] for line in out.splitlines()}
    assert code == 0 and listed[old.id] == "0.0.9" and set(listed.values()) == {"0.0.9", "?"}
    code, out, _ = run(capsys, "device", "show", old.id, *conn)
    assert (
        code == 0
        and (f"agent 0.0.9: knows {len(terms)} spec terms (digest {agent['spec_digest']})")
        in out.splitlines()
    )
    camera = {"model": "digits-mlp@1.0.0", "batching": {"overflow": "drop_oldest"}}
    spec = tmp_path / "camera.json"
    spec.write_text(json.dumps({"name": "cams", "selector": "site=a", "pipelines": {"c": camera}}))
    code, out, err = run(capsys, "deploy", "create", "--file", str(spec), *conn)
    assert code == 0 and out.startswith("dep-"), err
    assert err.splitlines() == [
        "warning: 1 targeted device(s) cannot run it:",
        f"  {old.id}: pipeline 'c': the agent does not know batching.overflow, "
        "batching.overflow=drop_oldest (upgrade the agent)",
    ]
    spec.write_text(json.dumps({"pipelines": {"digits": camera}}))
    code, out, err = run(capsys, "deploy", "update", "base", "--file", str(spec), *conn)
    assert code == 0 and "revision 2 created" in out
    assert err.startswith("warning: 1 targeted device(s) cannot run revision 2:")
    code, out, err = run(capsys, "rollout", "start", "-d", "base", "--to", "2", *conn)
    assert code == 1 and out == "" and len(err.splitlines()) == 1, err
    assert "1 of 2 targeted devices run agents that cannot run revision 2" in err
    code, out, err = run(capsys, "rollout", "start", "-d", "base", "--to", "2", "--force", *conn)
    assert code == 0 and out.startswith("rollout ro-") and "2 devices" in out, err


def test_rollout_list_and_status_name_a_rollout_this_server_cannot_read(
    live_server: dict[str, Any],
    examples: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A newer replica stored a state this build does not know (see the rollout API test).
    import httpx
    from sqlalchemy import select, update

    from edgewise.control._schema import rollouts

    base, admin = live_server["base"], live_server["admin"]
    conn = ["--server", base, "--token", admin]
    auth = {"authorization": f"Bearer {admin}"}
    assert run(capsys, "server", "trust-key", str(examples["dir"] / "examples.pub"), *conn)[0] == 0
    for ref in ("digits-mlp@1.0.0", "digits-mlp@1.1.0"):
        assert run(capsys, "model", "push", str(examples["bundles"][ref]), *conn)[0] == 0
    pipelines = {"digits": {"model": "digits-mlp@1.0.0"}}
    body = {"name": "base", "selector": "site=a", "pipelines": pipelines}
    assert httpx.post(f"{base}/api/v1/deployments", json=body, headers=auth).status_code == 201
    revised = {"pipelines": {"digits": {"model": "digits-mlp@1.1.0"}}}
    r = httpx.post(f"{base}/api/v1/deployments/base/revisions", json=revised, headers=auth)
    assert r.status_code < 300, r.text
    start = {"deployment": "base", "to_revision": 2}
    r = httpx.post(f"{base}/api/v1/rollouts", json=start, headers=auth)
    assert r.status_code == 201, r.text
    rollout_id = r.json()["id"]
    for _ in range(200):  # no device matches: the server's driver completes it at once
        view = httpx.get(f"{base}/api/v1/rollouts/{rollout_id}", headers=auth).json()
        if view["state"] == "completed":
            break
        time.sleep(0.05)
    assert view["state"] == "completed", view
    engine = live_server["app"].state.plane.store.engine
    with engine.begin() as c:
        document, version = c.execute(select(rollouts.c.document, rollouts.c.version)).one()
        newer = {**document, "state": "quarantined"}
        c.execute(update(rollouts).values(document=newer, version=version + 1))
    code, out, err = run(capsys, "rollout", "list", *conn)
    assert code == 0, err
    assert out.startswith(f"{rollout_id}  ") and "  unreadable here: rollout " in out, out
    code, out, err = run(capsys, "rollout", "status", rollout_id, *conn)
    assert code == 1 and err.startswith("error: 503 rollout_unreadable: rollout "), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
