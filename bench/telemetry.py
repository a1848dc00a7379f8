"""Telemetry benchmarks (issue 7): ingest rate, drift cost, telemetry overhead, reconnect storm.

Run from the repo root: `.venv/bin/python bench/telemetry.py [--quick]`. Prints a table;
the last line is one JSON object with the issue's keys.

- ingest: gzip uploads of 500 telemetry records, decoded the way the control plane
  decodes them (`decode_upload`: gzip + JSON + every validation rule, straight to
  columns), deduplicated by (device, seq) and stored by `TelemetryIngest`. The
  headline figure is the HTTP path as the server runs it: an event loop decodes each
  upload and awaits `GroupCommit.asubmit` (uploads arriving during a write share the
  next transaction, written on a worker thread; on
  PostgreSQL two lanes, each device always in the same one, write at once). The
  serial figure is one thread decoding 20 uploads, then one `ingest_many`, and so on
  (the shape of one MQTT chunk). Against the raw rate of the same rows into a table of
  the same shape: COPY on PostgreSQL, one executemany INSERT on SQLite (no decode, no
  dedup, no acks), timed from the rows as Python tuples to the commit; on PostgreSQL
  also PostgreSQL's own share, the COPY with its text made beforehand
  (`raw_copy_server_pts_per_s_postgres`). One process each; three interleaved rounds
  on fresh databases, medians (ratio: median of each round's ingest / raw). Objects alive before the
  timed part are frozen out of the garbage collector (`gc.freeze()`), as the control
  plane does after start-up.
  What a "point" is: in `ingest_pts_per_s_*` one point = one telemetry record (one
  metric reading or event, one log row, carrying one numeric value here). Full
  `window` records (the agents' 10 s windows: counts, histograms, drift scores, ~700
  numbers each, one row each) are measured separately and reported as records/s and
  numeric values/s (`window_records_per_s_*`, `window_values_per_s_*`); the issue's
  keys use the conservative one-record-one-point figure.
- drift: `WindowAggregator` observe + close of a 150-inference window on the digits
  bundle's reference (64 features x 8 bins): milliseconds per window.
- on vs off: digits pipeline throughput (single-row requests, one thread) with the
  agent's telemetry (`RuntimeHost` sampling every 10th input, `TelemetryWindows.tick`
  once per second of serving, closing 1 s windows: 10x the default rate), against the
  same pipeline with none; short rounds alternate, so load from other processes on
  the machine hits both sides alike; the ticks are timed on their own and charged in
  full to the "on" side.
- storm: 10,000 simulated devices reconnect at once with a backlog, each draining
  through its own token bucket and the shared backoff policy, against one control plane
  with an ingest budget (429 + Retry-After beyond it); 3 % of acks are lost, so devices
  re-send. Virtual time; the writes are real (SQLite). Peak = the most records admitted
  in any one-second sliding window, over the budget; lost = records never stored;
  duplicates = records stored more than once.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import heapq
import json
import random
import sys
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select, text

from edgewise.control import _schema as cs
from edgewise.control import open_store
from edgewise.control.telemetry import GroupCommit, IngestBudget, TelemetryIngest
from edgewise.control.telemetry import _tables as tt
from edgewise.control.telemetry._decode import decode_upload
from edgewise.control.telemetry._ingest import _copy_text, _dumps
from edgewise.protocol import (
    TelemetryBatch,
    TelemetryRecord,
    decode_batch,
    encode_batch,
)

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def _store(url: str, devices: int) -> Any:
    store = open_store(url)
    tt.metadata.create_all(store.engine, checkfirst=True)
    with store.engine.begin() as c:
        c.execute(
            cs.devices.insert(),
            [
                {
                    "id": f"d{i}",
                    "public_key": f"k{i}",
                    "labels": {},
                    "capabilities": {},
                    "status": "active",
                    "enrolled_at": 1.0,
                    "changed_at": 1.0,
                    "desired_revision": 0,
                    "desired_hash": "",
                    "telemetry_acked": 0,
                }
                for i in range(devices)
            ],
        )
    return store


def _bodies(devices: int, per_device: int, batch: int) -> list[tuple[str, bytes]]:
    out = []
    rng = random.Random(1)
    for start in range(1, per_device + 1, batch):
        for d in range(devices):
            recs = [
                TelemetryRecord(
                    seq=s,
                    cls="metric",
                    ts=1.7e9 + s,
                    kind="cpu.percent",
                    data={"v": round(rng.random() * 100, 2), "pipeline": "digits"},
                )
                for s in range(start, min(start + batch, per_device + 1))
            ]
            out.append((f"d{d}", encode_batch(TelemetryBatch(records=recs))))
    return out


def _numbers(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int | float):
        return 1
    if isinstance(value, dict):
        return sum(_numbers(v) for v in value.values())
    if isinstance(value, list):
        return sum(_numbers(v) for v in value)
    return 0


def bench_ingest_windows(url: str, window: dict[str, Any], quick: bool) -> dict[str, float]:
    """Full `window` records (what agents send every 10 s): records/s and values/s."""
    devices, per_device, batch = (20, 20, 10) if quick else (50, 40, 10)
    store = _store(url, devices)
    bodies = []
    for start in range(1, per_device + 1, batch):
        for d in range(devices):
            recs = [
                TelemetryRecord(
                    seq=s,
                    cls="metric",
                    ts=1.7e9 + 10 * s,
                    kind="window",
                    data={**window, "start": 1.7e9 + 10 * s - 10, "end": 1.7e9 + 10 * s},
                )
                for s in range(start, start + batch)
            ]
            bodies.append((f"d{d}", encode_batch(TelemetryBatch(records=recs))))
    ingest = TelemetryIngest(store.engine)
    t0 = time.perf_counter()
    stored = 0
    for i in range(0, len(bodies), 20):
        items = [(d, decode_upload(b)) for d, b in bodies[i : i + 20]]
        stored += ingest.ingest_many(items).inserted
    dt = time.perf_counter() - t0
    store.engine.dispose()
    return {
        "records_per_s": stored / dt,
        "values_per_s": stored * _numbers(window) / dt,
        "values_per_record": float(_numbers(window)),
    }


def _serve(ingest: TelemetryIngest, bodies: list[tuple[str, bytes]]) -> int:
    """Uploads the way the HTTP server takes them: its event loop decodes each body and
    awaits the group commit (`GroupCommit.asubmit`, whose writes run on worker threads),
    at most 64 uploads in flight."""
    group = GroupCommit(ingest)

    async def main() -> int:
        slots = asyncio.Semaphore(64)
        stored = 0

        async def one(device_id: str, cols: Any) -> None:
            nonlocal stored
            try:
                ack = await group.asubmit(device_id, cols)
                stored += ack.accepted
            finally:
                slots.release()

        tasks = []
        for d, b in bodies:
            await slots.acquire()
            tasks.append(asyncio.create_task(one(d, decode_upload(b))))
        await asyncio.gather(*tasks)
        return stored

    return asyncio.run(main())


def bench_ingest(url: str, quick: bool, serial: bool = False) -> dict[str, float]:
    devices, per_device, batch = (50, 1000, 500) if quick else (100, 2000, 500)
    store = _store(url, devices)
    bodies = _bodies(devices, per_device, batch)
    ingest = TelemetryIngest(store.engine)
    gc.freeze()  # as the server does once started (control.telemetry._wiring)
    t0 = time.perf_counter()
    stored = 0
    if serial:  # one thread: decode 20 uploads, one ingest_many, and so on
        for i in range(0, len(bodies), 20):
            items = [(d, decode_upload(b)) for d, b in bodies[i : i + 20]]
            stored += ingest.ingest_many(items).inserted
    else:
        stored = _serve(ingest, bodies)
    ingest_s = time.perf_counter() - t0
    # The same rows, raw: no decode, no dedup, no ack bookkeeping, into a table of the
    # same shape (columns, key and index) as the telemetry log.
    rows = []
    for d, b in bodies:
        for r in decode_batch(b).records:
            rows.append((d, r.seq, r.cls, r.ts, r.kind, _dumps(r.data), 1.0))
    postgres = url.startswith("postgresql")
    with store.engine.begin() as c:
        if postgres:
            c.execute(text("CREATE TABLE raw_rows (LIKE telemetry INCLUDING ALL)"))
        else:
            c.execute(
                text(
                    "CREATE TABLE raw_rows (device_id VARCHAR(64), seq BIGINT, "
                    "cls VARCHAR(8), ts FLOAT, kind VARCHAR(200), data JSON, "
                    "received_at FLOAT, PRIMARY KEY (device_id, seq))"
                )
            )
            c.execute(text("CREATE INDEX ix_raw_rows ON raw_rows (device_id, ts)"))
    raw = store.engine.raw_connection()
    t0 = time.perf_counter()
    cur = raw.cursor()
    if postgres:
        with cur.copy("COPY raw_rows FROM STDIN") as copy:  # type: ignore[attr-defined]
            copy.write(_copy_text(rows))
    else:
        cur.executemany("INSERT INTO raw_rows VALUES (?,?,?,?,?,?,?)", rows)
    raw.commit()
    raw_s = time.perf_counter() - t0
    server_s = raw_s
    if postgres:  # PostgreSQL's own share: the COPY text made before the clock starts
        cur.execute("CREATE TABLE raw_rows2 (LIKE telemetry INCLUDING ALL)")
        raw.commit()
        body = _copy_text(rows)
        t0 = time.perf_counter()
        with cur.copy("COPY raw_rows2 FROM STDIN") as copy:  # type: ignore[attr-defined]
            copy.write(body)
        raw.commit()
        server_s = time.perf_counter() - t0
    raw.close()
    with store.engine.connect() as c:
        n = c.execute(select(func.count()).select_from(cs.telemetry)).scalar()
    store.engine.dispose()
    assert n == stored == devices * per_device, (n, stored)
    return {
        "points": float(stored),
        "ingest_pts_per_s": stored / ingest_s,
        "raw_pts_per_s": len(rows) / raw_s,
        "raw_server_pts_per_s": len(rows) / server_s,
    }


def _median_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per-key medians over rounds, plus the median of each round's ingest / raw ratio."""
    out = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    out["ratio"] = float(np.median([r["ingest_pts_per_s"] / r["raw_pts_per_s"] for r in runs]))
    return out


