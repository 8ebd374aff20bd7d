"""Multi-objective evolutionary search in the OFA / AutoFormer tradition, on ``SubnetConfig`` directly.

A population of candidates is bred with the search space's own ``mutate`` and ``crossover``; parents are
selected NSGA-II style — feasible before infeasible (by total constraint violation), then by
non-dominated rank (``moocore.is_nondominated``, peeled front by front) and crowding distance; binary
tournaments pick the parents of each child. Each bred candidate is queued in the Optuna study
(``study.enqueue_trial``) just before it is asked, so its trial is RUNNING while it is measured, exactly
as an Optuna sampler's (``StudySearcher``); evolution and the Optuna samplers sit side by side in one
store, and every generation reads its population back from the study, so a resumed search (or another
worker's evolution trials) feeds the next one.

Trajectory searches (``CandidateEncoding.trajectory``: step choices, or more than one segment) breed
schedules. Crossover aligns the parents by position in the trajectory: the child takes parent ``a``'s
structure (step count and splits), and each of its segments crosses ``a``'s subnet with the subnet ``b``
runs at the middle of that segment (as a fraction of ``b``'s own trajectory); each segment's subnet is
then mutated with the space's ``mutate``. Then, each with probability ``structure_prob``: the step count
moves to a neighbouring choice (splits keep their place as fractions of the trajectory), one split moves
to the neighbouring place on the encoding's split grid (one step at 4-8 steps, up to two at 16), and a
segment is split in two (up to ``K``; the new segment a mutated copy of the old one's subnet) or two
neighbours are merged. Every bred schedule stays on the encoding's grid, so it is queued through its
parameters unchanged. A search without trajectories breeds exactly as before (the same random draws).
"""

from __future__ import annotations

