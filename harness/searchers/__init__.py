"""Searchers: Optuna samplers and a native evolutionary searcher behind one small interface."""

from harness.searchers.base import SEARCHERS, Searcher, make_searcher

__all__ = ["SEARCHERS", "Searcher", "make_searcher"]
