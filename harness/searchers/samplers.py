"""The Optuna samplers behind the Optuna searchers, by name (depends on Optuna only)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import optuna


def _nsga3(seed: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():  # NSGA-III is marked experimental; the choice is deliberate
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.NSGAIIISampler(seed=seed, population_size=10)


def _tpe(seed: int) -> optuna.samplers.BaseSampler:
    # constant_liar: a trial another worker is measuring counts as a bad result, so parallel workers
    # do not all propose next to the same promising point (no effect with one worker: nothing else runs).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=10, multivariate=True, constant_liar=True
        )


# Every sampler reads the constraints ``tell`` sets with ``trial.set_constraint`` (Optuna 5).
OPTUNA_SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=10),
    "nsga3": _nsga3,
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed, n_startup_trials=10),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}


def optuna_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """A new, seeded sampler of the Optuna searcher ``name``."""
    if name not in OPTUNA_SAMPLERS:
        raise ValueError(f"unknown Optuna searcher '{name}' (choose from {', '.join(OPTUNA_SAMPLERS)})")
    return OPTUNA_SAMPLERS[name](seed)
