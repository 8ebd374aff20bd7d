"""Pareto fronts (strict, and noise-aware: see :mod:`harness.analysis.uncertainty`), hypervolume and the
comparison of searchers and resolutions.

**Directions.** ``minimize`` is ``True`` (all minimised), one flag per objective, or ``None`` for the
convention :data:`harness.metric_names.MINIMIZE` (everything but ``text_alignment`` is minimised).

**Reference point.** :func:`reference_point`: the worst value of each objective over the rows given,
10 % further out (``max x 1.1`` for positive minimised values). To compare searchers or resolutions use
one reference over all of them (``compare_*`` and ``hypervolume_over_trials`` do by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import moocore
import numpy as np
import pandas as pd

from harness.analysis.loading import (
    Minimize,
    Objectives,
    check_comparable,
    minimize_flags,
    points,
    resolve_objectives,
)
from harness.analysis.uncertainty import noise_front_mask

Reference = Sequence[float] | np.ndarray | None


def pareto_front(
    df: pd.DataFrame,
    objectives: Objectives = ("latency_ms", "fvd"),
    minimize: Minimize = True,
    noise_z: float | None = None,
) -> pd.DataFrame:
    """Non-dominated rows, sorted by the objectives.

    ``noise_z=None``: the strict front (``moocore.is_nondominated``, duplicates kept once).
    ``noise_z=z``: the noise-aware front of :mod:`harness.analysis.uncertainty` (a row is dominated only
    by a difference of more than ``z`` standard errors), with a boolean column ``tied``: on this front
    though strictly dominated. Paired SEs are used where ``df`` carries ``load_bootstrap``'s columns.
    """
    if noise_z is not None and not noise_z >= 0:
        raise ValueError(f"noise_z (--noise-z) must be a number of standard errors >= 0, got {noise_z}")
    objectives = resolve_objectives(objectives)
    check_comparable(df, objectives)
    rows, values = points(df, objectives)
    if len(rows) == 0:
        return rows.assign(tied=pd.Series(dtype=bool)) if noise_z is not None else rows
    flags = minimize_flags(objectives, minimize)
    if noise_z is None:
        maximise = [not m for m in flags]
        return rows[moocore.is_nondominated(values, maximise=maximise)].sort_values(list(objectives))
    on_front, tied = noise_front_mask(rows, objectives, flags, float(noise_z))
    return rows.assign(tied=tied)[on_front].sort_values(list(objectives))


def tied_count(front: pd.DataFrame) -> int:
    """Points of a noise-aware front (``pareto_front(..., noise_z=z)``) that are statistically tied."""
    return int(front["tied"].sum()) if "tied" in front else 0


def fronts_by_resolution(
    df: pd.DataFrame,
    objectives: Objectives = ("latency_ms", "fvd"),
    minimize: Minimize = True,
    noise_z: float | None = None,
) -> dict[int, pd.DataFrame]:
    """:func:`pareto_front` of each resolution's rows, keyed by resolution (pixels), ascending."""
    groups = df.groupby("resolution", sort=True)
    return {int(resolution): pareto_front(rows, objectives, minimize, noise_z) for resolution, rows in groups}


def reference_point(df: pd.DataFrame, objectives: Objectives, minimize: Minimize = True) -> np.ndarray:
    """Worst value of each objective over ``df``, 10 % of its magnitude further out (``max x 1.1``)."""
    objectives = resolve_objectives(objectives)
    _, values = points(df, objectives)
    if len(values) == 0:
        raise ValueError(f"no rows with every objective measured ({', '.join(objectives)})")
    flags = np.array(minimize_flags(objectives, minimize))
    worst = np.where(flags, values.max(axis=0), values.min(axis=0))
    return worst + np.where(flags, 1.0, -1.0) * 0.1 * np.abs(worst)


def _prepare(
    df: pd.DataFrame, objectives: Objectives, reference: Reference, minimize: Minimize
) -> tuple[tuple[str, ...], list[bool], np.ndarray]:
    """Checked objectives, moocore's ``maximise`` flags and the reference (default: over all of ``df``)."""
    objectives = resolve_objectives(objectives)
    check_comparable(df, objectives)
    maximise = [not m for m in minimize_flags(objectives, minimize)]
    ref = reference_point(df, objectives, minimize) if reference is None else np.asarray(reference, float)
    return objectives, maximise, ref


