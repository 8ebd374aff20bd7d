"""Multi-fidelity promotion (``harness.searchers.promotion``): the rule on constructed screen results, and a
real search in which candidates are screened, pruned and promoted."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from harness.searchers.promotion import Promotion, parse_rungs, promote
from harness.store import Store, optuna_storage

OBJ = ["latency_ms", "fvd"]


def point(latency, fvd, se_latency=0.0, se_fvd=0.0):
    return {"latency_ms": latency, "latency_ms_std": se_latency, "fvd": fvd, "fvd_std": se_fvd}


def test_clear_dominance_needs_a_margin_beyond_the_noise():
    b = point(1.2, 10.0, 0.1)
    assert not promote(b, [point(1.0, 10.0)], OBJ, Promotion(z=1.96))  # exact: 0.2 is clear
    # 0.2 < 1.96 * sqrt(0.1^2 + 0.1^2) = 0.277, but > 1.0 * 0.141
    assert promote(b, [point(1.0, 10.0, 0.1)], OBJ, Promotion(z=1.96))
    assert not promote(b, [point(1.0, 10.0, 0.1)], OBJ, Promotion(z=1.0))
    assert promote(b, [point(0.5, 10.01)], OBJ, Promotion(z=0.0))  # worse in one objective: no dominance


def test_nondominated_rule_prunes_only_clearly_dominated_screens():
    rule = Promotion(rule="nondominated", z=1.96)
    pool = [point(100, 20, 2, 0.5), point(200, 15, 2, 0.5)]
    assert promote(point(150, 17, 2, 0.5), pool, OBJ, rule)  # between the two: on the front
    assert not promote(point(130, 25, 2, 0.5), pool, OBJ, rule)  # slower and worse than the first
    assert promote(point(103, 20.5, 2, 0.5), pool, OBJ, rule)  # worse only within the noise
    assert promote(point(130, 25), [], OBJ, rule)  # an empty rung promotes


def test_top_fraction_rule_keeps_the_best_one_over_eta():
    rule = Promotion(rule="top-fraction", eta=2.0, z=0.0)
    pool = [point(100 + 10 * i, 20 + i) for i in range(7)]  # a chain: each dominates the later ones
    # 8 candidates, eta 2: the best 4 go on, i.e. at most 3 dominate the newcomer.
    assert promote(point(125, 22.5), pool, OBJ, rule)  # dominated by 3
    assert not promote(point(135, 23.5), pool, OBJ, rule)  # dominated by 4


def test_rungs_are_checked_and_auto_is_a_quarter():
    assert parse_rungs("auto", 32) == (8,)
    assert parse_rungs("auto", 40) == (8,) and parse_rungs("auto", 48) == (8,)  # whole generation batches
    assert parse_rungs("auto", 64) == (16,) and parse_rungs("auto", 16) == (4,)
    assert parse_rungs("auto", 8) == ()
    assert parse_rungs("", 32) == ()
    assert parse_rungs("4,8", 32) == (4, 8)
    with pytest.raises(ValueError, match="--rungs"):
        parse_rungs("eight", 32)
    with pytest.raises(ValueError, match="ascending"):
        Promotion(rungs=(8, 4))
    with pytest.raises(ValueError, match="below --fvd-videos"):
        from harness.measurement import MeasureSettings

        Promotion(rungs=(32,)).check_against(MeasureSettings(fvd_videos=32))


@pytest.mark.slow
def test_search_screens_prunes_and_reports_only_full_fidelity(tmp_path):
    """A real search with one screening rung: candidates strictly dominated at the screen by an earlier
    screened one are pruned (rule nondominated, z = 0), every other is promoted to the full protocol;
    the budget counts full-fidelity trials only; no pruned candidate has a full-fidelity FVD in the store
    or a row in the study's results."""
    from harness import analysis
    from harness.search import main

    db = tmp_path / "s.db"
    main(
        [
            "--objective", "latency", "--trials", "7", "--fvd-videos", "8", "--rungs", "4",
            "--real-videos", "16", "--steps", "2", "--threads", "1", "--promotion-z", "0",
            "--storage", str(db), "--study", "mf", "--no-plot", "--anchors", "0.4,1.0",
        ]
    )  # fmt: skip
    url = f"sqlite:///{db}"
    study = optuna.load_study(study_name="mf", storage=optuna_storage(url))
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert len(complete) == 7 and all(t.user_attrs["fidelity"] == "full" for t in complete)
    assert all(t.user_attrs["fidelity"] == "screen-4" for t in pruned)
    # Each decision, replayed: pruned exactly when an earlier screen strictly dominates the trial's own,
    # until the screening budget (as many pruned as the study's trials) is spent.
    rule = Promotion(rungs=(4,), z=0.0)
    assert pruned, "nothing was pruned: the test shows nothing"
    n_pruned = 0
    for t in trials:
        if "anchor_fraction" in t.user_attrs:
            assert t.state == TrialState.COMPLETE
            continue
        earlier = [u.user_attrs["rung:screen-4"] for u in trials if u.number < t.number]
        expected = n_pruned >= 7 or promote(t.user_attrs["rung:screen-4"], earlier, OBJ, rule)
        assert (t.state == TrialState.COMPLETE) == expected, t.number
        n_pruned += t.state == TrialState.PRUNED
    protocols = study.user_attrs["fidelity_protocols"]
    full_fvd, screen_fvd = protocols["full"]["fvd"], protocols["screen-4"]["fvd"]
    assert full_fvd != screen_fvd
    frame = Store(url).measurements_frame()
    fvd_rows = frame[(frame.metric == "fvd") & (frame.status == "ok")]
    pruned_keys = {t.user_attrs["candidate_key"] for t in pruned}
    keys = dict(zip(fvd_rows.candidate_id, fvd_rows.candidate_key, strict=False))
    full_keys = {keys[c] for c in fvd_rows[fvd_rows.protocol == full_fvd].candidate_id}
    assert full_keys == {t.user_attrs["candidate_key"] for t in complete}
    assert not pruned_keys & full_keys
    results = analysis.load_results(url, "mf")
    assert set(results["fvd_protocol"].dropna()) == {full_fvd}
    assert not pruned_keys & set(results["candidate_key"])


