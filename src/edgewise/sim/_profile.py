"""Who each simulated device is: labels, faults it suffers, its random streams (pure).

Everything here is a function of the seed and the device index, so one seed always gives
the same fleet: the same labels on the same devices, the same devices offline, the same
clock skews. Each device draws from its own `random.Random` streams (seeded with the
text "seed/index/purpose"), so adding devices or reordering their network traffic never
changes what an existing device draws.

Label spec (the `--labels` option)::

    hw=cpu-small:0.5,cpu-large:0.5;site=lab,store-1,store-2

Keys are separated by ";", values by ","; a value may carry a weight after ":" (values
without one share what is left equally). Counts per value are exact (largest remainder),
then shuffled over the devices, so a 50/50 split of 10 devices is 5 and 5.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgewise.sim._faults import Faults

__all__ = [
    "DeviceProfile",
    "LabelSpec",
    "assign_labels",
    "device_rng",
    "parse_labels",
    "plan_fleet",
]

LabelSpec = Mapping[str, Sequence[tuple[str, float]]]


def device_rng(seed: int, index: int, purpose: str) -> random.Random:
    """One independent random stream of one device."""
    return random.Random(f"{seed}/{index}/{purpose}")


def parse_labels(text: str) -> dict[str, list[tuple[str, float]]]:
    """Parse a label spec into key -> [(value, weight)] with weights summing to 1.

    Raises:
        ValueError: naming the malformed part.
    """
    out: dict[str, list[tuple[str, float]]] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(f"label spec part {part!r} is not key=value[,value...]")
        if key in out:
            raise ValueError(f"label key {key!r} given twice")
        weighted: list[tuple[str, float | None]] = []
        for item in (v.strip() for v in values.split(",")):
            if not item:
                raise ValueError(f"empty value in label spec part {part!r}")
            value, colon, weight_text = item.partition(":")
            weight: float | None = None
            if colon:
                try:
                    weight = float(weight_text)
                except ValueError:
                    raise ValueError(
                        f"weight {weight_text!r} of {key}={value} is not a number"
                    ) from None
                if not weight >= 0:
                    raise ValueError(f"weight of {key}={value} must be >= 0")
            weighted.append((value.strip(), weight))
        names = [v for v, _ in weighted]
        if len(set(names)) != len(names):
            raise ValueError(f"label key {key!r} repeats a value")
        given = sum(w for _, w in weighted if w is not None)
        free = [v for v, w in weighted if w is None]
        if given > 1.0 + 1e-9 or (not free and given <= 0):
            raise ValueError(f"weights of label key {key!r} must sum to at most 1 (and above 0)")
        share = (1.0 - given) / len(free) if free else 0.0
        total = given + share * len(free)
        out[key] = [(v, (share if w is None else w) / total) for v, w in weighted]
    return out


def _exact_counts(weights: Sequence[float], n: int) -> list[int]:
    # Largest remainder: counts sum to n and follow the weights as closely as integers can.
    raw = [w * n for w in weights]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def assign_labels(spec: LabelSpec, n: int, seed: int) -> list[dict[str, str]]:
    """Labels of devices 0..n-1: exact proportions per key, shuffled by the seed."""
    labels: list[dict[str, str]] = [{} for _ in range(n)]
    for key, values in spec.items():
        counts = _exact_counts([w for _, w in values], n)
        column = [v for (v, _), c in zip(values, counts, strict=True) for _ in range(c)]
        random.Random(f"{seed}/labels/{key}").shuffle(column)
        for i, value in enumerate(column):
            labels[i][key] = value
    return labels


@dataclass(frozen=True)
class DeviceProfile:
    """What one simulated device is, decided before it starts.

    Attributes:
        index: position in the fleet (the RNG streams hang off it).
        labels: labels it asks for at enrollment.
        offline: it enrolls, then stays dark for `Faults.offline_for_s` (None: the run).
        clock_skew_s: its clock minus the real clock.
        old_agent: it runs an older agent (`Faults.old_agents`).
    """

    index: int
    labels: Mapping[str, str]
    offline: bool
    clock_skew_s: float
    old_agent: bool = False


def plan_fleet(
    n: int, seed: int, labels: LabelSpec, faults: Faults, start_index: int = 0
) -> list[DeviceProfile]:
    """The profiles of devices `start_index .. start_index + n - 1` (pure).

    The offline devices are exactly round(offline_fraction * n), picked by the seed, and
    so are the old agents (round(old_agents * n)).
    """
    total = start_index + n
    all_labels = assign_labels(labels, total, seed)

    def picked(fraction: float, purpose: str) -> set[int]:
        chosen = list(range(start_index, total))
        random.Random(f"{seed}/{purpose}/{start_index}").shuffle(chosen)
        return set(chosen[: round(fraction * n)])

    offline = picked(faults.offline_fraction, "offline")
    old = picked(faults.old_agents, "old-agent") if faults.old_agents else set()
    profiles = []
    for i in range(start_index, total):
        skew_rng = device_rng(seed, i, "skew")
        skew = skew_rng.uniform(-faults.clock_skew_s, faults.clock_skew_s)
        profiles.append(
            DeviceProfile(
                index=i,
                labels=all_labels[i],
                offline=i in offline,
                clock_skew_s=skew,
                old_agent=i in old,
            )
        )
    return profiles
