"""Conformance of every registered searcher to the ``Searcher`` contract (``harness/searchers/base.py``).

In the spirit of Optuna's sampler test suites: one set of tests, parametrised over the registry, on a
real study and the real tiny search space, with a cheap synthetic objective computed from the candidate
(no model forward, no diffusion).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from harness.candidates import Candidate
from harness.searchers import SEARCHERS, Searcher, make_searcher, searcher_class, study_sampler
from harness.searchers.encoding import CandidateEncoding
from harness.searchers.evolution import Individual, select
from search_spaces import build_supernet

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

TOLD = (TrialState.COMPLETE, TrialState.FAIL)
FRACTIONS = (0.4, 0.6, 0.8, 1.0)


@pytest.fixture(scope="module")
def nets():
    return build_supernet("pixel-base", "tiny"), build_supernet("pixel-ssr", "tiny")


@pytest.fixture(scope="module", params=["base", "chain"])
def encoding(request, nets) -> CandidateEncoding:
    base, ssr = nets
    if request.param == "base":
        return CandidateEncoding(base.space, None, 16, 16)
    return CandidateEncoding(base.space, ssr.space, 64, 16)  # base 16 px, SSR stages 32 and 64 px


@pytest.fixture(scope="module")
def base_encoding(nets) -> CandidateEncoding:
    return CandidateEncoding(nets[0].space, None, 16, 16)


def new_study(name: str, seed: int, storage=None) -> optuna.Study:
    return optuna.create_study(
        storage=storage or optuna.storages.InMemoryStorage(),
        directions=["minimize", "minimize"],
        sampler=study_sampler(name, seed),
    )


def new_searcher(name: str, study: optuna.Study, encoding: CandidateEncoding, seed: int = 0) -> Searcher:
    return make_searcher(
        name,
        study,
        encoding,
        (encoding.base_space, encoding.ssr_space),
        seed,
        ["params", "quality"],
        constrained=False,
    )


def objective(cand: Candidate, nets) -> list[float]:
    """Parameter fraction against its complement plus a little deterministic noise: a spread front."""
    base, ssr = nets
    f = cand.param_fraction(base, ssr if cand.ssr is not None else None)
    return [f, 1.0 - f + int(cand.key[:6], 16) / 16**6 * 0.05]


def parity_constraint(cand: Candidate) -> list[float]:
    """About half the candidates infeasible, decided by the key (so the outcome is reproducible)."""
    return [1.0 if int(cand.key[-1], 16) % 2 else -1.0, -0.5]


def cycles(searcher: Searcher, n: int, nets, constrained: bool = False) -> list[tuple[Candidate, int]]:
    out = []
    for _ in range(n):
        cand, handle = searcher.ask()
        number = searcher.tell(
            handle, objective(cand, nets), parity_constraint(cand) if constrained else None
        )
        out.append((cand, number))
    return out


@pytest.fixture(scope="module")
def anchors(encoding) -> list[tuple[float, Candidate]]:
    """The balanced subnets at ``FRACTIONS``, as the runner builds them (slow-ish: once per encoding)."""
    out = []
    for f in FRACTIONS:
        ssr = encoding.ssr_space.subnet_at_fraction(f, encoding.resolution) if encoding.chain else None
        out.append(
            (f, encoding.decode(encoding.params(Candidate(encoding.base_space.subnet_at_fraction(f), ssr))))
        )
    return out


# -- the registry ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SEARCHERS)
def test_registry_builds_every_searcher(name, base_encoding):
    assert name in searcher_class(name).names
    study = new_study(name, 0)
    assert isinstance(study.sampler, optuna.samplers.BaseSampler)
    assert new_searcher(name, study, base_encoding).name == name
    with pytest.raises(ValueError, match="objectives"):
        make_searcher(
            name, study, base_encoding, (base_encoding.base_space, None), 0, ["a"], constrained=False
        )


def test_unknown_searcher_is_refused():
    for call in (lambda: study_sampler("annealing", 0), lambda: searcher_class("annealing")):
        with pytest.raises(ValueError, match="unknown searcher 'annealing'"):
            call()


def test_searchers_package_has_no_import_cycle():
    """No module of ``harness.searchers`` imports, directly or not, one that imports it back."""
    pkg = Path(__file__).resolve().parent.parent / "harness" / "searchers"
    graph = {}
    for path in pkg.glob("*.py"):
        mods = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods.add(node.module)
            elif isinstance(node, ast.Import):
                mods.update(a.name for a in node.names)
        graph[path.stem] = {m.rsplit(".", 1)[1] for m in mods if m.startswith("harness.searchers.")}

    def reaches(start: str, node: str, seen: set[str]) -> bool:
        return any(
            n == start or (n not in seen and reaches(start, n, seen | {n})) for n in graph.get(node, ())
        )

    cyclic = [m for m in graph if m != "__init__" and reaches(m, m, {m})]
    assert not cyclic, f"import cycle through {cyclic}: {graph}"


# -- ask / tell ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SEARCHERS)
def test_ask_returns_valid_candidates_at_the_encodings_resolution(name, encoding, nets):
    base, ssr = nets
    searcher = new_searcher(name, new_study(name, 0), encoding)
    for cand, _ in cycles(searcher, 3, nets):
        cand.validate(base, ssr if encoding.chain else None)
        assert cand.resolution == encoding.resolution and cand.base.resolution == encoding.base_resolution
        assert (cand.ssr is not None) == encoding.chain


@pytest.mark.parametrize("name", SEARCHERS)
def test_tell_records_a_complete_trial_with_its_number(name, base_encoding, nets):
    study = new_study(name, 0)
    searcher = new_searcher(name, study, base_encoding)
    for cand, number in cycles(searcher, 2, nets):
        trial = next(t for t in study.get_trials() if t.number == number)
        assert trial.state == TrialState.COMPLETE and trial.values == pytest.approx(objective(cand, nets))
        assert trial.user_attrs["searcher"] == name and trial.user_attrs["candidate_key"] == cand.key
        assert Candidate.from_json(trial.user_attrs["candidate"]) == cand
        assert base_encoding.decode(trial.params) == cand


@pytest.mark.parametrize("name", SEARCHERS)
def test_failed_tell_records_a_fail_trial_marked_measurement_failed(name, base_encoding):
    study = new_study(name, 0)
    searcher = new_searcher(name, study, base_encoding)
    cand, handle = searcher.ask()
    number = searcher.tell(handle, None, error="out of memory", attrs={"description": "x"})
    (trial,) = study.get_trials()
    assert trial.number == number and trial.state == TrialState.FAIL and trial.values is None
    assert trial.user_attrs["measurement_failed"] is True and trial.user_attrs["error"] == "out of memory"
    assert trial.user_attrs["description"] == "x" and trial.user_attrs["candidate_key"] == cand.key


def budget_run(name: str, encoding: CandidateEncoding, nets, n: int) -> optuna.Study:
    """``n`` ask/tell cycles, the fifth a failed measurement; checks exactly ``n`` told trials."""
    study = new_study(name, 0)
    searcher = new_searcher(name, study, encoding)
    numbers = []
    for i in range(n):
        cand, handle = searcher.ask()
        cand.validate(nets[0], None)
        values = None if i == 4 else objective(cand, nets)
        numbers.append(searcher.tell(handle, values, error=None if values else "failed"))
    trials = study.get_trials()
    assert [t.state for t in trials if t.state not in TOLD] == []
    assert sorted(numbers) == [t.number for t in trials] == list(range(n))
    assert sum(t.state == TrialState.COMPLETE for t in trials) == n - 1
    return study


@pytest.mark.parametrize("name", SEARCHERS)
def test_n_cycles_leave_exactly_n_told_trials(name, base_encoding, nets):
    """Into evolution's second generation; the samplers' random start-up (10 completed trials) only."""
    budget_run(name, base_encoding, nets, 11)


@pytest.mark.slow
@pytest.mark.parametrize("name", SEARCHERS)
def test_past_start_up_candidates_stay_valid_and_new(name, base_encoding, nets):
    """Past the samplers' start-up (GP's model fits take seconds per ask, hence ``slow``)."""
    study = budget_run(name, base_encoding, nets, 12)
    keys = [t.user_attrs["candidate_key"] for t in study.get_trials()]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("name", SEARCHERS)
def test_same_seed_same_candidates_other_seed_others(name, base_encoding, nets):
    def keys(seed: int) -> list[str]:
        searcher = new_searcher(name, new_study(name, seed), base_encoding, seed)
        return [cand.key for cand, _ in cycles(searcher, 4, nets)]

    first = keys(0)
    assert keys(0) == first
    assert keys(1) != first


@pytest.mark.parametrize("name", SEARCHERS)
def test_constraints_reach_the_study(name, base_encoding, nets):
    study = new_study(name, 0)
    told = cycles(new_searcher(name, study, base_encoding), 8, nets, constrained=True)
    by_number = {t.number: t for t in study.get_trials()}
    feasible = set()
    for cand, number in told:
        c0, c1 = parity_constraint(cand)
        assert by_number[number].constraints == {"c0": c0, "c1": c1}
        if c0 <= 0:
            feasible.add(number)
    assert 0 < len(feasible) < len(told), "the parity constraint should split these candidates"
    assert {t.number for t in study.best_trials} <= feasible  # Optuna reads them: the front is feasible


def test_evolution_selects_feasible_before_infeasible():
    def ind(values, violation):
        return Individual(None, np.array(values, dtype=float), violation)

    population = [ind([0.0, 0.0], 2.0), ind([1.0, 1.0], 0.0), ind([0.5, 0.1], 0.5), ind([2.0, 0.5], 0.0)]
    assert select(population, 3) == [population[1], population[3], population[2]]


# -- start, trial_number, abandon, resume --------------------------------------------------------------
@pytest.mark.parametrize("name", SEARCHERS)
def test_start_makes_the_anchors_the_first_candidates_in_order(name, encoding, anchors, nets):
    study = new_study(name, 0)
    searcher = new_searcher(name, study, encoding)
    searcher.start(anchors)
    told = cycles(searcher, len(anchors) + 1, nets)
    assert [c.key for c, _ in told[:-1]] == [c.key for _, c in anchors]
    by_number = {t.number: t for t in study.get_trials()}
    assert [by_number[n].user_attrs.get("anchor_fraction") for _, n in told] == [*FRACTIONS, None]


@pytest.mark.parametrize("name", SEARCHERS)
def test_trial_number_and_abandon(name, base_encoding, nets):
    study = new_study(name, 0)
    searcher = new_searcher(name, study, base_encoding)
    cand, handle = searcher.ask()
    number = searcher.trial_number(handle)
    if number is not None:
        assert [(t.number, t.state) for t in study.get_trials()] == [(number, TrialState.RUNNING)]
    searcher.abandon(handle)
    searcher.abandon(handle)  # already finished (or never created): a no-op
    for t in study.get_trials():
        assert t.state == TrialState.FAIL and t.values is None and "measurement_failed" not in t.user_attrs
    cand, handle = searcher.ask()
    asked = searcher.trial_number(handle)
    told = searcher.tell(handle, objective(cand, nets))
    assert asked is None or asked == told
    searcher.abandon(handle)  # after tell: a no-op
    assert study.get_trials()[-1].state == TrialState.COMPLETE and study.get_trials()[-1].number == told


@pytest.mark.parametrize("name", SEARCHERS)
def test_resumed_searcher_continues_without_repeating_candidates(name, base_encoding, nets):
    storage = optuna.storages.InMemoryStorage()
    study = new_study(name, 0, storage)
    first = cycles(new_searcher(name, study, base_encoding), 4, nets)
    # A new process: the study loaded again from its storage, a fresh sampler and searcher, the same seed.
    resumed = optuna.load_study(study_name=study.study_name, storage=storage, sampler=study_sampler(name, 0))
    second = cycles(new_searcher(name, resumed, base_encoding), 4, nets)
    assert [n for _, n in first + second] == list(range(8))
    keys = [c.key for c, _ in first + second]
    assert len(set(keys)) == len(keys), "the resumed search proposed a candidate the study already holds"


# -- screening support: annotate, prune, requeue (harness.searchers.promotion relies on them) --------
@pytest.mark.parametrize("name", SEARCHERS)
def test_annotations_are_visible_to_another_worker_before_the_tell(name, base_encoding):
    storage = optuna.storages.InMemoryStorage()
    study = new_study(name, 0, storage)
    searcher = new_searcher(name, study, base_encoding)
    _, handle = searcher.ask()
    searcher.annotate(handle, {"rung:screen-8": {"fvd": 3.0}})
    other = optuna.load_study(study_name=study.study_name, storage=storage)
    assert other.get_trials()[-1].user_attrs["rung:screen-8"] == {"fvd": 3.0}
    assert other.get_trials()[-1].state == TrialState.RUNNING


@pytest.mark.parametrize("name", SEARCHERS)
def test_pruned_trials_are_not_repeated_and_do_not_use_the_budget(name, base_encoding, nets):
    from harness.searchers.runner import used_trials

    study = new_study(name, 0)
    searcher = new_searcher(name, study, base_encoding)
    pruned_keys = set()
    for i in range(6):
        cand, handle = searcher.ask()
        if i % 2:
            number = searcher.prune(handle, {"fidelity": "screen-8"})
            pruned_keys.add(cand.key)
            trial = study.get_trials()[-1]
            assert (trial.number, trial.state, trial.values) == (number, TrialState.PRUNED, None)
            assert trial.user_attrs["fidelity"] == "screen-8"
        else:
            searcher.tell(handle, objective(cand, nets))
    assert used_trials(study) == 3
    later = [c.key for c, _ in cycles(searcher, 6, nets)]
    assert not pruned_keys & set(later), "a pruned candidate was proposed again"


@pytest.mark.parametrize("name", SEARCHERS)
def test_requeued_candidate_is_asked_next(name, base_encoding, nets):
    study = new_study(name, 0)
    searcher = new_searcher(name, study, base_encoding)
    cycles(searcher, 2, nets)
    cand, handle = searcher.ask()
    searcher.abandon(handle)
    searcher.requeue(cand, {"requeued": True})
    again, handle = searcher.ask()
    assert again.key == cand.key
    searcher.tell(handle, objective(again, nets))


@pytest.mark.parametrize("name", SEARCHERS)
def test_workers_joining_one_study_propose_different_candidates(name, base_encoding, nets):
    """Two workers of one study (``open_study`` numbers them; ``worker_seed`` seeds them) asking at the
    same time, as parallel processes do: with one seed they would propose the same candidates."""
    from harness.searchers.optuna_searcher import worker_seed

    storage = optuna.storages.InMemoryStorage()
    study = new_study(name, 0, storage)
    joined = optuna.load_study(study_name=study.study_name, storage=storage, sampler=study_sampler(name, 0))
    workers = [new_searcher(name, s, base_encoding, worker_seed(0, w)) for w, s in enumerate((study, joined))]
    asked: list[list[str]] = [[], []]
    for _ in range(3):
        handles = [w.ask() for w in workers]  # both RUNNING at once
        for i, (w, (cand, handle)) in enumerate(zip(workers, handles)):
            asked[i].append(cand.key)
            w.tell(handle, objective(cand, nets))
    assert not set(asked[0]) & set(asked[1]), asked
    assert worker_seed(7, 0) == 7 and worker_seed(7, 1) != worker_seed(7, 2)