def bench_drift(quick: bool) -> dict[str, float]:
    from edgewise.agent.telemetry import WindowAggregator, reference_from_manifest
    from edgewise.examples._models import digits_examples

    manifest, model = next(digits_examples())
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    from edgewise.examples import load_split

    x = load_split().x_test
    probs = np.asarray(sess.run(["probabilities"], {"input": x})[0])
    ref = reference_from_manifest(manifest["reference"])
    t = [0.0]
    agg = WindowAggregator(
        "digits",
        model="digits-mlp",
        version="1.0.0",
        reference=ref,
        labels=manifest["labels"],
        clock=lambda: t[0],
    )
    rng = np.random.default_rng(0)
    windows = 50 if quick else 200
    t0 = time.perf_counter()
    for _ in range(windows):
        idx = rng.integers(0, len(x), 150)
        agg.observe(x[idx], probs[idx].max(1), probs[idx].argmax(1))
        t[0] += 10
        agg.close()
    per_window_ms = (time.perf_counter() - t0) / windows * 1000
    idx = rng.integers(0, len(x), 150)
    agg.observe(x[idx], probs[idx].max(1), probs[idx].argmax(1))
    t[0] += 10
    sample = next(d for _, k, d, _ in agg.close(resources={"cpu_percent": 12.5}) if k == "window")
    return {
        "drift_ms_per_window": per_window_ms,
        "model": model,
        "manifest": manifest,
        "x": x,
        "window": sample,
    }


