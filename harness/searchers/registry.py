"""Searchers by name: the registry, the study's sampler for each, and the ``make_searcher`` factory."""

from __future__ import annotations

from collections.abc import Sequence

import optuna

from harness.searchers.base import Searcher
from harness.searchers.encoding import CandidateEncoding
from harness.searchers.evolution import EvolutionSearcher
from harness.searchers.optuna_searcher import OptunaSearcher
from search_spaces import SearchSpace

REGISTRY: dict[str, type[Searcher]] = {
    name: cls for cls in (OptunaSearcher, EvolutionSearcher) for name in cls.names
}
SEARCHERS: tuple[str, ...] = tuple(REGISTRY)


def searcher_class(name: str) -> type[Searcher]:
    if name not in REGISTRY:
        raise ValueError(f"unknown searcher '{name}' (choose from {', '.join(SEARCHERS)})")
    return REGISTRY[name]


def study_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The sampler to create (or load) the study of searcher ``name`` with, seeded with ``seed``."""
    return searcher_class(name).study_sampler(name, seed)


def make_searcher(
    name: str,
    study: optuna.Study,
    encoding: CandidateEncoding,
    space_ops: tuple[SearchSpace, SearchSpace | None],
    seed: int,
    objectives: Sequence[str],
    constrained: bool,
) -> Searcher:
    """Searcher ``name`` on ``study`` (created with ``study_sampler(name, seed)``). ``objectives`` must
    match the study's directions; ``constrained`` is informational: constraints arrive with each ``tell``
    and every searcher reads them from the told trials."""
    del constrained
    if len(objectives) != len(study.directions):
        raise ValueError(f"{len(objectives)} objectives for a study with {len(study.directions)} directions")
    return searcher_class(name)(name, study, encoding, space_ops, seed)