def hypervolume(
    df: pd.DataFrame, objectives: Objectives, reference: Reference = None, minimize: Minimize = True
) -> float:
    """Hypervolume (``moocore.hypervolume``) of the rows' objective points, bounded by ``reference``.

    ``reference`` defaults to :func:`reference_point` of ``df`` itself: pass a common one to compare.
    Points not strictly better than the reference in every objective add nothing.
    """
    objectives, maximise, ref = _prepare(df, objectives, reference, minimize)
    _, values = points(df, objectives)
    return float(moocore.hypervolume(values, ref=ref, maximise=maximise)) if len(values) else 0.0


def hypervolume_over_trials(
    df: pd.DataFrame, objectives: Objectives, reference: Reference = None, minimize: Minimize = True
) -> pd.DataFrame:
    """Hypervolume of all rows up to each trial number, per study and searcher (non-decreasing).

    Columns ``study, searcher, trial_number, hypervolume``; one row per trial number with a linked
    candidate. ``reference`` defaults to :func:`reference_point` over the whole ``df`` (common to all).
    """
    objectives, maximise, ref = _prepare(df, objectives, reference, minimize)
    records = []
    for (study, searcher), rows in df.dropna(subset=["study"]).groupby(["study", "searcher"], sort=True):
        front = np.empty((0, len(objectives)))
        for number, trial_rows in rows.dropna(subset=["trial_number"]).groupby("trial_number", sort=True):
            front = np.vstack([front, points(trial_rows, objectives)[1]])
            front = front[moocore.is_nondominated(front, maximise=maximise)] if len(front) else front
            volume = float(moocore.hypervolume(front, ref=ref, maximise=maximise)) if len(front) else 0.0
            records.append([study, searcher, int(number), volume])
    return pd.DataFrame(records, columns=["study", "searcher", "trial_number", "hypervolume"])


def compare_searchers(
    df: pd.DataFrame, objectives: Objectives, reference: Reference = None, minimize: Minimize = True
) -> pd.DataFrame:
    """Per study and searcher: trials, measured rows, front size and final hypervolume (common reference).

    Columns ``study, searcher, n_trials, n_measured, front_size, hypervolume, reference``; best first.
    """
    objectives, _, ref = _prepare(df, objectives, reference, minimize)
    records = []
    for (study, searcher), rows in df.dropna(subset=["study"]).groupby(["study", "searcher"], sort=True):
        front = pareto_front(rows, objectives, minimize)
        volume = hypervolume(rows, objectives, ref, minimize)
        n_measured = len(points(rows, objectives)[0])
        n_trials = rows["trial_number"].nunique()
        records.append([study, searcher, n_trials, n_measured, len(front), volume, tuple(map(float, ref))])
    columns = ["study", "searcher", "n_trials", "n_measured", "front_size", "hypervolume", "reference"]
    table = pd.DataFrame(records, columns=columns)
    return table.sort_values("hypervolume", ascending=False, kind="stable").reset_index(drop=True)


def compare_resolutions(
    df: pd.DataFrame, objectives: Objectives, reference: Reference = None, minimize: Minimize = True
) -> pd.DataFrame:
    """Per resolution: ``resolution, n_candidates, front_size, on_overall_front`` (its front's candidates
    on the front of all resolutions together), ``hypervolume`` (common reference), ``best_<objective>``.
    """
    objectives, _, ref = _prepare(df, objectives, reference, minimize)
    overall = set(pareto_front(df, objectives, minimize)["candidate_key"])
    flags = minimize_flags(objectives, minimize)
    records = []
    for resolution, rows in df.groupby("resolution", sort=True):
        front = set(pareto_front(rows, objectives, minimize)["candidate_key"])
        best = {f"best_{o}": rows[o].min() if m else rows[o].max() for o, m in zip(objectives, flags)}
        records.append({"resolution": int(resolution), "n_candidates": rows["candidate_key"].nunique(),
                        "front_size": len(front), "on_overall_front": len(overall & front),
                        "hypervolume": hypervolume(rows, objectives, ref, minimize), **best})  # fmt: skip
    return pd.DataFrame.from_records(records)


def latency_flops_correlation(df: pd.DataFrame) -> dict[str, float]:
    """How well FLOPs predict latency on the rows' device: ``n``, Pearson r, Spearman rho (scipy.stats)."""
    from scipy import stats

    check_comparable(df, ("latency_ms", "flops"))
    rows, values = points(df.drop_duplicates(["candidate_key", "latency_ms"]), ("flops", "latency_ms"))
    if len(rows) < 3:
        return {"n": float(len(rows)), "pearson": np.nan, "spearman": np.nan}
    pearson = stats.pearsonr(values[:, 0], values[:, 1]).statistic
    spearman = stats.spearmanr(values[:, 0], values[:, 1]).statistic
    return {"n": float(len(rows)), "pearson": float(pearson), "spearman": float(spearman)}