@pytest.mark.slow
@pytest.mark.postgres
def test_two_postgres_workers_share_the_screening_pool(postgres_url):
    """Two evolution workers on one PostgreSQL study with a screening rung: exactly the requested number
    of full-fidelity trials, every pruned candidate strictly dominated at the screen by a candidate some
    worker screened, and no pruned candidate measured at full fidelity."""
    import subprocess
    import sys

    from tests.test_search import ENV, REPO

    args = [
        sys.executable, "-m", "harness.search", "--objective", "latency", "--trials", "6",
        "--searcher", "evolution", "--fvd-videos", "8", "--rungs", "4", "--real-videos", "16",
        "--steps", "2", "--threads", "1", "--promotion-z", "0", "--anchors", "0.4",
        "--storage", postgres_url, "--study", "mf-shared", "--no-plot",
    ]  # fmt: skip
    Store.open(postgres_url).close()
    workers = [
        subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for w in workers:
        _out, err = w.communicate(timeout=900)
        assert w.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="mf-shared", storage=optuna_storage(postgres_url))
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    # Besides those, only trials given back when a reading was put off (FAIL without an error).
    given_back = [t for t in trials if t.state == TrialState.FAIL and "error" not in t.user_attrs]
    assert len(complete) == 6 and len(complete) + len(pruned) + len(given_back) == len(trials)
    screens = {t.number: t.user_attrs["rung:screen-4"] for t in trials if "rung:screen-4" in t.user_attrs}
    for t in pruned:
        v = np.array([screens[t.number][m] for m in OBJ])
        others = [np.array([s[m] for m in OBJ]) for n, s in screens.items() if n != t.number]
        assert any(np.all(o <= v) and np.any(o < v) for o in others), t.number
    full_fvd = study.user_attrs["fidelity_protocols"]["full"]["fvd"]
    frame = Store(postgres_url).measurements_frame()
    full = frame[(frame.metric == "fvd") & (frame.protocol == full_fvd) & (frame.status == "ok")]
    assert set(full.candidate_key) == {t.user_attrs["candidate_key"] for t in complete}
