"""Reproducible stratified dev/test splits (of the probe set, and of a release's eval set when
a tournament selects among candidates): selection reads dev, the gate reads test."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")


def stratified_split(
    items: Sequence[T],
    stratum: Callable[[T], Hashable],
    item_id: Callable[[T], str],
    dev_fraction: float,
    seed: int,
) -> tuple[list[T], list[T]]:
    """(dev, test): within each stratum, in a seeded order, each item whose running count
    crosses a multiple of 1/dev_fraction goes to dev; the count runs on across strata, so the
    totals come out right even when strata are small."""
    strata: dict[Hashable, list[T]] = defaultdict(list)
    for item in items:
        strata[stratum(item)].append(item)
    dev: list[T] = []
    test: list[T] = []
    seen = 0
    for key in sorted(strata, key=repr):
        group = sorted(strata[key], key=item_id)
        random.Random(f"{seed}:split:{key!r}").shuffle(group)
        for item in group:
            to_dev = math.floor((seen + 1) * dev_fraction) > math.floor(seen * dev_fraction)
            (dev if to_dev else test).append(item)
            seen += 1
    return dev, test
