"""Noise-aware Pareto dominance: a point is not called dominated by a difference smaller than the noise.

**Rule.** Objectives are compared in their better direction (minimised ones as they are, maximised ones
negated). Row ``a`` *dominates* row ``b`` when

* ``a`` is no worse than ``b`` in every objective (``a_i <= b_i``, point estimates), and
* ``a`` is better in at least one objective by more than ``z`` standard errors of the difference:
  ``b_j - a_j > z * SE(a_j - b_j)`` (default ``z = 1.96``, a two-sided 95 % test per objective).

``SE(a - b) = sqrt(se_a**2 + se_b**2)`` from the rows' ``<metric>_std`` (the standard errors of the
measurement layer's contract), except when both rows carry bootstrap replicates of the same protocol
(``<metric>_bootstrap`` with equal ``<metric>_bootstrap_key``, see ``load_bootstrap``): their replicates
were resampled with the same video indices, and under common random numbers (video ``i``: the same
prompt and initial noise for every candidate) the SE of the difference is the *paired* one, the standard
deviation over ``b`` of ``fvd_a[b] - fvd_b[b]``, which is smaller by the covariance the shared noise
induces. Exact counts (``params``, ``flops``) have SE 0; a missing SE counts as 0 (nothing is known of its
noise, so the strict rule applies to that objective).

The *noise-aware front* keeps every row that no row dominates in this sense. With ``z = 0`` it is the
strict front (``a`` no worse everywhere and better somewhere), which it always contains; rows of the
noise-aware front that the strict rule calls dominated are *statistically tied*: some row is better,
but not by more than the noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from harness.metric_names import COUNT_METRICS

DEFAULT_Z = 1.96  # two-sided 95 %
COVERAGE_Z = 1.96  # a re-measurement is covered when |new - old| <= 1.96 * sqrt(se_old^2 + se_new^2)


def standard_errors(df: pd.DataFrame, objectives: Sequence[str]) -> np.ndarray:
    """``(N, M)`` standard errors of the rows' objectives: counts 0, a missing SE 0 (see the module)."""
    columns = []
    for objective in objectives:
        column = f"{objective}_std"
        if objective in COUNT_METRICS or column not in df:
            columns.append(np.zeros(len(df)))
        else:
            columns.append(np.nan_to_num(df[column].to_numpy(dtype=float), nan=0.0))
    return np.stack(columns, axis=1) if columns else np.zeros((len(df), 0))


def difference_se(df: pd.DataFrame, objective: str) -> np.ndarray:
    """``(N, N)`` SE of ``row_a - row_b`` in ``objective``: paired within bootstrap groups, else unpaired."""
    se = standard_errors(df, [objective])[:, 0]
    out = np.sqrt(se[:, None] ** 2 + se[None, :] ** 2)
    replicates, keys = df.get(f"{objective}_bootstrap"), df.get(f"{objective}_bootstrap_key")
    if replicates is None or keys is None:
        return out
    groups: dict[str, list[int]] = {}
    for index, (values, key) in enumerate(zip(replicates, keys)):
        if key is not None and values is not None and len(values) > 1:
            groups.setdefault(key, []).append(index)
    for members in groups.values():
        if len(members) < 2:
            continue
        matrix = np.stack([np.asarray(replicates.iloc[i], dtype=float) for i in members])
        cov = np.atleast_2d(np.cov(matrix, ddof=1))
        variance = np.diag(cov)[:, None] + np.diag(cov)[None, :] - 2 * cov
        out[np.ix_(members, members)] = np.sqrt(np.clip(variance, 0.0, None))
    return out


def dominance_matrix(
    values: np.ndarray, se_diff: Sequence[np.ndarray], minimize: Sequence[bool], z: float = DEFAULT_Z
) -> np.ndarray:
    """``D[a, b]``: row ``a`` dominates row ``b`` under the module's rule.

    ``values``: ``(N, M)`` objective values; ``se_diff``: one ``(N, N)`` SE-of-difference matrix per
    objective (:func:`difference_se`); ``minimize``: one flag per objective; ``z = 0`` is strict dominance.
    """
    values = np.asarray(values, dtype=float) * np.where(np.asarray(minimize, bool), 1.0, -1.0)
    n = len(values)
    no_worse = np.ones((n, n), dtype=bool)
    better = np.zeros((n, n), dtype=bool)
    for j in range(values.shape[1]):
        gain = values[None, :, j] - values[:, None, j]  # gain[a, b] = b_j - a_j: > 0 when a is better
        no_worse &= gain >= 0
        better |= gain > z * np.asarray(se_diff[j])
    dominated = no_worse & better
    np.fill_diagonal(dominated, False)
    return dominated


def noise_front_mask(
    df: pd.DataFrame, objectives: Sequence[str], minimize: Sequence[bool], z: float = DEFAULT_Z
) -> tuple[np.ndarray, np.ndarray]:
    """``(on_front, tied)`` boolean arrays over ``df``'s rows (all objectives measured): on the
    noise-aware front, and on it though strictly dominated (statistically tied)."""
    values = df[list(objectives)].to_numpy(dtype=float).reshape(len(df), len(objectives))
    se_diff = [difference_se(df, o) for o in objectives]
    on_front = ~dominance_matrix(values, se_diff, minimize, z).any(axis=0)
    strict = ~dominance_matrix(values, [np.zeros_like(s) for s in se_diff], minimize, 0.0).any(axis=0)
    return on_front, on_front & ~strict


def covered(old: np.ndarray, old_se: np.ndarray, new: np.ndarray, new_se: np.ndarray) -> np.ndarray:
    """Whether each re-measurement lies within ``COVERAGE_Z`` SEs of the difference of the stored value
    (a missing SE counts as 0, so an unknown spread covers only an identical value)."""
    old_se, new_se = np.nan_to_num(old_se, nan=0.0), np.nan_to_num(new_se, nan=0.0)
    return np.abs(np.asarray(new) - np.asarray(old)) <= COVERAGE_Z * np.sqrt(old_se**2 + new_se**2)
