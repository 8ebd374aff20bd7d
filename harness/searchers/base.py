"""The ``Searcher`` interface: what a search runner may rely on, whichever searcher proposes candidates.

This module holds the interface only; the implementations live in ``optuna_searcher`` and ``evolution``
and the name -> class registry (``make_searcher``, ``study_sampler``) in ``registry``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import optuna

from harness.candidates import Candidate
from harness.searchers.encoding import CandidateEncoding
from search_spaces import SearchSpace

Anchor = tuple[float, Candidate]  # (parameter fraction, the balanced candidate at that fraction)
Handle = Any  # what ``ask`` returns beside the candidate: opaque to the runner


class Searcher(ABC):
    """Proposes candidates of one search and records their results in an Optuna study.

    The contract, in the manner of Optuna's ``BaseSampler``:

    Construction and seeding
        A searcher is built by ``registry.make_searcher`` as ``cls(name, study, encoding, spaces, seed)``,
        on a study created with ``sampler=study_sampler(name, seed)`` (the same name and seed). Every
        random choice comes from that seed: the same seed on an identical study gives the same
        sequence of candidates; a different seed a different one. ``name`` is one of ``cls.names``.

    ``start(anchors)``
        Called by the runner once, right after it created a new study (one without trials), before the
        first ``ask``. The anchors' candidates become the first ones asked, in the given order, and the
        trial of each carries the user attr ``anchor_fraction``.

    ``ask() -> (candidate, handle)``
        One candidate to measure, valid in the search space (``Candidate.validate``) at the encoding's
        resolution, and an opaque handle for exactly one later ``tell`` or ``abandon``. A searcher
        avoids re-proposing a candidate already in the study where its method allows.

    ``tell(handle, values, constraints=None, error=None, attrs=None) -> int``
        Finishes the asked trial and returns its Optuna trial number. With ``values`` (one per study
        direction) the trial is COMPLETE; with ``error`` (or ``values=None``) it is FAIL with the user
        attrs ``measurement_failed=True`` and ``error``. ``attrs`` become user attrs. ``constraints``
        (feasible when every value is <= 0) are stored with ``Trial.set_constraint`` as ``c0, c1, ...``,
        so they read back as ``FrozenTrial.constraints`` and Optuna (``study.best_trials``, the
        constraint-aware samplers) sees them; a searcher that models the history prefers feasible
        candidates. Every told trial carries the user attrs ``searcher``, ``candidate_key`` and
        ``candidate`` (``Candidate.to_json``).

    ``trial_number(handle) -> int | None``
        The Optuna number of the asked, not yet told trial (for heartbeats through the storage's
        public API), or ``None`` for a searcher that creates its trial only at ``tell``.

    ``abandon(handle)``
        Ends the asked trial as FAIL without values and without ``measurement_failed`` (Ctrl-C, a killed
        measurement); a no-op where no trial exists yet or the trial is already finished.

    ``annotate(handle, attrs)``
        Records user attrs on the asked, not yet told trial at once, where other workers see them (a
        screening result that their promotion decisions compare against).

    ``prune(handle, attrs=None) -> int``
        Ends the asked trial as PRUNED (screened at a low fidelity and not promoted; see
        ``harness.searchers.promotion``) with ``attrs`` as user attrs; returns its trial number. A pruned
        trial carries no values: samplers that model the history rank it below every complete trial,
        evolution does not breed from it, and it is not re-proposed.

    ``requeue(candidate, attrs=None)``
        Queues ``candidate`` to be asked again (before new proposals), e.g. after its measurement was
        abandoned because the machine was too busy to time it.

    Budget
        The runner owns the budget. Each ``ask`` is followed by exactly one ``tell`` or ``abandon``; a
        searcher creates trials only in ``ask`` / ``tell`` / ``start`` (``start`` queues WAITING trials,
        which count only once asked), so N ask/tell cycles leave exactly N told trials. A trial counts
        while RUNNING, once COMPLETE, or FAIL with ``measurement_failed``; abandoned ones do not.

    Resume and threads
        A searcher built on a study that already holds trials continues from them (its history lives in
        the study, nothing else is persisted). A searcher is not thread-safe: one per process / worker;
        several workers share a study through its storage (the runner serialises their ``ask`` calls).
    """

    names: ClassVar[tuple[str, ...]]  # the registry names this class serves

    def __init__(
        self,
        name: str,
        study: optuna.Study,
        encoding: CandidateEncoding,
        spaces: tuple[SearchSpace, SearchSpace | None],
        seed: int = 0,
    ):
        if name not in self.names:
            raise ValueError(f"{type(self).__name__} serves {', '.join(self.names)}, not '{name}'")
        self.name, self.study, self.encoding, self.seed = name, study, encoding, seed
        self.base_space, self.ssr_space = spaces

    @classmethod
    @abstractmethod
    def study_sampler(cls, name: str, seed: int) -> optuna.samplers.BaseSampler:
        """The sampler the runner creates (or loads) the study with for searcher ``name``."""

    @abstractmethod
    def start(self, anchors: Sequence[Anchor]) -> None:
        """Make the anchors' candidates the first asked, in order (a new study only)."""

    @abstractmethod
    def ask(self) -> tuple[Candidate, Handle]:
        """The next candidate to measure and the handle to ``tell`` or ``abandon`` it with."""

    @abstractmethod
    def tell(
        self,
        handle: Handle,
        values: Sequence[float] | None,
        constraints: Sequence[float] | None = None,
        error: str | None = None,
        attrs: dict | None = None,
    ) -> int:
        """Record the result of an asked candidate; returns the Optuna trial number."""

    @abstractmethod
    def trial_number(self, handle: Handle) -> int | None:
        """The Optuna trial number of an asked, not yet told candidate (``None``: no trial yet)."""

    @abstractmethod
    def abandon(self, handle: Handle) -> None:
        """End an asked candidate's trial as FAIL without values (no-op when there is no trial)."""

    @abstractmethod
    def annotate(self, handle: Handle, attrs: dict) -> None:
        """Record user attrs on an asked, not yet told candidate's trial, visible to other workers."""

    @abstractmethod
    def prune(self, handle: Handle, attrs: dict | None = None) -> int:
        """End an asked candidate's trial as PRUNED (not promoted past a screen); its trial number."""

    @abstractmethod
    def requeue(self, candidate: Candidate, attrs: dict | None = None) -> None:
        """Queue ``candidate`` to be asked again before new proposals."""
