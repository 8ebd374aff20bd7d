"""The prompts of a generated set: which of the real set's captions video ``i`` of run ``seed`` gets.

Two designs, both prefix-stable (prompt ``i`` depends only on the captions, the seed and ``i``, so a
screen's videos are the first ones of the full protocol's) and both exact over a cycle (a cycle of
``len(captions)`` prompts reproduces the real caption counts):

* ``rounds`` (any captions): the r-th occurrences of every distinct caption form round r; each round is
  shuffled by the seed and the rounds concatenated. The first prompts are distinct captions, but which
  ones is left to the shuffle, so 32 prompts drawn from 128 attribute combinations over- or
  under-represent single attributes at random.
* ``balanced`` (captions with strata, e.g. the attributes a dataset's captions name): a greedy sequential
  design. Each next prompt is the unused caption whose cells lie furthest below their share of the
  real set (in counts, each stratum weighted by its number of cells); the cells are every stratum alone,
  every pair of strata, and the caption itself (so the first ``len(set(captions))`` prompts are still
  distinct captions). The seed only breaks ties, so every prefix follows the real set's one- and two-way
  distributions as closely as its length allows and two seeds draw different but equally balanced sets.

Why balanced: measured on the shipped tiny base (11 subnets, two seeds), the prompt composition was
most of a 32-video FVD's seed-to-seed noise. The between-subnet reliability of the FVDs (between-subnet
variance over the total) was 0.86 with rounds and 0.96 with the balanced design, and balanced at 16
videos matched rounds at 48 (``results/fvd-precision``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import lru_cache

import numpy as np

PROMPT_STREAM = 0x9120_3417  # tag of the seeded draws below

Strata = Callable[[str], Mapping[str, Hashable]]  # a caption -> its strata, e.g. {"colour": 2, ...}


def generation_prompts(
    captions: Sequence[str], seed: int, stop: int, start: int = 0, strata: Strata | None = None
) -> list[str]:
    """Prompts ``start .. stop - 1`` of run ``seed``: the ``balanced`` design when ``strata`` is given,
    else ``rounds`` (module docstring); past ``len(captions)`` prompts a new cycle starts."""
    if not captions:
        raise ValueError("the real set has no captions to draw prompts from")
    captions = tuple(captions)
    size, out = len(captions), []
    for cycle in range(start // size, (stop - 1) // size + 1 if stop > start else 0):
        if strata is None:
            order = _rounds_cycle(captions, seed, cycle)
        else:
            order = _balanced_cycle(captions, _strata_table(captions, strata), seed, cycle)
        lo, hi = max(start - cycle * size, 0), min(stop - cycle * size, size)
        out.extend(order[lo:hi])
    return out


@lru_cache(maxsize=64)
def _rounds_cycle(captions: tuple[str, ...], seed: int, cycle: int) -> tuple[str, ...]:
    occurrences: dict[str, int] = {}
    rounds: list[list[str]] = []
    for caption in captions:  # first-appearance order, so the draw depends on the real set alone
        k = occurrences[caption] = occurrences.get(caption, -1) + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(caption)
    order: list[str] = []
    for r, members in enumerate(rounds):
        rng = np.random.default_rng([PROMPT_STREAM, seed, cycle, r])
        order.extend(members[k] for k in rng.permutation(len(members)))
    return tuple(order)


@lru_cache(maxsize=16)  # parsed once per real set, not per candidate and rung
def _strata_table(captions: tuple[str, ...], strata: Strata) -> tuple[tuple[Hashable, ...], ...]:
    """Each caption's strata as a tuple over the sorted stratum names (every caption must name the same)."""
    parsed = [dict(strata(c)) for c in captions]
    names = sorted(parsed[0])
    for caption, labels in zip(captions, parsed):
        if sorted(labels) != names:
            raise ValueError(f"caption {caption!r} names strata {sorted(labels)}, the first one {names}")
    return tuple(tuple(labels[n] for n in names) for labels in parsed)


@lru_cache(maxsize=64)
def _balanced_cycle(
    captions: tuple[str, ...], table: tuple[tuple[Hashable, ...], ...], seed: int, cycle: int
) -> tuple[str, ...]:
    n, k = len(captions), len(table[0])
    # Cells an item fills, by stratum: (stratum j, its value) for every j, (pair j < l, their values),
    # ("caption", the caption itself).
    strata = [*range(k), *itertools.combinations(range(k), 2), "caption"]
    keys = [[(j, row[j]) for j in range(k)]
            + [((j, l), (row[j], row[l])) for j, l in itertools.combinations(range(k), 2)]
            + [("caption", caption)] for caption, row in zip(captions, table)]  # fmt: skip
    ids: dict[tuple, int] = {}
    cells = np.array([[ids.setdefault(key, len(ids)) for key in row] for row in keys])
    share = np.bincount(cells.ravel(), minlength=len(ids)) / n  # every cell's share of the real set
    # A stratum's deficits count once per cell it has, so a finer stratum (pairs, captions) is worth as
    # much as a coarse one: with uniform shares this is "count / share", each cell's fill in expected items.
    levels = {stratum: sum(1 for key in ids if key[0] == stratum) for stratum in strata}
    weight = np.array([levels[key[0]] for key in ids], dtype=float)
    counts = np.zeros(len(ids))
    # The seed breaks ties only: the first minimum in a seeded order of the items wins.
    tie_order = np.random.default_rng([PROMPT_STREAM, seed, cycle]).permutation(n)
    cells, left, order = cells[tie_order], np.ones(n, dtype=bool), []
    for t in range(n):
        # The item whose cells are the furthest below their share of t + 1 prompts (weighted counts).
        load = ((counts[cells] - share[cells] * (t + 1)) * weight[cells]).sum(axis=1)
        load[~left] = np.inf
        pick = int(np.argmin(load))
        counts[cells[pick]] += 1
        left[pick] = False
        order.append(captions[tie_order[pick]])
    return tuple(order)
