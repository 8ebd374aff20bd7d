"""How well a study's front reproduces: its stored values against a re-measurement with fresh noise.

``python -m harness.analysis reproduce`` (:func:`harness.analysis.remeasure.remeasure`) re-measures a
study's noise-aware front and its nearest neighbours under the study's own settings with a fresh seed
(``seed + offset``, new generated videos) and ``rerun = offset`` (latency timed again), records them in
the store under their own protocols, and records the plan as the study attribute ``reproduce-<offset>``:
``{"offset", "objectives", "device", "noise_z", "front": [keys], "candidates": [keys, front first],
"stored": {metric: [protocols]}, "new": {metric: [protocols]}}``. This module computes the statistics
from the rows in the store (:func:`reproduction`, no measuring: the notebook calls it) or from any two
tables of rows (:func:`compare`):

* ``spearman``: Spearman's rank correlation per objective between the stored and the new values;
* ``front_kept``: the fraction of the stored front's points that are on the noise-aware front of the
  re-measured set (its new values, the same rule and ``z``);
* ``coverage``: per objective, the fraction of candidates whose new value lies within
  ``1.96 * sqrt(se_old**2 + se_new**2)`` of the stored one (``uncertainty.covered``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from harness.analysis.fronts import pareto_front
from harness.analysis.loading import (
    RERUN_PREFIX,
    load_bootstrap,
    load_results,
    minimize_flags,
    resolve_objectives,
    study_attributes,
)
from harness.analysis.tables import format_estimate
from harness.analysis.uncertainty import DEFAULT_Z, covered, standard_errors

MIN_REMEASURED = 12  # front + neighbours re-measured by default: Spearman over fewer pairs is too noisy


@dataclass
class Reproduction:
    """The comparison of stored and re-measured values (see the module docstring)."""

    objectives: tuple[str, ...]
    table: pd.DataFrame  # one row per re-measured candidate: stored and new values, SEs, flags
    spearman: dict[str, float]
    coverage: dict[str, float]
    front_kept: float  # fraction of the stored front on the new front (NaN without a front point)
    n_front: int  # stored front points re-measured
    n_planned: int  # candidates in the plan (the table holds those re-measured so far)
    noise_z: float = DEFAULT_Z
    meta: dict[str, Any] = field(default_factory=dict)  # study, offset, device, protocols


def default_neighbours(front_size: int) -> int:
    """Neighbours re-measured with a front of ``front_size``: enough for ``MIN_REMEASURED`` candidates in
    all, and at least one per front point (each front point then faces a close competitor)."""
    return max(MIN_REMEASURED - front_size, front_size)


def nearest_neighbours(
    rows: pd.DataFrame, front_keys: Sequence[str], objectives: Sequence[str], k: int
) -> list[str]:
    """The ``k`` candidates off the front nearest to it: Euclidean distance to the nearest front point in
    objective space, each objective scaled to [0, 1] over ``rows``; ties by trial number."""
    rows = rows.drop_duplicates("candidate_key")
    values = rows[list(objectives)].to_numpy(dtype=float)
    span = values.max(axis=0) - values.min(axis=0)
    scaled = (values - values.min(axis=0)) / np.where(span > 0, span, 1.0)
    on_front = rows["candidate_key"].isin(front_keys).to_numpy()
    if not on_front.any() or k <= 0:
        return []
    distance = np.sqrt(((scaled[:, None, :] - scaled[None, on_front, :]) ** 2).sum(-1)).min(axis=1)
    others = rows.assign(_distance=distance)[~on_front]
    others = others.sort_values(["_distance", "trial_number"], kind="stable")
    return list(others["candidate_key"].iloc[:k])


def compare(
    stored: pd.DataFrame,
    new: pd.DataFrame,
    objectives: Sequence[str],
    front_keys: Sequence[str],
    minimize: Sequence[bool] | bool | None = None,
    noise_z: float = DEFAULT_Z,
) -> Reproduction:
    """Statistics of ``new`` (one row per re-measured candidate) against ``stored`` (the same candidates'
    stored rows), joined on ``candidate_key``; ``front_keys``: the stored front. Either table may carry
    ``load_bootstrap``'s columns (paired SEs in the new front)."""
    objectives = resolve_objectives(objectives)
    flags = minimize_flags(objectives, minimize)
    stored = stored.drop_duplicates("candidate_key").set_index("candidate_key")
    new = new.drop_duplicates("candidate_key").dropna(subset=list(objectives))
    new = new[new["candidate_key"].isin(stored.index)]
    new_front = pareto_front(new, objectives, flags, noise_z) if len(new) else new
    old = stored.loc[new["candidate_key"]]
    table = pd.DataFrame({
        "trial_number": old["trial_number"].to_numpy(), "candidate_key": new["candidate_key"].to_numpy(),
        "description": old["description"].to_numpy(),
        "stored_front": new["candidate_key"].isin(front_keys).to_numpy(),
        "new_front": new["candidate_key"].isin(new_front["candidate_key"]).to_numpy(),
    })  # fmt: skip
    old_se, new_se = standard_errors(old, objectives), standard_errors(new, objectives)
    spearman, coverage = {}, {}
    for j, objective in enumerate(objectives):
        a, b = old[objective].to_numpy(dtype=float), new[objective].to_numpy(dtype=float)
        table[objective], table[f"{objective}_se"] = a, _se_column(old, objective)
        table[f"{objective}_new"], table[f"{objective}_new_se"] = b, _se_column(new, objective)
        table[f"{objective}_covered"] = hits = covered(a, old_se[:, j], b, new_se[:, j])
        spearman[objective] = _spearman(a, b)
        coverage[objective] = float(hits.mean()) if len(hits) else np.nan
    n_front = int(table["stored_front"].sum())
    kept = float((table["stored_front"] & table["new_front"]).sum() / n_front) if n_front else np.nan
    table = table.sort_values(["stored_front", *objectives], ascending=[False] + [True] * len(objectives))
    return Reproduction(tuple(objectives), table.reset_index(drop=True), spearman, coverage, kept, n_front,
                        n_planned=len(new), noise_z=noise_z)  # fmt: skip


