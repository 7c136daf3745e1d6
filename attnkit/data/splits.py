"""The train / val / test split of a set of items (image or audio files, spoken sentences), once for
every reader: how many go where, and which, by a seeded shuffle."""

from __future__ import annotations

import random
from typing import Iterable

from attnkit.errors import AttnkitError

SPLIT_SEED = 0


def split_counts(n: int, val_fraction: float, test_fraction: float, where: str, noun: str) -> tuple[int, int, int]:
    """(train, val, test) sizes of ``n`` items: the fractions rounded, but at least one item in every
    held-out split asked for (fraction > 0) and at least one to train on. Too few items for that is
    one error naming ``where`` (e.g. "image folder x") and what it holds (``noun``, e.g. "image")."""
    held = [max(1, round(n * f)) if f > 0 else 0 for f in (val_fraction, test_fraction)]
    need = 1 + sum(1 for count in held if count)
    plural = noun if n == 1 else f"{noun}s"
    if n < need:
        raise AttnkitError(f"{where} has {n} {plural}; give it {need} or more, so that training and every "
                           "held-out split (val, test) get one.")
    if n - sum(held) < 1:
        raise AttnkitError(f"{where} has {n} {plural}, too few to hold out {val_fraction:.0%} and "
                           f"{test_fraction:.0%}; add {noun}s or lower the fractions.")
    return n - sum(held), held[0], held[1]


def seeded_split(items: Iterable, counts: tuple[int, int, int], seed: int = SPLIT_SEED) -> tuple[list, list, list]:
    """The items shuffled by ``random.Random(seed)``, cut into (train, val, test) of ``counts``."""
    items = list(items)
    random.Random(seed).shuffle(items)
    a, b = counts[0], counts[0] + counts[1]
    return items[:a], items[a:b], items[b:]
