"""The ``Searcher`` interface (ask / tell) and the Optuna-backed implementation.

Contract: ``ask()`` returns a ``(Candidate, handle)``; the caller measures the candidate and calls
``tell(handle, values, constraints)`` with the objective values (``None`` plus ``error`` when the
measurement failed). Randomness comes from the seed given at construction. Every told trial lives in the
Optuna study, whichever searcher produced it, so searchers compare side by side in one store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import optuna
from optuna.trial import TrialState

from harness.candidates import Candidate
from harness.searchers.encoding import CandidateEncoding

OPTUNA_SEARCHERS = ("tpe", "nsga2", "nsga3", "gp", "random")
SEARCHERS = OPTUNA_SEARCHERS + ("evolution",)


class Searcher(ABC):
    name: str

    @abstractmethod
    def ask(self) -> tuple[Candidate, object]: ...

    @abstractmethod
    def tell(self, handle, values: list[float] | None, constraints: list[float] | None = None,
             error: str | None = None, attrs: dict | None = None) -> int:
        """Record the result; returns the Optuna trial number."""


def optuna_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """Samplers read constraints that ``tell`` sets with ``trial.set_constraint`` (Optuna 5)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=10)
    if name == "nsga3":
        return optuna.samplers.NSGAIIISampler(seed=seed, population_size=10)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown Optuna searcher '{name}' (choose from {', '.join(OPTUNA_SEARCHERS)})")


class OptunaSearcher(Searcher):
    """Candidates suggested by an Optuna sampler; constraints through ``trial.set_constraint``."""

    def __init__(self, name: str, study: optuna.Study, encoding: CandidateEncoding):
        self.name, self.study, self.encoding = name, study, encoding

    def ask(self) -> tuple[Candidate, object]:
        trial = self.study.ask()
        cand = self.encoding.suggest(trial)
        trial.set_user_attr("searcher", self.name)
        trial.set_user_attr("candidate_key", cand.key)
        trial.set_user_attr("candidate", cand.to_json())
        return cand, trial

    def tell(self, handle, values, constraints=None, error=None, attrs=None) -> int:
        trial = handle
        for k, v in (attrs or {}).items():
            trial.set_user_attr(k, v)
        if error is not None or values is None:
            trial.set_user_attr("error", error or "no values")
            trial.set_user_attr("measurement_failed", True)
            self.study.tell(trial, state=TrialState.FAIL)
        else:
            if constraints:
                for i, c in enumerate(constraints):
                    trial.set_constraint(f"c{i}", c)
            self.study.tell(trial, values)
        return trial.number


def make_searcher(name: str, study: optuna.Study, encoding: CandidateEncoding, space_ops, seed: int,
                  objectives: list[str], constrained: bool) -> Searcher:
    if name == "evolution":
        from harness.searchers.evolution import EvolutionSearcher

        return EvolutionSearcher(study, encoding, space_ops, seed=seed, directions=len(objectives))
    if name not in OPTUNA_SEARCHERS:
        raise ValueError(f"unknown searcher '{name}' (choose from {', '.join(SEARCHERS)})")
    return OptunaSearcher(name, study, encoding)