def _se_column(rows: pd.DataFrame, objective: str) -> np.ndarray:
    """The rows' SE of ``objective`` as stored (NaN when unknown, 0 for an exact count)."""
    if f"{objective}_std" in rows:
        return rows[f"{objective}_std"].to_numpy(dtype=float)
    return np.zeros(len(rows))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (NaN for fewer than 3 pairs or a constant side; 1.0 for identical exact counts)."""
    from scipy import stats

    if len(a) < 3:
        return np.nan
    if np.array_equal(a, b):
        return 1.0
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return np.nan
    return float(stats.spearmanr(a, b).statistic)


def matching(rows: pd.DataFrame, protocols: Mapping[str, Sequence[str]], device: str | None) -> pd.DataFrame:
    """Rows whose every listed metric was measured under one of its listed protocols, or not at all
    (on ``device``)."""
    keep = np.ones(len(rows), dtype=bool)
    for metric, names in protocols.items():
        column = rows.get(f"{metric}_protocol", pd.Series(np.nan, index=rows.index))
        keep &= (column.isna() | column.isin(list(names))).to_numpy()
    if device is not None:
        keep &= (rows["device"] == device).to_numpy()
    return rows[keep]


def reproduction(url: str, study: str, offset: int = 1, noise_z: float | None = None) -> Reproduction:
    """The statistics of the study's reproduce run ``offset`` from the rows already in the store.

    Raises ``ValueError`` when the study has no such run (naming the command that makes one)."""
    plan = study_attributes(url, [study]).get(study, {}).get(f"{RERUN_PREFIX}{offset}")
    if plan is None:
        raise ValueError(
            f"study {study!r} has no re-measurement with offset {offset}; run python -m harness.analysis "
            f"reproduce --storage URL --study {study} --offset {offset}"
        )
    rows = load_results(url, study, fidelity=None)
    planned = rows[rows["candidate_key"].isin(plan["candidates"])]
    stored = matching(planned, plan["stored"], plan.get("device"))
    new = matching(planned, plan["new"], plan.get("device"))
    if len(new):
        new = load_bootstrap(url, new.drop_duplicates("candidate_key"))
    z = plan.get("noise_z", DEFAULT_Z) if noise_z is None else noise_z
    result = compare(stored, new, plan["objectives"], plan["front"], None, z)
    result.n_planned = len(plan["candidates"])
    result.meta = {"study": study, "offset": offset, **{k: plan.get(k) for k in ("device", "stored", "new")}}
    return result


def format_reproduction(result: Reproduction) -> str:
    """The per-candidate table (stored ± SE, new ± SE, covered) and the three statistics, as text."""
    objectives = result.objectives
    header = (
        f"{'trial':>5}  {'role':<9}"
        + "".join(f"  {o + ' stored':>18}  {o + ' new':>18}  cov" for o in objectives)
        + "  new front"
    )
    lines = [header, "-" * len(header)]
    for _, row in result.table.iterrows():
        trial = "-" if pd.isna(row["trial_number"]) else str(int(row["trial_number"]))
        role = "front" if row["stored_front"] else "neighbour"
        cells = "".join(
            f"  {format_estimate(row[o], row[f'{o}_se'], o):>18}"
            f"  {format_estimate(row[f'{o}_new'], row[f'{o}_new_se'], o):>18}"
            f"  {'yes' if row[f'{o}_covered'] else 'NO':>3}"
            for o in objectives
        )
        lines.append(f"{trial:>5}  {role:<9}{cells}  {'yes' if row['new_front'] else 'no'}")
    done = len(result.table)
    lines.append(f"re-measured {done} of {result.n_planned} planned candidates "
                 f"({result.n_front} stored front points)")  # fmt: skip
    lines.append(
        "Spearman (stored vs new): " + ", ".join(f"{o} {_number(v)}" for o, v in result.spearman.items())
    )
    lines.append(f"stored front points still on the re-measured front (noise-aware, z = {result.noise_z:g}): "
                 f"{_fraction(result.front_kept)}")  # fmt: skip
    lines.append("intervals covering the re-measurement (|new - old| <= 1.96 sqrt(se_old^2 + se_new^2)): "
                 + ", ".join(f"{o} {_fraction(v)}" for o, v in result.coverage.items()))  # fmt: skip
    return "\n".join(lines)


def _number(value: float) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.3f}"


def _fraction(value: float) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.0%}"
