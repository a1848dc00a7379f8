"""Split a rollout's device snapshot into phases: a stratified canary, then waves.

The canary covers label values first: for each stratum key (`hw`, `site`, ...) every
value present in the snapshot gets at least one canary device, when the canary is large
enough (at least the number of distinct (key, value) pairs always suffices). Coverage is
a greedy set cover over the distinct label combinations, so a device that brings a new
`hw` *and* a new `site` is preferred. Remaining canary slots and the waves are drawn
from a seeded shuffle.

Waves are percents of the whole snapshot, each wave its own share; the last wave takes
whatever is left (with no waves given, one wave does). Phases partition the snapshot:
every device in exactly one. The result depends only on the set of devices and the seed,
not on input order.

Example::

    >>> devs = [(f"d{i}", {"hw": "a" if i % 2 else "b"}) for i in range(10)]
    >>> phases = plan_phases(devs, canary=2, waves=[50.0, 50.0], seed=1)
    >>> [len(p) for p in phases]
    [2, 5, 3]
    >>> sorted({dict(devs)[d]["hw"] for d in phases[0]})
    ['a', 'b']
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from edgewise.control.rollout._numbers import MAX_COUNT, check_number

__all__ = ["canary_size", "plan_phases"]


def canary_size(canary: int | str, total: int) -> int:
    """Number of canary devices for a snapshot of `total`.

    Args:
        canary: A count (int, or digits as text) or a percent as text ("5%"); a nonzero
            percent of a nonempty snapshot is at least one device.
        total: Snapshot size.

    Raises:
        ValueError: on a count outside [0, MAX_COUNT], a percent outside [0, 100], or
            other text.
    """
    if isinstance(canary, bool):
        raise ValueError("canary must be a count or a percent like '5%'")
    if isinstance(canary, int):
        check_number("canary count", canary, 0, MAX_COUNT, integer=True, unit=" devices")
        return min(canary, total)
    text = str(canary).strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ValueError(f"canary percent {canary!r} is not a number") from None
        if not 0.0 <= pct <= 100.0:
            raise ValueError("canary percent must be within 0-100")
        return min(total, math.ceil(pct * total / 100.0 - 1e-9)) if pct > 0 else 0
    if text.isascii() and text.isdigit():
        # Digits past the bound's length are over it: never parse 400 of them.
        count = int(text) if len(text) <= len(str(MAX_COUNT)) else MAX_COUNT + 1
        check_number("canary count", count, 0, MAX_COUNT, integer=True, unit=" devices")
        return min(count, total)
    raise ValueError(f"canary {canary!r} is neither a count nor a percent like '5%'")


def _check_waves(waves: Sequence[float]) -> list[float]:
    out = []
    for w in waves:
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= 100:
            raise ValueError(f"wave percent {w!r} must be a number within 0-100")
        out.append(float(w))
    return out


def _stratified_pick(
    devices: list[tuple[str, tuple[str | None, ...]]], size: int, rng: random.Random
) -> list[str]:
    """Pick `size` device ids, covering (key index, value) pairs first."""
    by_combo: dict[tuple[str | None, ...], list[str]] = {}
    for dev_id, combo in devices:
        by_combo.setdefault(combo, []).append(dev_id)
    combos = sorted(by_combo, key=lambda c: tuple("" if v is None else v for v in c))
    rng.shuffle(combos)  # seeded tie-breaking among equally useful combinations
    for ids in by_combo.values():
        rng.shuffle(ids)

    uncovered = {(i, v) for combo in combos for i, v in enumerate(combo) if v is not None}
    chosen: list[str] = []
    while uncovered and len(chosen) < size:
        best = max(combos, key=lambda c: sum((i, v) in uncovered for i, v in enumerate(c)))
        gain = {(i, v) for i, v in enumerate(best) if v is not None} & uncovered
        if not gain:
            break
        chosen.append(by_combo[best].pop())
        uncovered -= gain
        if not by_combo[best]:
            combos.remove(best)
    if len(chosen) < size:
        taken = set(chosen)
        rest = [d for d, _ in devices if d not in taken]
        rng.shuffle(rest)
        chosen += rest[: size - len(chosen)]
    return chosen


def plan_phases(
    devices: Sequence[tuple[str, Mapping[str, str]]],
    canary: int | str = "5%",
    waves: Sequence[float] = (25.0, 100.0),
    strata_keys: Sequence[str] = ("hw", "site"),
    seed: int = 0,
) -> list[list[str]]:
    """Plan the phases of a rollout.

    Args:
        devices: The snapshot: (device id, labels) pairs; ids must be unique.
        canary: Canary size, a count or a percent ("5%").
        waves: Percent of the snapshot per wave; the last wave takes the rest.
        strata_keys: Label keys whose values the canary must cover.
        seed: Seed of every random choice (same seed, same plan).

    Returns:
        `[canary, wave 1, ..., wave n]`, each a list of device ids (possibly empty),
        together a partition of the snapshot.

    Raises:
        ValueError: on duplicate ids or invalid canary / wave figures.
    """
    ids = [d for d, _ in devices]
    if len(set(ids)) != len(ids):
        raise ValueError("device ids in a rollout snapshot must be unique")
    wave_pcts = _check_waves(waves) or [100.0]
    snapshot = sorted(
        ((dev_id, tuple(labels.get(k) for k in strata_keys)) for dev_id, labels in devices),
        key=lambda d: d[0],
    )
    total = len(snapshot)
    rng = random.Random(seed)
    canary_ids = _stratified_pick(snapshot, canary_size(canary, total), rng)
    taken = set(canary_ids)
    rest = [d for d, _ in snapshot if d not in taken]
    rng.shuffle(rest)

    phases = [canary_ids]
    start = 0
    for i, pct in enumerate(wave_pcts):
        last = i == len(wave_pcts) - 1
        count = len(rest) - start if last else round(pct * total / 100.0)
        phases.append(rest[start : start + count])
        start = min(len(rest), start + count)
    return phases
