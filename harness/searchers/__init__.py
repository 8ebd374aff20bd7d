"""Searchers: Optuna samplers and a native evolutionary searcher behind one small interface.

``base.Searcher`` is the interface and its contract; ``registry`` maps names to implementations
(``optuna_searcher.OptunaSearcher``, ``evolution.EvolutionSearcher``).
"""

from harness.searchers.base import Searcher
from harness.searchers.registry import REGISTRY, SEARCHERS, make_searcher, searcher_class, study_sampler

__all__ = ["REGISTRY", "SEARCHERS", "Searcher", "make_searcher", "searcher_class", "study_sampler"]
