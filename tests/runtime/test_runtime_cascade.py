from __future__ import annotations

import numpy as np
import pytest

from edgewise.examples import DigitsSplit
from edgewise.runtime import Runtime

from .conftest import SpecFactory


def test_low_confidence_rows_escalate_to_the_heavier_model(
    runtime: Runtime,
    mlp_bytes: bytes,
    logreg_bytes: bytes,
    split: DigitsSplit,
    make_spec: SpecFactory,
) -> None:
    light = runtime.load_model(logreg_bytes)
    heavy = runtime.load_model(mlp_bytes)
    spec = make_spec(cascade={"threshold": 0.6, "model": {"name": "digits-big"}})
    runtime.start_pipeline(spec, light, cascade_model=heavy)

    result = runtime.infer("digits", split.x_test)

    light_p = np.asarray(light.session.run(split.x_test)["probabilities"])
    heavy_p = np.asarray(heavy.session.run(split.x_test)["probabilities"])
    low = light_p.max(axis=1) < 0.6
    assert 0 < low.sum() < len(low)
    expected = np.where(low, heavy_p.argmax(axis=1), light_p.argmax(axis=1))
    assert result.labels == [str(k) for k in expected]
    assert result.escalated == low.tolist()
    stats = runtime.stats("digits")
    assert stats["nv_inference_escalated"] == int(low.sum())
    assert stats["tier_count"] == {"primary": int((~low).sum()), "cascade": int(low.sum())}
    assert stats["tier_duration_ms"]["cascade"]["count"] == 1
    assert stats["escalation_rate"] == pytest.approx(low.sum() / len(low))


def test_local_cascade_without_a_cascade_model_is_refused(
    runtime: Runtime, logreg_bytes: bytes, make_spec: SpecFactory
) -> None:
    spec = make_spec(cascade={"threshold": 0.6, "model": {"name": "digits-big"}})
    with pytest.raises(ValueError, match="no cascade_model"):
        runtime.start_pipeline(spec, runtime.load_model(logreg_bytes))
