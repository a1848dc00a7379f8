from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgewise.examples import DigitsSplit, load_split, train_logreg, train_mlp
from edgewise.protocol import PipelineSpec
from edgewise.runtime import Runtime


def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for `cond()` to hold, failing the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[set[str]]:
    """The type names of what became cyclic garbage inside the block.

    The collector is off inside it (nothing is collected behind the test's back) and
    collects once at the end, saving what it finds; its state is restored afterwards.
    """
    kinds: set[str] = set()
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield kinds
        gc.collect()
        kinds.update(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()


def onnx_model(
    in_type: int,
    n_inputs: int = 1,
    reshape_to: list[int] | None = None,
    out_type: int = 1,
    batch: int | None = None,
) -> bytes:
    """A one-node model: input(s) [N, 4] of `in_type`, cast to `out_type` (1: float),
    or reshaped to `reshape_to` (which fails at run time when it does not fit). `batch`
    fixes N, as an export without dynamic axes does."""
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(f"x{i}", in_type, [batch, 4]) for i in range(n_inputs)]
    out = helper.make_tensor_value_info("y", out_type, None)
    if reshape_to is not None:
        shape = helper.make_tensor("shape", TensorProto.INT64, [len(reshape_to)], reshape_to)
        node = helper.make_node("Reshape", ["x0", "shape"], ["y"])
        graph = helper.make_graph([node], "g", inputs, [out], initializer=[shape])
    else:
        node = helper.make_node("Cast", ["x0"], ["y"], to=out_type)
        graph = helper.make_graph([node], "g", inputs, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.fixture(scope="session")
def split() -> DigitsSplit:
    return load_split()


@pytest.fixture(scope="session")
def mlp_bytes(split: DigitsSplit) -> bytes:
    return train_mlp(split)[0]


@pytest.fixture(scope="session")
def logreg_bytes(split: DigitsSplit) -> bytes:
    return train_logreg(split)[0]


@pytest.fixture(scope="session")
def bundle_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """Every example bundle, built, signed, verified and unpacked: ref -> (dir, manifest)."""
    from edgewise.bundle import extract, load_public_key
    from edgewise.examples import build_examples

    root = tmp_path_factory.mktemp("bundles")
    bundles = build_examples(root / "ewb")
    trust = [load_public_key(root / "ewb" / "examples.pub")]
    out = {}
    for ref, path in bundles.items():
        dest = root / "unpacked" / ref
        out[ref] = (dest, extract(path, dest, trust, fsync=False))
    return out


class FakeClock:
    """A clock that moves only when a test moves it (`clock.now += seconds`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rt(clock: FakeClock) -> Iterator[Runtime]:
    """A runtime on `clock`, without the monitor thread."""
    runtime = Runtime(cores=1, clock=clock, monitor_interval_s=None)
    yield runtime
    runtime.close()


def log_model() -> bytes:
    """y = log(x) over [N, 4]: rows with a negative number score NaN."""
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "g", [inp], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    rt = Runtime(cores=1, monitor_interval_s=None)
    try:
        yield rt
    finally:
        rt.close()


SpecFactory = Callable[..., PipelineSpec]


@pytest.fixture
def make_spec() -> SpecFactory:
    """Build a digits pipeline spec: make_spec("name", priority="critical", ...)."""

    def build(name: str = "digits", **extra: Any) -> PipelineSpec:
        body: dict[str, Any] = {"name": name, "model": {"name": "digits-mlp", "version": "1.0.0"}}
        body.update(extra)
        return PipelineSpec.model_validate(body)

    return build
