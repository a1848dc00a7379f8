from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgewise.examples import DigitsSplit, load_split, train_logreg, train_mlp
from edgewise.protocol import PipelineSpec
from edgewise.runtime import Runtime


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