def bench_on_off(model: bytes, manifest: dict[str, Any], x: Any, quick: bool) -> float:
    """Digits throughput with the agent's telemetry on, over the same without.

    On: the agent's own path. `RuntimeHost` serves the pipeline (raising its sample rate
    to `TELEMETRY_SAMPLE_RATE`, so the runtime keeps every 10th input for drift) and
    `TelemetryWindows.tick` runs once per second of serving, as the agent's loop does:
    runtime stats, the sampled inputs, and a window close every tick (1 s windows, 10x
    the default rate), records buffered. Off: the same pipeline with its sampling
    switched off (the bench sets the runtime's counter; the agent has no such switch)
    and no ticks. Short serving rounds alternate, each side first in every other pair.

    Figure: the median of the pairs' throughput ratios (robust to this machine's noise:
    single rounds vary by 20 %), times the share of the "on" time left after the ticks,
    which are timed on their own: on throughput = requests / (serving + tick time).
    """
    from edgewise.agent import RuntimeHost
    from edgewise.agent._windows import TelemetryWindows

    spec = {"name": "digits", "model": {"name": "digits-mlp", "version": "1.0.0"}}
    pairs, seconds = (40, 0.05) if quick else (200, 0.05)
    buffered: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "manifest.json").write_text(json.dumps(manifest))
        host = RuntimeHost(cores=1, monitor_interval_s=None)
        rt = host.runtime
        host.serve(spec, rt.load_model(model), {})
        pipeline = rt._get("digits")
        every = pipeline._every
        windows = TelemetryWindows(
            host,
            append=buffered.extend,
            bundle_dir=lambda _name: (Path(tmp), "bench"),
            egress=dict,
            online=lambda: True,
            window_s=lambda: 1.0,
        )
        rows = [x[i : i + 1] for i in range(len(x))]
        ratios = []
        ticks_s = 0.0
        per_tick = round(1.0 / seconds)
        try:
            for pair in range(pairs):
                rates = {}
                for telemetry in (False, True) if pair % 2 == 0 else (True, False):
                    pipeline._every = every if telemetry else 0
                    n = 0
                    t_start = time.perf_counter()
                    t_end = t_start + seconds
                    while time.perf_counter() < t_end:
                        rt.infer("digits", rows[n % len(rows)])
                        n += 1
                    rates[telemetry] = n / (time.perf_counter() - t_start)
                if pair % per_tick == per_tick - 1:  # the agent's tick, once a second
                    t0 = time.perf_counter()
                    windows.tick()
                    ticks_s += time.perf_counter() - t0
                ratios.append(rates[True] / rates[False])
        finally:
            host.close()
    if not any(kind == "window" for _, kind, _, _ in buffered):
        raise RuntimeError("telemetry on buffered no window: the bench measured nothing")
    serving_s = pairs * seconds
    return float(np.median(ratios)) * serving_s / (serving_s + ticks_s)


