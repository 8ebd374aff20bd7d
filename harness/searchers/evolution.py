"""Multi-objective evolutionary search in the OFA / AutoFormer tradition, on ``SubnetConfig`` directly.

A population of candidates is bred with the search space's own ``mutate`` and ``crossover``; parents are
selected NSGA-II style — feasible before infeasible (by total constraint violation), then by
non-dominated rank (``moocore.is_nondominated``, peeled front by front) and crowding distance; binary
tournaments pick the parents of each child. Every evaluated candidate is added to the Optuna study
(``study.add_trial``), so evolution and Optuna samplers sit side by side in one store, and a resumed
search rebuilds its population from the study.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import moocore
import numpy as np
import optuna
from optuna.trial import TrialState

from harness.candidates import Candidate
from harness.searchers.base import Searcher
from harness.searchers.encoding import CandidateEncoding, project_to_cap

CONSTRAINTS_KEY = "constraints"  # Optuna's system attr for trial.set_constraint values


@dataclass
class Individual:
    candidate: Candidate
    values: np.ndarray     # objectives (minimised)
    violation: float       # sum of positive constraint values (0 = feasible)


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


class EvolutionSearcher(Searcher):
    name = "evolution"

    def __init__(self, study: optuna.Study, encoding: CandidateEncoding, spaces, seed: int = 0,
                 directions: int = 2, population: int = 10, mutate_prob: float = 0.2,
                 crossover_prob: float = 0.5, max_tries: int = 50):
        self.study, self.encoding = study, encoding
        self.base_space, self.ssr_space = spaces
        self.rng = np.random.default_rng(seed)
        self.population_size, self.mutate_prob, self.crossover_prob = population, mutate_prob, crossover_prob
        self.max_tries = max_tries
        self.signs = np.array([1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0
                               for d in study.directions])
        self.pending: deque[Candidate] = deque()
        self.seen: set[str] = set()
        self.evaluated: list[Individual] = []
        self._load_history()

    def _load_history(self) -> None:
        """Rebuild the evaluated set from this searcher's trials in the study (resume)."""
        for t in self.study.get_trials(deepcopy=False):
            key, text = t.user_attrs.get("candidate_key"), t.user_attrs.get("candidate")
            if key:
                self.seen.add(key)
            if t.user_attrs.get("searcher") == self.name and t.state == TrialState.COMPLETE and text:
                cons = t.system_attrs.get(CONSTRAINTS_KEY) or []
                self.evaluated.append(Individual(Candidate.from_json(text), np.array(t.values) * self.signs,
                                                 float(sum(max(c, 0.0) for c in cons))))

    # -- breeding ------------------------------------------------------------------------------------
    def _random(self) -> Candidate:
        e = self.encoding
        base = self.base_space.sample(self.rng, resolution=e.base_resolution)
        if not e.chain:
            return Candidate(base)
        return Candidate(base, project_to_cap(self.ssr_space, self.ssr_space.sample(self.rng, resolution=e.resolution)))

    def _tournament(self, parents: list[Individual]) -> Individual:
        i, j = self.rng.choice(len(parents), size=2, replace=len(parents) < 2)
        return parents[min(i, j)]  # parents are sorted best-first by ``select``

    def _child(self, a: Individual, b: Individual) -> Candidate:
        def breed(space, x, y):
            child = space.crossover(x, y, self.rng) if self.rng.random() < self.crossover_prob else x
            return space.mutate(child, self.rng, self.mutate_prob)

        base = breed(self.base_space, a.candidate.base, b.candidate.base)
        if not self.encoding.chain:
            return Candidate(base)
        return Candidate(base, project_to_cap(self.ssr_space,
                                              breed(self.ssr_space, a.candidate.ssr, b.candidate.ssr)))

    def _breed(self) -> None:
        parents = select(self.evaluated, self.population_size)
        for _ in range(self.population_size):
            for _ in range(self.max_tries):
                cand = self._random() if len(parents) < 2 else self._child(self._tournament(parents),
                                                                           self._tournament(parents))
                if cand.key not in self.seen:
                    break
            self.seen.add(cand.key)
            self.pending.append(cand)

    # -- ask / tell ----------------------------------------------------------------------------------
    def ask(self) -> tuple[Candidate, object]:
        if not self.pending:
            self._breed()
        cand = self.pending.popleft()
        return cand, cand

    def tell(self, handle, values, constraints=None, error=None, attrs=None) -> int:
        cand: Candidate = handle
        user_attrs = {"searcher": self.name, "candidate_key": cand.key, "candidate": cand.to_json(), **(attrs or {})}
        system_attrs = {}
        if constraints:
            system_attrs[CONSTRAINTS_KEY] = [float(c) for c in constraints]
        failed = error is not None or values is None
        if failed:
            user_attrs.update(error=error or "no values", measurement_failed=True)
        trial = optuna.trial.create_trial(
            params=self.encoding.params(cand), distributions=self.encoding.distributions(),
            values=None if failed else list(values), state=TrialState.FAIL if failed else TrialState.COMPLETE,
            user_attrs=user_attrs, system_attrs=system_attrs)
        self.study.add_trial(trial)
        if not failed:
            violation = float(sum(max(c, 0.0) for c in (constraints or [])))
            self.evaluated.append(Individual(cand, np.array(values) * self.signs, violation))
        return len(self.study.get_trials(deepcopy=False)) - 1