from bisect import bisect
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
        structure_prob: float = 0.3,
    ):
        super().__init__(name, study, encoding, spaces, seed)
        self.rng = np.random.default_rng(seed)
        self.population_size, self.mutate_prob, self.crossover_prob = population, mutate_prob, crossover_prob
        self.max_tries, self.structure_prob = max_tries, structure_prob
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
        if e.trajectory:
            return self._random_schedule()
        base = self.base_space.sample(self.rng, resolution=e.base_resolution)
        return self._chain(
            base, self.ssr_space.sample(self.rng, resolution=e.resolution) if e.chain else None
        )

    def _tournament(self, parents: list[Individual]) -> Individual:
        i, j = self.rng.choice(len(parents), size=2, replace=len(parents) < 2)
        return parents[min(i, j)]  # parents are sorted best-first by ``select``

    def _breed_subnet(self, space: SearchSpace, x: SubnetConfig, y: SubnetConfig) -> SubnetConfig:
        child = space.crossover(x, y, self.rng) if self.rng.random() < self.crossover_prob else x
        return space.mutate(child, self.rng, self.mutate_prob)

    def _child(self, parents: list[Individual]) -> Candidate:
        a, b = self._tournament(parents), self._tournament(parents)
        if self.encoding.trajectory:
            return self._child_schedule(a.candidate, b.candidate)
        base = self._breed_subnet(self.base_space, a.candidate.base, b.candidate.base)
        ssr = (
            self._breed_subnet(self.ssr_space, a.candidate.ssr, b.candidate.ssr)
            if self.encoding.chain
            else None
        )
        return self._chain(base, ssr)

    # -- breeding schedules (trajectory searches) ----------------------------------------------------
    def _schedule(
        self, steps: int, cuts: list[int], subnets: list[SubnetConfig], ssr: SubnetConfig | None
    ) -> Candidate:
        """``subnets[i]`` up to step ``cuts[i]`` (the last one up to ``steps``), in canonical form."""
        cand = self._chain(subnets[0], ssr)
        ends = [*cuts, steps]
        cand = Candidate.schedule(steps, list(zip(ends, subnets, strict=True)), cand.ssr)
        return cand.normalized(self.encoding.default_steps)

    def _random_schedule(self) -> Candidate:
        e = self.encoding
        steps = int(self.rng.choice(e.step_counts))
        places = e.split_steps(steps)
        k = min(int(self.rng.integers(1, e.segments + 1)), len(places) + 1)
        cuts = sorted(int(c) for c in self.rng.choice(places, size=k - 1, replace=False)) if k > 1 else []
        subnets = [self.base_space.sample(self.rng, resolution=e.base_resolution) for _ in range(k)]
        ssr = self.ssr_space.sample(self.rng, resolution=e.resolution) if e.chain else None
        return self._schedule(steps, cuts, subnets, ssr)

    def _child_schedule(self, a: Candidate, b: Candidate) -> Candidate:
        e = self.encoding
        segs_a = a.trajectory(e.default_steps)
        steps_a = segs_a[-1].last
        per_step_b = b.subnet_per_step(e.default_steps)
        # Crossover aligned by position: each of a's segments meets what b runs at its middle.
        subnets = []
        for seg in segs_a:
            middle = (seg.first - 1 + seg.last) / (2 * steps_a)  # fraction of the trajectory
            other = per_step_b[min(int(middle * len(per_step_b)), len(per_step_b) - 1)]
            subnets.append(self._breed_subnet(self.base_space, seg.subnet, other))
        ssr = self._breed_subnet(self.ssr_space, a.ssr, b.ssr) if e.chain else None
        cuts = [seg.last for seg in segs_a[:-1]]
        if steps_a not in e.step_counts or any(c not in e.split_steps(steps_a) for c in cuts):
            # Off this search's grid (not bred here): onto the nearest step count and splits.
            nearest = min(e.step_counts, key=lambda s: (abs(s - steps_a), -s))
            cuts, subnets = self._rescale(cuts, subnets, steps_a, nearest)
            steps_a = nearest
        steps, cuts, subnets = self._mutate_structure(steps_a, cuts, subnets)
        return self._schedule(steps, cuts, subnets, ssr)

    def _rescale(
        self, cuts: list[int], subnets: list[SubnetConfig], old: int, new: int
    ) -> tuple[list[int], list[SubnetConfig]]:
        """Splits of an ``old``-step trajectory moved to the places on the grid of a ``new``-step one
        nearest to the same fraction of the trajectory; a segment left empty is dropped."""
        places = self.encoding.split_steps(new)
        kept_cuts: list[int] = []
        kept = [subnets[0]]
        for cut, subnet in zip(cuts, subnets[1:], strict=True):
            if not places:
                break
            end = min(places, key=lambda q: (abs(q / new - cut / old), q))
            if kept_cuts and end <= kept_cuts[-1]:
                kept[-1] = subnet  # the segment before this split is empty now: it is the one dropped
                continue
            kept_cuts.append(end)
            kept.append(subnet)
        return kept_cuts, kept

    def _mutate_structure(
        self, steps: int, cuts: list[int], subnets: list[SubnetConfig]
    ) -> tuple[int, list[int], list[SubnetConfig]]:
        e, p = self.encoding, self.structure_prob
        cuts, subnets = list(cuts), list(subnets)
        # A neighbouring step count (the inward one at either end); splits keep their place.
        if len(e.step_counts) > 1 and self.rng.random() < p:
            i = e.step_counts.index(steps)
            j = i + (1 if self.rng.random() < 0.5 else -1)
            new = e.step_counts[j if 0 <= j < len(e.step_counts) else 2 * i - j]
            cuts, subnets = self._rescale(cuts, subnets, steps, new)
            steps = new
        places = e.split_steps(steps)
        # One split to the neighbouring place on the grid, if both its segments keep a step.
        if cuts and self.rng.random() < p:
            i = int(self.rng.integers(len(cuts)))
            k = places.index(cuts[i]) + (1 if self.rng.random() < 0.5 else -1)
            low, high = cuts[i - 1] if i else 0, cuts[i + 1] if i + 1 < len(cuts) else steps
            if 0 <= k < len(places) and low < places[k] < high:
                cuts[i] = places[k]
        # Split a segment in two (up to K) or merge two neighbours.
        if self.rng.random() < p:
            free = [q for q in places if q not in cuts]
            if len(cuts) + 1 < e.segments and free and (not cuts or self.rng.random() < 0.5):
                cut = int(self.rng.choice(free))
                i = bisect(cuts, cut)  # the segment the new split falls in
                cuts.insert(i, cut)
                # A copy of the same subnet would merge straight back: the new part gets a mutated one.
                subnets.insert(
                    i + 1, self.base_space.mutate(subnets[i], self.rng, max(self.mutate_prob, 0.5))
                )
            elif cuts:
                i = int(self.rng.integers(len(cuts)))
                subnets[i : i + 2] = [subnets[i + int(self.rng.integers(2))]]
                del cuts[i]
        return steps, cuts, subnets

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