def bench_storm(quick: bool) -> dict[str, float]:
    from edgewise.agent import Backoff, TokenBucket

    devices = 10_000
    backlog = 20 if quick else 60
    budget = 40_000.0
    batch_max = 500
    with tempfile.TemporaryDirectory() as tmp:
        store = _store(f"sqlite:///{Path(tmp) / 'storm.db'}", devices)
        ingest = TelemetryIngest(store.engine)
        now = [0.0]
        admission = IngestBudget(budget, clock=lambda: now[0])
        rng = random.Random(7)
        buffers = {
            f"d{i}": deque(
                TelemetryRecord(seq=s, cls="metric", ts=float(s), kind="m", data={"v": s})
                for s in range(1, backlog + 1)
            )
            for i in range(devices)
        }
        buckets = {d: TokenBucket(rate=200.0, burst=400.0, clock=lambda: now[0]) for d in buffers}
        backoff = Backoff(base_s=1.0, max_delay_s=30.0, rng=rng)
        attempts = {d: 0 for d in buffers}
        # Everyone reconnects within the same second.
        events = [(rng.random(), d) for d in buffers]
        heapq.heapify(events)
        admitted_at: list[tuple[float, int]] = []
        tick = 0.1
        pending: list[tuple[str, TelemetryBatch]] = []
        sent = retries = lost_acks = 0
        while events:
            t_next = events[0][0]
            tick_end = (int(t_next / tick) + 1) * tick
            pending.clear()
            waiting: list[str] = []
            while events and events[0][0] < tick_end:
                at, d = heapq.heappop(events)
                now[0] = at
                buf = buffers[d]
                records = [buf[i] for i in range(min(batch_max, len(buf)))]
                wait = buckets[d].take(0)  # shaped drain: wait for tokens, do not spend twice
                if wait > 0:
                    heapq.heappush(events, (at + wait, d))
                    continue
                retry_after = admission.admit(len(records))
                if retry_after > 0:
                    retries += 1
                    delay = backoff.delay(attempts[d], retry_after)
                    attempts[d] += 1
                    heapq.heappush(events, (at + delay, d))
                    continue
                buckets[d].take(len(records))
                attempts[d] = 0
                sent += len(records)
                admitted_at.append((at, len(records)))
                pending.append((d, TelemetryBatch(records=records)))
                waiting.append(d)
            if not pending:
                continue
            result = ingest.ingest_many(pending)  # one write per 100 ms of arrivals
            for d, ack in zip(waiting, result.acks, strict=True):
                if rng.random() < 0.03:  # the ack is lost: the device will send again
                    lost_acks += 1
                    heapq.heappush(events, (tick_end + backoff.delay(0), d))
                    continue
                buf = buffers[d]
                while buf and buf[0].seq <= ack.acked_seq:
                    buf.popleft()
                if buf:
                    heapq.heappush(events, (tick_end, d))
        with store.engine.connect() as c:
            stored = c.execute(select(func.count()).select_from(cs.telemetry)).scalar() or 0
            distinct = len(
                set(c.execute(select(cs.telemetry.c.device_id, cs.telemetry.c.seq)).all())
            )
        store.engine.dispose()
    times = sorted(admitted_at)
    peak, lo, window_sum = 0, 0, 0
    for at, n in times:  # sliding one-second window
        window_sum += n
        while times[lo][0] <= at - 1.0:
            window_sum -= times[lo][1]
            lo += 1
        peak = max(peak, window_sum)
    expected = devices * backlog
    return {
        "storm_devices": float(devices),
        "storm_records": float(expected),
        "storm_virtual_s": times[-1][0] if times else 0.0,
        "storm_peak_per_s": float(peak),
        "storm_budget_per_s": budget,
        "storm_peak_vs_budget": peak / budget,
        "storm_lost": float(expected - distinct),
        "storm_duplicates": float(stored - distinct),
        "storm_429s": float(retries),
        "storm_lost_acks": float(lost_acks),
        "storm_sent": float(sent),
    }


