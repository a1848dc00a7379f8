from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from edgewise.examples import DigitsSplit
from edgewise.runtime import Runtime, RuntimeFailure

from .conftest import SpecFactory


def test_hot_swap_under_continuous_load_fails_and_loses_no_request(
    runtime: Runtime,
    bundle_dirs: dict[str, tuple[Path, Any]],
    split: DigitsSplit,
    make_spec: SpecFactory,
) -> None:
    old_dir, old_manifest = bundle_dirs["digits-mlp@1.0.0"]
    new_dir, new_manifest = bundle_dirs["digits-mlp@1.1.0"]
    runtime.start_pipeline(make_spec(), runtime.load_model(old_dir, old_manifest))
    stop = threading.Event()
    counts = {"sent": 0, "ok": 0, "failed": 0}
    models: set[str] = set()
    lock = threading.Lock()

    def client(offset: int) -> None:
        i = offset
        while not stop.is_set():
            row = split.x_test[i % len(split.x_test)]
            i += 1
            try:
                result = runtime.infer("digits", row, timeout=10)
                with lock:
                    counts["sent"] += 1
                    counts["ok"] += 1
                    models.add(result.model)
            except RuntimeFailure:
                with lock:
                    counts["sent"] += 1
                    counts["failed"] += 1

    threads = [threading.Thread(target=client, args=(k * 100,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):  # swap back and forth while the clients keep going
            new = runtime.load_model(new_dir, new_manifest)
            assert runtime.health_check(new, new_manifest).ok
            assert runtime.swap_model("digits", new) == "digits-mlp@1.0.0"
            old = runtime.load_model(old_dir, old_manifest)
            assert runtime.swap_model("digits", old) == "digits-mlp@1.1.0"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)

    stats = runtime.stats("digits")
    assert counts["failed"] == 0
    assert counts["ok"] == counts["sent"] > 0
    assert stats["nv_inference_request_success"] == counts["ok"]
    assert stats["nv_inference_request_failure"] == 0
    assert "digits-mlp@1.0.0" in models
    swaps = [e.reason for e in runtime.events() if e.kind == "model_swapped"]
    assert swaps[:2] == [
        "digits-mlp@1.0.0 -> digits-mlp@1.1.0",
        "digits-mlp@1.1.0 -> digits-mlp@1.0.0",
    ]
