from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest

from edgewise.examples import DigitsSplit
from edgewise.runtime import BadInput, Runtime, UnknownPipeline
from edgewise.runtime._scheduler import Request

from .conftest import SpecFactory, cyclic_garbage


def test_digits_pipeline_accuracy_equals_raw_onnxruntime(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    runtime.start_pipeline(make_spec(), runtime.load_model(mlp_bytes))
    raw = ort.InferenceSession(mlp_bytes, providers=["CPUExecutionProvider"])
    raw_pred = np.asarray(raw.run(["probabilities"], {"input": split.x_test})[0]).argmax(axis=1)

    pipe_pred = np.array([int(runtime.infer("digits", row).labels[0]) for row in split.x_test])

    assert np.array_equal(pipe_pred, raw_pred)
    assert float((pipe_pred == split.y_test).mean()) == float((raw_pred == split.y_test).mean())
    assert runtime.stats("digits")["nv_inference_request_success"] == len(split.x_test)


def test_preprocess_scale_takes_raw_pixel_values(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    spec = make_spec(preprocess=[{"type": "scale", "params": {"factor": 1 / 16}}])
    runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    raw_pixels = split.x_test[:50] * 16.0
    scaled = runtime.infer("digits", raw_pixels)
    direct = runtime.load_model(mlp_bytes).session.run(split.x_test[:50])
    assert scaled.labels == [str(i) for i in np.asarray(direct["probabilities"]).argmax(1)]
    assert runtime.stats("digits")["stage_duration_ms"]["preprocess"]["count"] == 1


def test_postprocess_topk_and_threshold(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    spec = make_spec(
        postprocess=[
            {"type": "topk", "params": {"k": 3}},
            {"type": "threshold", "params": {"min_confidence": 0.999999, "label": "unsure"}},
        ]
    )
    runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    result = runtime.infer("digits", split.x_test[:20])
    assert result.topk is not None and all(len(t) == 3 for t in result.topk)
    assert all(t[0][1] >= t[1][1] >= t[2][1] for t in result.topk)
    confident = [c is not None and c >= 0.999999 for c in result.confidences]
    assert [lab == "unsure" for lab in result.labels] == [not c for c in confident]


def test_softmax_turns_scores_into_probabilities(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    runtime.start_pipeline(
        make_spec(postprocess=[{"type": "softmax"}]), runtime.load_model(mlp_bytes)
    )
    conf = runtime.infer("digits", split.x_test[:5]).confidences
    assert all(c is not None and 0.1 <= c <= 1.0 for c in conf)


def test_unknown_stage_name_is_refused_at_start(
    runtime: Runtime, mlp_bytes: bytes, make_spec: SpecFactory
) -> None:
    with pytest.raises(ValueError, match="unknown postprocess stage 'nope'"):
        runtime.start_pipeline(
            make_spec(postprocess=[{"type": "nope"}]), runtime.load_model(mlp_bytes)
        )


def test_bad_input_is_counted_and_the_pipeline_keeps_serving(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    runtime.start_pipeline(make_spec(), runtime.load_model(mlp_bytes))
    with pytest.raises(BadInput):
        runtime.infer("digits", np.zeros((1, 10), np.float32))
    with pytest.raises(BadInput):
        runtime.infer("digits", np.zeros((0, 64), np.float32))
    with pytest.raises(UnknownPipeline):
        runtime.infer("nope", split.x_test[0])
    assert runtime.infer("digits", split.x_test[0]).label is not None
    stats = runtime.stats("digits")
    assert stats["nv_inference_request_bad_input"] == 2
    assert stats["nv_inference_request_success"] == 1


def test_stats_hold_latency_confidence_and_batch_histograms(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    runtime.start_pipeline(make_spec(), runtime.load_model(mlp_bytes))
    for row in split.x_test[:30]:
        runtime.infer("digits", row)
    stats = runtime.stats("digits")
    assert stats["nv_inference_request_duration_ms"]["count"] == 30
    assert stats["nv_inference_compute_infer_duration_ms"]["count"] == 30
    assert stats["confidence"]["count"] == 30
    assert stats["batch_size"]["count"] == 30
    assert set(stats["stage_duration_ms"]) >= {"model", "postprocess"}
    assert stats["p95_ms"] is not None


def test_sample_rate_keeps_every_nth_input(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    runtime.start_pipeline(make_spec(sample_rate=0.25), runtime.load_model(mlp_bytes))
    labels = [runtime.infer("digits", row).label for row in split.x_test[:40]]
    kept = runtime.sampled_inputs("digits")
    assert len(kept) == 10  # the 4th, 8th, ... request, with what each was answered
    for (x, label), i in zip(kept, range(3, 40, 4), strict=True):
        assert np.array_equal(np.asarray(x).reshape(-1), split.x_test[i]) and label == labels[i]


def test_stopped_pipeline_is_unknown_and_can_start_again(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    model = runtime.load_model(mlp_bytes)
    runtime.start_pipeline(make_spec(), model)
    with pytest.raises(ValueError, match="already running"):
        runtime.start_pipeline(make_spec(), model)
    runtime.stop_pipeline("digits")
    with pytest.raises(UnknownPipeline):
        runtime.infer("digits", split.x_test[0])
    runtime.start_pipeline(make_spec(), model)
    assert [p["name"] for p in runtime.pipelines()] == ["digits"]
    kinds = [e.kind for e in runtime.events()]
    assert kinds == ["pipeline_started", "pipeline_stopped", "pipeline_started"]


def test_prometheus_exposition_parses_and_counts(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    runtime.start_pipeline(make_spec(), runtime.load_model(mlp_bytes))
    for row in split.x_test[:7]:
        runtime.infer("digits", row)
    families = {f.name: f for f in text_string_to_metric_families(runtime.prometheus())}
    success = families["nv_inference_request_success"].samples[0]
    assert success.labels == {"pipeline": "digits"} and success.value == 7
    buckets = [s for s in families["edgewise_batch_size"].samples if s.name.endswith("_bucket")]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 7


def test_async_callers_in_one_loop_turn_share_a_batch(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    import asyncio

    runtime.start_pipeline(make_spec(batching={"max_batch": 32}), runtime.load_model(mlp_bytes))

    async def main() -> list[str | None]:
        results = await asyncio.gather(
            *(runtime.infer_async("digits", row) for row in split.x_test[:32])
        )
        return [r.label for r in results]

    labels = asyncio.run(main())
    assert labels == runtime.infer("digits", split.x_test[:32]).labels
    sizes = runtime.stats("digits")["batch_size"]
    assert sizes["count"] == 2  # one batch of 32 from the coroutines, one from infer()
    assert sizes["sum"] == 64


def test_async_groups_leave_no_reference_cycles_for_the_garbage_collector(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    # A group, its stacked requests and their results are freed by reference counting
    # once their callers have them: cyclic garbage in every loop turn made the collector
    # run often and promoted groups into its oldest generation, whose collections walk
    # every object of the process (a fifth of the c32 throughput).
    import asyncio

    runtime.start_pipeline(make_spec(batching={"max_batch": 8}), runtime.load_model(mlp_bytes))
    rows = [split.x_test[i : i + 1] for i in range(40)]

    async def main() -> None:
        for _ in range(3):  # groups of 8 (stacked in one request), plus a lone caller
            results = await asyncio.gather(*(runtime.infer_async("digits", r) for r in rows))
            assert len(results) == len(rows)
            await runtime.infer_async("digits", rows[0])

    asyncio.run(main())  # the loop's own one-time objects first
    with cyclic_garbage() as kinds:
        asyncio.run(main())
    assert not kinds & {"_Group", "Request", "Pending", "InferenceResult", "_Served"}


def test_async_bad_input_fails_alone(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    import asyncio

    runtime.start_pipeline(make_spec(), runtime.load_model(mlp_bytes))

    async def main() -> list[object]:
        return await asyncio.gather(
            runtime.infer_async("digits", split.x_test[0]),
            runtime.infer_async("digits", np.zeros(3, np.float32)),
            runtime.infer_async("nope", split.x_test[0]),
            return_exceptions=True,
        )

    ok, bad, unknown = asyncio.run(main())
    assert getattr(ok, "label", None) is not None
    assert isinstance(bad, BadInput)
    assert isinstance(unknown, UnknownPipeline)


def test_a_group_of_single_rows_is_checked_at_once_and_odd_callers_one_by_one(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    import asyncio

    runtime.start_pipeline(make_spec(batching={"max_batch": 4}), runtime.load_model(mlp_bytes))
    rows = [split.x_test[i : i + 1] for i in range(10)]
    expected = runtime.infer("digits", split.x_test[:10]).labels

    def gather(xs: list[np.ndarray], exact: bool = False) -> list[object]:
        async def main() -> list[object]:
            calls = (runtime.infer_async("digits", x, exact_dtype=exact) for x in xs)
            return await asyncio.gather(*calls, return_exceptions=True)

        return asyncio.run(main())

    def labels(out: list[object]) -> list[object]:
        return [r.label if hasattr(r, "label") else type(r) for r in out]

    before = runtime.stats("digits")["batch_size"]["count"]
    assert labels(gather(rows)) == expected
    assert runtime.stats("digits")["batch_size"]["count"] - before == 3  # 4 + 4 + 2 rows
    # Numbers as JSON decodes them (float64) are cast for the model; raw tensors that
    # must carry the model's dtype are refused, each with its own error.
    wide = [r.astype(np.float64) for r in rows]
    assert labels(gather(wide)) == expected
    assert labels(gather(wide, exact=True)) == [BadInput] * 10
    # A cast number that float32 cannot hold refuses its caller only.
    huge = wide[3].copy()
    huge[0, 5] = 1e300
    assert labels(gather([*wide[:3], huge, *wide[4:]])) == [*expected[:3], BadInput, *expected[4:]]
    # One odd caller among single rows is refused alone, not cast along with the rest
    # (a bool row would turn into numbers inside one concatenated array).
    assert labels(gather([rows[0], rows[1] > 0.5, rows[2]])) == [expected[0], BadInput, expected[2]]
    out = gather([rows[0], np.zeros((1, 63), np.float32), split.x_test[4:6]])
    assert labels(out[:2]) == [expected[0], BadInput]
    assert out[2].labels == expected[4:6]  # type: ignore[attr-defined]
    # Two rows and none add up to one row each, and are still told apart.
    two, empty = gather([split.x_test[4:6], split.x_test[:0]])
    assert two.labels == expected[4:6]  # type: ignore[attr-defined]
    assert isinstance(empty, BadInput)


def test_each_request_of_a_batch_gets_only_its_own_rows(
    mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    rt = Runtime(cores=1, monitor_interval_s=None)
    try:
        rt.start_pipeline(make_spec(batching={"max_batch": 8}), rt.load_model(mlp_bytes))
        done: list[Request] = []
        rt.pause()
        reqs = [
            rt.submit("digits", split.x_test[0:2], done.append),
            rt.submit("digits", split.x_test[2:3], done.append),
            rt.submit("digits", split.x_test[3:6], done.append),
        ]
        rt.resume()
        for _ in range(1000):
            if len(done) == 3:
                break
            threading.Event().wait(0.01)
        alone = [rt.infer("digits", split.x_test[i]) for i in range(6)]
        rows = [(0, 2), (2, 3), (3, 6)]
        for req, (a, b) in zip(reqs, rows, strict=True):
            res = req.result
            assert res.labels == [r.label for r in alone[a:b]]
            assert len(res.confidences) == len(res.escalated) == b - a
            assert res.outputs["probabilities"].shape == (b - a, 10)
            assert res.to_json()["labels"] == res.labels
        assert rt.stats("digits")["batch_size"]["sum"] == 6 + 6
    finally:
        rt.close()


def test_async_callers_are_served_from_successive_event_loops(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    import asyncio

    runtime.start_pipeline(make_spec(batching={"max_batch": 8}), runtime.load_model(mlp_bytes))

    async def main() -> list[str | None]:
        results = await asyncio.gather(
            *(runtime.infer_async("digits", row) for row in split.x_test[:8])
        )
        return [r.label for r in results]

    first, second = asyncio.run(main()), asyncio.run(main())  # each run is a new loop
    assert first == second == runtime.infer("digits", split.x_test[:8]).labels
    assert runtime.stats("digits")["nv_inference_request_success"] == 8 + 8 + 1


def test_async_group_counts_its_callers_against_the_queue_capacity(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    import asyncio

    from edgewise.runtime import Rejected

    spec = make_spec(batching={"max_batch": 32, "queue_capacity": 4})
    runtime.start_pipeline(spec, runtime.load_model(mlp_bytes))
    rows = split.x_test[:10]

    async def main() -> list[object]:
        runtime.pause()  # the group queues: four callers fit, six do not
        tasks = [asyncio.ensure_future(runtime.infer_async("digits", r)) for r in rows]
        await asyncio.sleep(0.05)
        runtime.resume()
        return await asyncio.gather(*tasks, return_exceptions=True)

    out = asyncio.run(main())
    served = [r for r in out if not isinstance(r, BaseException)]
    assert [type(r) for r in out[4:]] == [Rejected] * 6
    assert [r.label for r in served] == runtime.infer("digits", rows[:4]).labels  # type: ignore[union-attr]
    stats = runtime.stats("digits")
    assert stats["nv_inference_request_rejected"] == 6
    assert stats["nv_inference_request_success"] == 4 + 1


def test_first_request_of_a_loop_turn_goes_at_once_and_the_rest_share_a_batch(
    runtime: Runtime, mlp_bytes: bytes, split: DigitsSplit, make_spec: SpecFactory
) -> None:
    import asyncio

    from edgewise.runtime._aio import LoopBatcher

    runtime.start_pipeline(make_spec(batching={"max_batch": 32}), runtime.load_model(mlp_bytes))
    batcher = LoopBatcher(runtime)  # what the HTTP app uses

    async def main() -> list[str | None]:
        calls = [batcher.infer("digits", r, first_goes_now=True) for r in split.x_test[:5]]
        return [r.label for r in await asyncio.gather(*calls)]

    labels = asyncio.run(main())
    assert labels == runtime.infer("digits", split.x_test[:5]).labels
    sizes = runtime.stats("digits")["batch_size"]
    assert sizes["count"] == 3  # 1 at once, the other 4 together, then infer()'s 5
    assert sizes["sum"] == 1 + 4 + 5


def test_metrics_fold_batches_of_mixed_tiers_and_keep_nothing_the_gc_tracks() -> None:
    # Pending batch records are flat numbers, not a tuple of lists per batch: those
    # survived until the next flush, so the collector ran from the hot path and
    # promoted them into its oldest generation (a 43 ms full collection per 100,000
    # single-row requests in one measured process).
    import gc

    from edgewise.runtime._metrics import PipelineMetrics

    m = PipelineMetrics()
    want_tiers: dict[str, int] = {}
    escalated = 0
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        for i in range(300):  # under the 512 that flushes from the hot path
            tier = "fallback" if i % 3 == 0 else "primary"
            n_esc = 1 if i % 5 == 0 else 0
            m.record(100.0 + i, tier, 4, n_esc, (1.0, 0.5, 2.0), [0.1, 30.0], 3.0,
                     [0.95, 0.45, None, 0.85])  # fmt: skip
            want_tiers[tier] = want_tiers.get(tier, 0) + 4 - n_esc
            escalated += n_esc
        grown = gc.get_count()[0] - before
    finally:
        if was_enabled:
            gc.enable()
    assert grown < 30  # a tuple of lists per batch: 900 or more
    snap = m.snapshot()
    assert snap["nv_inference_request_success"] == 600
    assert snap["nv_inference_exec_rows"] == 1200
    assert snap["nv_inference_fallback"] == 200
    assert snap["tier_count"] == {**want_tiers, "cascade": escalated}
    assert snap["tier_duration_ms"]["fallback"]["count"] == 100
    assert snap["tier_duration_ms"]["primary"]["count"] == 200
    assert snap["tier_duration_ms"]["cascade"]["count"] == 60
    assert snap["batch_size"]["count"] == 300 and snap["batch_size"]["sum"] == 1200
    queue = snap["nv_inference_queue_duration_ms"]
    assert queue["count"] == 600 and queue["sum"] == pytest.approx(300 * 30.1)
    total = snap["nv_inference_request_duration_ms"]
    assert total["count"] == 600 and total["sum"] == pytest.approx(300 * (30.1 + 6.0))
    assert snap["confidence"]["count"] == 900  # the None rows are not observed
    assert m.p95(400.0) == pytest.approx(33.0)  # waits plus the batch's own time
    assert m.snapshot()["nv_inference_request_success"] == 600  # flushed once only