def _pg_url() -> tuple[str, str] | None:
    try:
        import psycopg

        name = f"ew_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", name
    except Exception as exc:  # no PostgreSQL here: report what can be measured
        print(f"PostgreSQL unavailable: {exc}", file=sys.stderr)
        return None


def _drop_pg(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (CI smoke)")
    args = parser.parse_args()
    quick = args.quick
    rows: list[tuple[str, str]] = []

    rounds = 3
    runs: dict[tuple[str, bool], list[dict[str, float]]] = {}
    for _ in range(rounds):  # interleaved, so load from elsewhere hits every variant alike
        for serial in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                url = f"sqlite:///{Path(tmp) / 'ingest.db'}"
                runs.setdefault(("sqlite", serial), []).append(bench_ingest(url, quick, serial))
            made = _pg_url()
            if made is None:
                continue
            try:
                runs.setdefault(("pg", serial), []).append(bench_ingest(made[0], quick, serial))
            finally:
                _drop_pg(made[1])
    sqlite = _median_runs(runs[("sqlite", False)])
    sqlite_serial = _median_runs(runs[("sqlite", True)])
    rows.append(("point = one telemetry record (one reading/event, one log row)", ""))
    rows.append(("ingest SQLite, HTTP path (points/s)", f"{sqlite['ingest_pts_per_s']:,.0f}"))
    rows.append(("ingest SQLite, serial (points/s)", f"{sqlite_serial['ingest_pts_per_s']:,.0f}"))
    rows.append(("raw executemany SQLite (rows/s)", f"{sqlite['raw_pts_per_s']:,.0f}"))
    rows.append(("ingest / raw SQLite", f"{sqlite['ratio']:.3f}"))
    pg = pg_serial = None
    if ("pg", False) in runs:
        pg = _median_runs(runs[("pg", False)])
        pg_serial = _median_runs(runs[("pg", True)])
        rows.append(("ingest PostgreSQL, HTTP path (points/s)", f"{pg['ingest_pts_per_s']:,.0f}"))
        rows.append(
            ("ingest PostgreSQL, serial (points/s)", f"{pg_serial['ingest_pts_per_s']:,.0f}")
        )
        rows.append(("raw COPY PostgreSQL (rows/s)", f"{pg['raw_pts_per_s']:,.0f}"))
        rows.append(
            ("  of which PostgreSQL alone (text made before)", f"{pg['raw_server_pts_per_s']:,.0f}")
        )
        rows.append(("ingest / raw PostgreSQL", f"{pg['ratio']:.3f}"))
    drift = bench_drift(quick)
    rows.append(("drift per 150-inference window (ms)", f"{drift['drift_ms_per_window']:.2f}"))
    with tempfile.TemporaryDirectory() as tmp:
        wsq = bench_ingest_windows(f"sqlite:///{Path(tmp) / 'w.db'}", drift["window"], quick)
    rows.append(
        (
            f"window records SQLite ({wsq['values_per_record']:.0f} values each)",
            f"{wsq['records_per_s']:,.0f} rec/s = {wsq['values_per_s']:,.0f} values/s",
        )
    )
    wpg = None
    made = _pg_url()
    if made is not None:
        try:
            wpg = bench_ingest_windows(made[0], drift["window"], quick)
        finally:
            _drop_pg(made[1])
        rows.append(
            (
                "window records PostgreSQL",
                f"{wpg['records_per_s']:,.0f} rec/s = {wpg['values_per_s']:,.0f} values/s",
            )
        )
    on_off = bench_on_off(drift["model"], drift["manifest"], drift["x"], quick)
    rows.append(("pipeline throughput telemetry on / off", f"{on_off:.3f}"))
    storm = bench_storm(quick)
    rows.append(
        (
            "storm: devices x backlog",
            f"{storm['storm_devices']:.0f} x {storm['storm_records'] / storm['storm_devices']:.0f}",
        )
    )
    rows.append(
        (
            "storm: peak 1 s ingest / budget",
            f"{storm['storm_peak_per_s']:,.0f} / {storm['storm_budget_per_s']:,.0f}",
        )
    )
    rows.append(
        ("storm: 429s, lost acks", f"{storm['storm_429s']:.0f}, {storm['storm_lost_acks']:.0f}")
    )
    rows.append(
        (
            "storm: lost, duplicated records",
            f"{storm['storm_lost']:.0f}, {storm['storm_duplicates']:.0f}",
        )
    )
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    result = {
        "ingest_pts_per_s_postgres": round(pg["ingest_pts_per_s"]) if pg else None,
        "ingest_pts_per_s_sqlite": round(sqlite["ingest_pts_per_s"]),
        "ingest_vs_raw_postgres": round(pg["ratio"], 3) if pg else None,
        "ingest_vs_raw_sqlite": round(sqlite["ratio"], 3),
        "raw_copy_server_pts_per_s_postgres": round(pg["raw_server_pts_per_s"]) if pg else None,
        "ingest_serial_pts_per_s_postgres": round(pg_serial["ingest_pts_per_s"])
        if pg_serial
        else None,
        "ingest_serial_pts_per_s_sqlite": round(sqlite_serial["ingest_pts_per_s"]),
        "window_records_per_s_postgres": round(wpg["records_per_s"]) if wpg else None,
        "window_values_per_s_postgres": round(wpg["values_per_s"]) if wpg else None,
        "window_records_per_s_sqlite": round(wsq["records_per_s"]),
        "window_values_per_s_sqlite": round(wsq["values_per_s"]),
        "drift_ms_per_window": round(drift["drift_ms_per_window"], 3),
        "telemetry_on_vs_off": round(on_off, 3),
        "storm_peak_vs_budget": round(storm["storm_peak_vs_budget"], 3),
        "storm_lost": int(storm["storm_lost"]),
        "storm_duplicates": int(storm["storm_duplicates"]),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
