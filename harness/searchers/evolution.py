"""Multi-objective evolutionary search in the OFA / AutoFormer tradition, on ``SubnetConfig`` directly.

A population of candidates is bred with the search space's own ``mutate`` and ``crossover``; parents are
selected NSGA-II style — feasible before infeasible (by total constraint violation), then by
non-dominated rank (``moocore.is_nondominated``, peeled front by front) and crowding distance; binary
tournaments pick the parents of each child. Each bred candidate is queued in the Optuna study
(``study.enqueue_trial``) just before it is asked, so its trial is RUNNING while it is measured, exactly
as an Optuna sampler's (``StudySearcher``); evolution and the Optuna samplers sit side by side in one
store, and every generation reads its population back from the study, so a resumed search (or another
worker's evolution trials) feeds the next one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import moocore
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.candidates import Candidate
from harness.searchers.encoding import CandidateEncoding, project_to_cap
from harness.searchers.optuna_searcher import StudySearcher
from search_spaces import SearchSpace, SubnetConfig


@dataclass
class Individual:
    candidate: Candidate
    values: np.ndarray  # objectives (minimised)
    violation: float  # sum of positive constraint values (0 = feasible)


def nondominated_ranks(values: np.ndarray) -> np.ndarray:
    """Front index of each row (0 = Pareto front), by repeatedly peeling ``moocore.is_nondominated``."""
    ranks = np.full(len(values), -1)
    remaining = np.arange(len(values))
    rank = 0
    while remaining.size:
        front = moocore.is_nondominated(values[remaining], maximise=False, keep_weakly=True)
        ranks[remaining[front]] = rank
        remaining = remaining[~front]
        rank += 1
    return ranks


def crowding_distance(values: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance within one front (boundary points get infinity)."""
    n, m = values.shape
    dist = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(values[:, j])
        span = values[order[-1], j] - values[order[0], j]
        dist[order[0]] = dist[order[-1]] = np.inf
        if span > 0:
            dist[order[1:-1]] += (values[order[2:], j] - values[order[:-2], j]) / span
    return dist


def select(population: list[Individual], k: int) -> list[Individual]:
    """The best ``k``: feasible first, then rank, then crowding distance (descending)."""
    feasible = [p for p in population if p.violation <= 0]
    infeasible = sorted((p for p in population if p.violation > 0), key=lambda p: p.violation)
    chosen: list[Individual] = []
    if feasible:
        vals = np.array([p.values for p in feasible])
        ranks = nondominated_ranks(vals)
        for r in range(ranks.max() + 1):
            idx = np.flatnonzero(ranks == r)
            crowd = crowding_distance(vals[idx])
            for i in idx[np.argsort(-crowd)]:
                if len(chosen) < k:
                    chosen.append(feasible[i])
    return (chosen + infeasible)[:k]


def violation(trial: FrozenTrial) -> float:
    """Total constraint violation of a told trial (0 = feasible)."""
    return float(sum(max(c, 0.0) for c in trial.constraints.values()))


class EvolutionSearcher(StudySearcher):
    """NSGA-II-style evolution of ``population`` candidates per generation (see the module docstring)."""

    names = ("evolution",)

    def __init__(
        self,
        name: str,
        study: optuna.Study,
        encoding: CandidateEncoding,
        spaces: tuple[SearchSpace, SearchSpace | None],
        seed: int = 0,
        population: int = 10,
        mutate_prob: float = 0.2,
        crossover_prob: float = 0.5,
        max_tries: int = 50,
    ):
        super().__init__(name, study, encoding, spaces, seed)
        self.rng = np.random.default_rng(seed)
        self.population_size, self.mutate_prob, self.crossover_prob = population, mutate_prob, crossover_prob
        self.max_tries = max_tries
        self.signs = np.array(
            [1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0 for d in study.directions]
        )
        self.pending: deque[Candidate] = deque()
        self.seen: set[str] = set()
        self.evaluated: list[Individual] = []

    @classmethod
    def study_sampler(cls, name: str, seed: int) -> optuna.samplers.BaseSampler:
        """Every candidate of this searcher is queued with all its parameters fixed before it is asked,
        so the study's sampler never draws a value: a seeded ``RandomSampler`` is the inert choice."""
        return optuna.samplers.RandomSampler(seed=seed)

    def _sync(self) -> None:
        """Read the candidates already in the study and this searcher's completed trials (the population
        to breed from) back from the study: this run's, a resumed run's and other workers'."""
        trials = self.study.get_trials(deepcopy=False)
        self.seen = {t.user_attrs["candidate_key"] for t in trials if "candidate_key" in t.user_attrs}
        self.evaluated = [
            Individual(
                Candidate.from_json(t.user_attrs["candidate"]), np.array(t.values) * self.signs, violation(t)
            )
            for t in trials
            if t.state == TrialState.COMPLETE
            and t.user_attrs.get("searcher") == self.name
            and "candidate" in t.user_attrs
        ]

    # -- breeding ------------------------------------------------------------------------------------
    def _chain(self, base: SubnetConfig, ssr: SubnetConfig | None) -> Candidate:
        if not self.encoding.chain:
            return Candidate(base)
        return Candidate(base, project_to_cap(self.ssr_space, ssr))

    def _random(self) -> Candidate:
        e = self.encoding
        base = self.base_space.sample(self.rng, resolution=e.base_resolution)
        return self._chain(
            base, self.ssr_space.sample(self.rng, resolution=e.resolution) if e.chain else None
        )

    def _tournament(self, parents: list[Individual]) -> Individual:
        i, j = self.rng.choice(len(parents), size=2, replace=len(parents) < 2)
        return parents[min(i, j)]  # parents are sorted best-first by ``select``

    def _child(self, parents: list[Individual]) -> Candidate:
        a, b = self._tournament(parents), self._tournament(parents)

        def breed(space: SearchSpace, x: SubnetConfig, y: SubnetConfig) -> SubnetConfig:
            child = space.crossover(x, y, self.rng) if self.rng.random() < self.crossover_prob else x
            return space.mutate(child, self.rng, self.mutate_prob)

        base = breed(self.base_space, a.candidate.base, b.candidate.base)
        ssr = breed(self.ssr_space, a.candidate.ssr, b.candidate.ssr) if self.encoding.chain else None
        return self._chain(base, ssr)

    def _novel(self, parents: list[Individual]) -> Candidate:
        """A candidate not yet in the study: children first, then random ones (a converged population),
        and a repeat only when ``2 * max_tries`` draws found nothing new."""
        for i in range(2 * self.max_tries):
            cand = self._child(parents) if len(parents) >= 2 and i < self.max_tries else self._random()
            if cand.key not in self.seen:
                break
        self.seen.add(cand.key)
        return cand

    def _breed(self) -> None:
        self._sync()
        parents = select(self.evaluated, self.population_size)
        self.pending.extend(self._novel(parents) for _ in range(self.population_size))

    def _queue_next(self) -> None:
        """Queue the next bred candidate, unless a queued trial (an anchor, say) is waiting to go first."""
        if self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return
        if not self.pending:
            self._breed()
        self._enqueue(self.pending.popleft())
