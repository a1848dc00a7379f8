"""Pure and local parts of the agent: backoff, durable files, install state machine, plan."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from edgewise.agent._backoff import Backoff, GiveUp, RetryableError
from edgewise.agent._durable import DurableJson
from edgewise.agent._install import IllegalTransition, InstallState, InstallTracker
from edgewise.agent._plan import ObservedPipeline, plan
from edgewise.agent._ratelimit import TokenBucket
from edgewise.protocol import DesiredModelRef, DesiredPipeline


class VirtualClock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def test_backoff_full_jitter_stays_under_an_exponential_cap() -> None:
    policy = Backoff(base_s=1.0, factor=2.0, max_delay_s=10.0, rng=random.Random(1))
    for attempt in range(8):
        cap = min(10.0, 2.0**attempt)
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0.0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8  # jitter spans the range, not a fixed value


def test_backoff_honours_retry_after_as_a_floor() -> None:
    policy = Backoff(base_s=0.1, max_delay_s=1.0, rng=random.Random(0))
    assert all(policy.delay(0, retry_after=5.0) >= 5.0 for _ in range(50))


def test_backoff_retries_recoverable_errors_until_success() -> None:
    clock = VirtualClock()
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise RetryableError("busy", retry_after=2.0)
        return "ok"

    policy = Backoff(base_s=0.01, clock=clock, sleep=clock.sleep, rng=random.Random(0))
    assert policy.call(flaky) == "ok"
    assert len(calls) == 4
    assert all(s >= 2.0 for s in clock.sleeps)


def test_backoff_gives_up_after_max_tries_and_max_time() -> None:
    clock = VirtualClock()

    def down() -> None:
        raise OSError("refused")

    with pytest.raises(GiveUp):
        Backoff(max_tries=3, clock=clock, sleep=clock.sleep).call(down)
    started = clock.t  # the first policy's (random) sleeps already moved the clock
    with pytest.raises(GiveUp):
        Backoff(base_s=10, max_time_s=60, clock=clock, sleep=clock.sleep).call(down)
    assert clock.t - started <= 60 + 1e-9


def test_backoff_does_not_retry_other_exceptions() -> None:
    calls = []

    def broken() -> None:
        calls.append(1)
        raise KeyError("bug")

    with pytest.raises(KeyError):
        Backoff(sleep=lambda s: None).call(broken)
    assert len(calls) == 1


def test_durable_json_commits_and_keeps_previous(tmp_path: Path) -> None:
    state = DurableJson(tmp_path / "s.json")
    assert state.load(default={"none": True}) == {"none": True}
    state.commit({"rev": 1})
    state.commit({"rev": 2})
    assert state.load() == {"rev": 2}
    assert DurableJson(tmp_path / "s.json").prev.exists()


@pytest.mark.parametrize("garbage", [b"", b'{"magic": "edgewise-st', b"\x00" * 40, b'{"doc": 1}'])
def test_torn_state_file_falls_back_to_last_committed(tmp_path: Path, garbage: bytes) -> None:
    state = DurableJson(tmp_path / "s.json")
    state.commit({"rev": 1})
    state.commit({"rev": 2})
    (tmp_path / "s.json").write_bytes(garbage)
    assert state.load() == {"rev": 1}
    assert state.recovered_from_prev
    # A commit after recovery must not make the torn file the fallback.
    state.commit({"rev": 3})
    (tmp_path / "s.json").write_bytes(garbage)
    assert state.load() == {"rev": 1}


@pytest.mark.parametrize(
    "damage",
    [
        {"pipelines": {"digits": 5}},
        {"pipelines": {"digits": {"committed": 5}}},
        {"pipelines": {"digits": {"committed": {"model": {"name": "m"}, "spec": {}}}}},
        {"pipelines": {"digits": {"tracker": {"timeline": [5]}}}},
        {"desired": 5},
        {"desired": {"document": {}, "key_id": "k", "signature": ""}},
        {"revision": "abc"},
        {"etag": 5},
        {"errors": "boom"},
        [],
    ],
)
def test_a_state_file_of_the_wrong_types_falls_back_like_a_torn_one(
    tmp_path: Path, damage: object
) -> None:
    # JSON that reads but holds the wrong types stopped the agent from starting (e.g.
    # AttributeError: 'int' object has no attribute 'get'), with a good `.prev` beside it.
    import json

    from edgewise.agent._state import AgentState, PipelineRecord, StateFile

    def good(revision: int) -> AgentState:
        committed = {"model": {"name": "digits-mlp", "slot": "a"}, "spec": {}}
        return AgentState(revision=revision, pipelines={"digits": PipelineRecord(committed)})

    path = tmp_path / "state.json"
    states = StateFile(path)
    states.save(good(1))
    states.save(good(2))
    envelope = json.loads(path.read_bytes())
    envelope["doc"] = {**envelope["doc"], **damage} if isinstance(damage, dict) else damage
    path.write_text(json.dumps(envelope))
    loaded = states.load()
    assert loaded == good(1) and states.recovered_from_prev
    states.save(good(3))  # the damaged file does not become the fallback
    path.write_text(json.dumps(envelope))
    assert states.load() == good(1)
    (tmp_path / "state.json.prev").write_text(json.dumps(envelope))
    assert states.load() == AgentState()  # neither usable: start afresh (and reinstall)


def test_install_tracker_follows_the_table_and_records_reasons() -> None:
    t = InstallTracker()
    t.restart("new model", 0.0)
    t.move(InstallState.DOWNLOADING, "0%", 1.0, 0.0)
    t.move(InstallState.DOWNLOADING, "50%", 2.0, 0.5)
    t.move(InstallState.VERIFYING, "", 3.0)
    t.move(InstallState.INSTALLING, "", 4.0)
    t.move(InstallState.HEALTH_CHECKING, "", 5.0)
    t.move(InstallState.FAILED, "health check failed: 3/10 outputs out of tolerance", 6.0)
    states = [e.state for e in t.timeline]
    assert states == [
        "pending",
        "downloading",
        "verifying",
        "installing",
        "health_checking",
        "failed",
    ]
    assert t.timeline[1].progress == 0.5
    assert InstallTracker.from_json(t.to_json()) == t


def test_install_tracker_refuses_illegal_transitions() -> None:
    t = InstallTracker()
    t.restart("new", 0.0)
    with pytest.raises(IllegalTransition):
        t.move(InstallState.ACTIVE, "skipping the health gate", 1.0)


def test_restart_closes_an_interrupted_install_as_failed() -> None:
    t = InstallTracker()
    t.restart("new", 0.0)
    t.move(InstallState.VERIFYING, "", 1.0)
    t.restart("retry", 2.0)
    assert [e.state for e in t.timeline][-2:] == ["failed", "pending"]
    assert "interrupted" in t.timeline[-2].reason


FA = "a" * 64 + "+-+-"
FB = "b" * 64 + "+-+-"


def _ref(sha: str = "a" * 64) -> DesiredModelRef:
    return DesiredModelRef(name="m", version="1", sha256=sha, size=1, url="/u")


def _want(sha: str = "a" * 64, **spec: object) -> DesiredPipeline:
    return DesiredPipeline(deployment="d", model=_ref(sha), spec=dict(spec))


def test_plan_installs_a_new_pipeline_and_stops_a_removed_one() -> None:
    actions = plan({"p": _want()}, {"old": ObservedPipeline(fingerprint=FB, running=True)}, 0.0)
    assert [(a.kind, a.pipeline) for a in actions] == [("stop", "old"), ("install", "p")]


def test_plan_is_empty_when_converged() -> None:
    assert plan({"p": _want()}, {"p": ObservedPipeline(fingerprint=FA, running=True)}, 0.0) == []


def test_plan_starts_committed_but_not_running_and_reconfigures_spec_changes() -> None:
    obs = {"p": ObservedPipeline(fingerprint=FA, running=False)}
    assert plan({"p": _want()}, obs, 0.0)[0].kind == "start"
    obs = {"p": ObservedPipeline(fingerprint=FA, running=True, spec={"priority": "normal"})}
    assert plan({"p": _want(priority="critical")}, obs, 0.0)[0].kind == "reconfigure"


def test_plan_does_not_retry_a_refused_bundle_until_its_retry_time() -> None:
    never = {"p": ObservedPipeline(fingerprint=FB, running=True, refused=FA)}
    assert plan({"p": _want()}, never, 1e9) == []
    later = {"p": ObservedPipeline(refused=FA, retry_at=100.0)}
    assert plan({"p": _want()}, later, 50.0) == []
    assert plan({"p": _want()}, later, 150.0)[0].kind == "install"


def test_plan_closes_an_install_record_the_desired_state_no_longer_wants() -> None:
    # Serving FA, which is wanted again, while the record still tells of another install.
    stale = {"p": ObservedPipeline(fingerprint=FA, running=True, settled=False)}
    (action,) = plan({"p": _want()}, stale, 0.0)
    assert action.kind == "install" and action.fingerprint == FA
    # ... unless reinstalling FA itself was refused and is held off
    held = {"p": ObservedPipeline(fingerprint=FA, running=True, settled=False, refused=FA,
                                  retry_at=100.0)}  # fmt: skip
    assert plan({"p": _want()}, held, 50.0) == []
    assert plan({"p": _want()}, held, 150.0)[0].kind == "install"


def test_plan_orders_critical_installs_first() -> None:
    desired = {"b": _want(priority="best_effort"), "c": _want(priority="critical"), "n": _want()}
    assert [a.pipeline for a in plan(desired, {}, 0.0)] == ["c", "n", "b"]


def test_token_bucket_shapes_a_backlog_in_virtual_time() -> None:
    clock = VirtualClock()
    bucket = TokenBucket(rate=100.0, burst=50.0, clock=clock)
    waited = 0.0
    for _ in range(10):
        wait = bucket.take(50)
        clock.sleep(wait)
        waited += wait
    assert waited == pytest.approx(4.5)  # 500 records, 50 free, 450 at 100/s


def test_capabilities_read_thermal_zones_and_device_nodes(tmp_path: Path) -> None:
    from edgewise.agent import collect_capabilities

    zone = tmp_path / "sys" / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("47500\n")
    (zone / "type").write_text("cpu-thermal\n")
    broken = zone.parent / "thermal_zone1"
    broken.mkdir()
    (broken / "temp").write_text("not a number")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "hailo0").write_text("")
    caps = collect_capabilities(tmp_path / "data", sys_root=tmp_path)
    want = {"zone": "thermal_zone0", "type": "cpu-thermal", "temp_c": 47.5}
    assert caps["thermal_zones"] == [want]
    assert "hailo" in caps["accelerators"]
    assert caps["cores"] >= 1 and caps["memory_mb"] > 0 and caps["disk_free_mb"] >= 0
    assert "onnxruntime" in caps["runtimes"]
    assert "CPUExecutionProvider" in caps["execution_providers"]


def test_a_report_carries_when_it_was_built() -> None:
    # The control plane keeps a device's newest report by this time: a report delayed
    # behind a newer one must not replace it.
    import json

    from edgewise.agent._report import build_report
    from edgewise.agent._state import AgentState
    from edgewise.protocol import AgentInfo

    report = build_report(AgentState(), AgentInfo(version="t"), 1_780_000_000.25)
    assert report.sent_at == 1_780_000_000.25
    assert json.loads(report.model_dump_json())["sent_at"] == 1_780_000_000.25


def test_the_agents_vocabulary_needs_no_runtime_import_and_grows_with_registered_stages() -> None:
    import subprocess
    import sys

    # An idle agent reports it without importing the runtime (numpy alone is 15 MB).
    code = (
        "import sys\n"
        "from edgewise.agent._vocabulary import agent_vocabulary\n"
        "terms, digest = agent_vocabulary()\n"
        "assert 'batching.overflow=drop_oldest' in terms and len(digest) == 16\n"
        "print(sorted(m for m in ('edgewise.runtime', 'numpy') if m in sys.modules), digest)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, idle_digest = out.stdout.rsplit(" ", 1)
    assert loaded == "[]"

    from edgewise.agent._vocabulary import agent_vocabulary, spec_refusal
    from edgewise.runtime._stages import PREPROCESS

    before, digest = agent_vocabulary()
    # The runtime's own stages are all built-ins: loading it changes nothing.
    assert digest == idle_digest.strip()
    spec = {"name": "p", "preprocess": [{"type": "crop", "params": {"box": [0, 0, 4, 4]}}]}
    assert spec_refusal(spec) == (
        "incompatible: this agent does not know preprocess:crop, preprocess:crop.box "
        "(the spec needs a newer agent)"
    )
    PREPROCESS.register("crop")(lambda params: lambda x: x)  # a plugin's stage
    try:
        after, changed = agent_vocabulary()
        assert set(after) - set(before) == {"preprocess:crop", "preprocess:crop.*"}
        assert changed != digest  # so the agent sends its terms again
        assert spec_refusal(spec) is None
    finally:
        PREPROCESS._factories.pop("crop")
    assert agent_vocabulary() == (before, digest)


def test_capabilities_are_probed_again_after_an_upgrade_and_incompatible_installs_retried() -> None:
    from edgewise.agent._capabilities import probe_key, stale
    from edgewise.agent._installer import retry_incompatible
    from edgewise.agent._state import PipelineRecord

    key = probe_key()
    assert key["onnxruntime"] and key["edgewise"]  # both installed here
    assert not stale({"memory_mb": 1, "probed_with": key}, key)
    assert stale({"memory_mb": 1, "probed_with": {**key, "onnxruntime": "1.0.0"}}, key)
    assert stale({"memory_mb": 1}, key)  # written before probes were keyed
    assert stale(None, key) and stale(["not", "a", "document"], key)

    def refused(reason: str) -> PipelineRecord:
        rec = PipelineRecord(refused="fp", retry_at=None)
        rec.tracker.restart("install m@1", 0.0)
        rec.tracker.move(InstallState.FAILED, reason, 1.0)
        return rec

    pipes = {
        "cuda": refused("incompatible: needs accelerator cuda"),
        "forged": refused("signature invalid: unknown key"),
        "fine": PipelineRecord(),
    }
    assert retry_incompatible(pipes) == ["cuda"]
    assert (pipes["cuda"].refused, pipes["cuda"].retry_at) == ("", None)
    assert pipes["forged"].refused == "fp"  # the same bundle would fail the same way


def test_the_agents_refusals_for_what_a_device_lacks_read_as_cannot_run() -> None:
    # Rollouts hold such devices back instead of counting them failed (`cannot_run`),
    # so the agent's wording and the control plane's reading must agree.
    from types import SimpleNamespace

    from edgewise.agent._installer import check_requires
    from edgewise.agent._vocabulary import spec_refusal
    from edgewise.bundle._manifest import Requires
    from edgewise.protocol import cannot_run

    caps = {"runtimes": {"onnxruntime": "1.20"}, "memory_mb": 512, "accelerators": []}
    lacking = [
        Requires(runtime="tflite"),
        Requires(runtime="onnxruntime", memory_mb=4096),
        Requires(runtime="onnxruntime", accelerators=["cuda"]),
    ]
    reasons = [check_requires(SimpleNamespace(requires=r), caps) for r in lacking]
    reasons.append(spec_refusal({"name": "p", "batching": {"spill": True}}))
    assert all(r is not None and cannot_run(r) for r in reasons), reasons
    assert check_requires(SimpleNamespace(requires=Requires(runtime="onnxruntime")), caps) is None
    # A model that does not load may be the model's fault: a failure like any other.
    assert not cannot_run("incompatible: model does not load: bad opset")
    assert not cannot_run("incompatible: pipeline refused the model: wrong input shape")
    assert not cannot_run("health check failed: sample 0")


def test_a_damaged_identity_file_is_named_not_taken_for_no_identity(tmp_path: Path) -> None:
    # "holds no identity: pass --enroll-token" sent an operator to enroll a second device.
    from edgewise.agent._identity import (
        IDENTITY_FILE,
        Identity,
        IdentityError,
        load_identity,
        save_identity,
    )

    assert load_identity(tmp_path) is None  # before the first enrollment
    me = Identity(device_id="dev-1", server="http://127.0.0.1:1")
    save_identity(tmp_path, me)
    assert load_identity(tmp_path) == me
    (tmp_path / IDENTITY_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(IdentityError, match=r"identity\.json is damaged .* restore it"):
        load_identity(tmp_path)  # one commit so far: no previous one to fall back on
    save_identity(tmp_path, me)
    save_identity(tmp_path, me)
    (tmp_path / IDENTITY_FILE).write_bytes(b"")
    assert load_identity(tmp_path) == me  # a torn file: the previous commit
