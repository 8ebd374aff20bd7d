"""Searchers whose every trial lives in the Optuna study from ``ask`` to ``tell``.

``StudySearcher`` implements the ``Searcher`` contract on Optuna's ask-and-tell API: ``start`` queues the
anchors with ``study.enqueue_trial``; ``ask`` is ``study.ask``, which hands out the oldest queued (WAITING)
trial before it creates a new one, so while a candidate is measured its trial is RUNNING in the study
(counted in the budget, given heartbeats, failed by ``abandon``) on any storage and with any number of
workers. Subclasses decide what is proposed: ``OptunaSearcher`` lets the study's sampler suggest the
parameters, ``EvolutionSearcher`` queues a candidate of its own just before each ask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import optuna
from optuna.trial import Trial, TrialState

from harness.candidates import Candidate
from harness.searchers.base import Anchor, Searcher
from harness.searchers.encoding import CandidateEncoding
from harness.searchers.samplers import OPTUNA_SAMPLERS, optuna_sampler
from search_spaces import SearchSpace


class StudySearcher(Searcher):
    """The contract's ``start`` / ``ask`` / ``tell`` / ``trial_number`` / ``abandon`` on the study itself."""

    def start(self, anchors: Sequence[Anchor]) -> None:
        for fraction, cand in anchors:
            self._enqueue(cand, anchor_fraction=fraction)

    def _enqueue(self, cand: Candidate, **attrs) -> None:
        self.study.enqueue_trial(self.encoding.params(cand), user_attrs={"candidate_key": cand.key, **attrs})

    def _queue_next(self) -> None:
        """Hook run before each ``study.ask``: queue this searcher's own next candidate (none here)."""

    def ask(self) -> tuple[Candidate, Trial]:
        self._queue_next()
        trial = self.study.ask()
        cand = self.encoding.suggest(trial)  # a queued trial's parameters are fixed: its candidate comes back
        trial.set_user_attr("searcher", self.name)
        trial.set_user_attr("candidate_key", cand.key)
        trial.set_user_attr("candidate", cand.to_json())
        return cand, trial

    def tell(
        self,
        handle: Trial,
        values: Sequence[float] | None,
        constraints: Sequence[float] | None = None,
        error: str | None = None,
        attrs: dict | None = None,
    ) -> int:
        self.annotate(handle, attrs or {})
        if error is not None or values is None:
            handle.set_user_attr("error", error or "no values")
            handle.set_user_attr("measurement_failed", True)
            self.study.tell(handle, state=TrialState.FAIL)
        else:
            for i, c in enumerate(constraints or ()):
                handle.set_constraint(f"c{i}", c)
            self.study.tell(handle, [float(v) for v in values])
        return handle.number

    def trial_number(self, handle: Trial) -> int:
        return handle.number

    def abandon(self, handle: Trial) -> None:
        self.study.tell(handle, state=TrialState.FAIL, skip_if_finished=True)

    def annotate(self, handle: Trial, attrs: dict) -> None:
        for k, v in attrs.items():
            handle.set_user_attr(k, v)  # written through to the storage at once

    def prune(self, handle: Trial, attrs: dict | None = None) -> int:
        self.annotate(handle, attrs or {})
        self.study.tell(handle, state=TrialState.PRUNED)
        return handle.number

    def requeue(self, candidate: Candidate, attrs: dict | None = None) -> None:
        self._enqueue(candidate, **(attrs or {}))


def worker_seed(seed: int, worker: int) -> int:
    """The searcher seed of the ``worker``-th process to join a study searched with ``seed``: worker 0
    keeps ``seed`` (a single run is reproducible from it), the others get independent streams, so
    workers starting together do not propose the same candidates."""
    return seed if worker == 0 else int(np.random.SeedSequence([seed, worker]).generate_state(1)[0])


def resumed_seed(seed: int, n_trials: int) -> int:
    """The sampler seed of a searcher that resumes a study holding ``n_trials`` trials."""
    return int(np.random.SeedSequence([seed, n_trials]).generate_state(1)[0])


class OptunaSearcher(StudySearcher):
    """Candidates suggested by the study's Optuna sampler (TPE, NSGA-II/III, GP, random), decoded from
    one categorical parameter per layer ratio and per droppable component (``CandidateEncoding``).

    On a study that already holds asked trials (a resumed or joined search) the study's sampler is
    replaced by one seeded from ``(seed, number of those trials)``: a sampler fresh from ``seed`` would replay the first
    run's random start-up proposals, candidates that are already in the study.
    """

    names = tuple(OPTUNA_SAMPLERS)

    def __init__(
        self,
        name: str,
        study: optuna.Study,
        encoding: CandidateEncoding,
        spaces: tuple[SearchSpace, SearchSpace | None],
        seed: int = 0,
    ):
        super().__init__(name, study, encoding, spaces, seed)
        n = sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))  # queued: not yet
        # Always this searcher's own seed: workers joining one study pass distinct ones (``worker_seed``).
        study.sampler = self.study_sampler(name, resumed_seed(seed, n) if n else seed)

    @classmethod
    def study_sampler(cls, name: str, seed: int) -> optuna.samplers.BaseSampler:
        return optuna_sampler(name, seed)
