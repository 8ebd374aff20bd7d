"""Single subnets against trajectory schedules (issue 20): hypervolume of each kind with its spread, and
the cheapest candidate that matches a reference candidate's quality within noise.

**Kinds.** A row is a *schedule* when its candidate runs more than one base subnet over the sampling
steps (``segments > 1``, ``kind == "schedule"``), else a *single subnet* (at the protocol's step count or
at its own). :func:`compare_trajectories` compares the fronts of the two kinds (and of both together)
on one reference point.

**Spread of a hypervolume.** The hypervolume of measured points is itself an estimate: each point's
objectives carry standard errors (``<objective>_std``; none for exact counts). The spread reported is
the standard deviation of the hypervolume over ``draws`` parametric redraws of every point (value + SE
x N(0, 1), independently per point and objective, seeded): how far the figure would move if every
candidate were measured again. Two kinds differ when their hypervolumes differ by more than about
two such spreads combined.
"""

from __future__ import annotations

import moocore
import numpy as np
import pandas as pd

from harness.analysis.fronts import Reference, _prepare, pareto_front
from harness.analysis.loading import Minimize, Objectives, minimize_flags, points, resolve_objectives
from harness.analysis.uncertainty import difference_se

KINDS = ("single subnet", "schedule", "all")


def trajectory_kind(df: pd.DataFrame) -> pd.Series:
    """``"schedule"`` or ``"single subnet"`` per row (rows without a ``segments`` column: single)."""
    segments = df["segments"] if "segments" in df else pd.Series(1, index=df.index)
    return np.where(segments.fillna(1).astype(float) > 1, "schedule", "single subnet")


def hypervolume_spread(
    df: pd.DataFrame,
    objectives: Objectives,
    reference: Reference = None,
    minimize: Minimize = True,
    draws: int = 200,
    seed: int = 0,
) -> tuple[float, float]:
    """``(hypervolume, spread)``: the hypervolume of the rows and its standard deviation over parametric
    redraws of every point within its standard errors (see the module docstring)."""
    objectives, maximise, ref = _prepare(df, objectives, reference, minimize)
    rows, values = points(df, objectives)
    if not len(values):
        return 0.0, 0.0
    volume = float(moocore.hypervolume(values, ref=ref, maximise=maximise))
    columns = [f"{o}_std" for o in objectives]
    se = np.column_stack(
        [rows[c].fillna(0.0).to_numpy(float) if c in rows else np.zeros(len(rows)) for c in columns]
    )
    if not se.any():
        return volume, 0.0
    rng = np.random.default_rng(seed)
    redrawn = [
        float(
            moocore.hypervolume(values + se * rng.standard_normal(values.shape), ref=ref, maximise=maximise)
        )
        for _ in range(draws)
    ]
    return volume, float(np.std(redrawn, ddof=1))


def compare_trajectories(
    df: pd.DataFrame,
    objectives: Objectives,
    reference: Reference = None,
    minimize: Minimize = True,
    draws: int = 200,
) -> pd.DataFrame:
    """Per kind (single subnet, schedule, all): candidates, front size, how many of the front of all
    candidates are of this kind, hypervolume and its spread, on one reference point (default: that of
    all rows). Kinds without rows are left out."""
    objectives, _, ref = _prepare(df, objectives, reference, minimize)
    kinds = trajectory_kind(df)
    overall = pareto_front(df, objectives, minimize)
    overall_kinds = trajectory_kind(overall)
    records = []
    for kind in KINDS:
        rows = df if kind == "all" else df[kinds == kind]
        if rows.empty:
            continue
        volume, spread = hypervolume_spread(rows, objectives, ref, minimize, draws)
        on_overall = len(overall) if kind == "all" else int((overall_kinds == kind).sum())
        records.append({"kind": kind, "n_candidates": rows["candidate_key"].nunique(),
                        "front_size": len(pareto_front(rows, objectives, minimize)),
                        "on_overall_front": on_overall, "hypervolume": volume, "hypervolume_spread": spread,
                        "reference": tuple(map(float, ref))})  # fmt: skip
    return pd.DataFrame.from_records(records)


def cheapest_matching(
    df: pd.DataFrame,
    reference_key: str,
    quality: str = "fvd",
    cost: str = "latency_ms",
    z: float = 1.0,
    minimize: Minimize = None,
) -> pd.Series | None:
    """The lowest-``cost`` row whose ``quality`` is not worse than the reference candidate's by more
    than ``z`` standard errors of the difference: "as good, within noise". The SE is the paired one
    where both rows carry bootstrap replicates of one protocol (``load_bootstrap``: common random
    numbers make it smaller), else ``sqrt(se_a^2 + se_b^2)`` (``uncertainty.difference_se``). The row
    gains ``cost_ratio`` (its cost over the reference's), ``quality_gap`` (its quality minus the
    reference's) and ``gap_se``. ``None`` when the reference has no such values."""
    quality, cost = resolve_objectives((quality, cost))
    flags = minimize_flags((quality, cost), minimize)
    rows = df.dropna(subset=[quality, cost]).drop_duplicates("candidate_key").reset_index(drop=True)
    at = np.flatnonzero(rows["candidate_key"].to_numpy() == reference_key)
    if not len(at):
        return None
    ref = rows.iloc[at[0]]
    gap_se = pd.Series(difference_se(rows, quality)[:, at[0]], index=rows.index)
    margin = z * gap_se
    gap = rows[quality] - float(ref[quality])
    matches = rows[(gap <= margin) if flags[0] else (-gap <= margin)]
    best = matches.sort_values(cost, ascending=flags[1], kind="stable").iloc[0].copy()
    best["cost_ratio"] = float(best[cost]) / float(ref[cost])
    best["quality_gap"] = float(best[quality]) - float(ref[quality])
    best["gap_se"] = float(gap_se[best.name])
    return best


def largest_single_subnet(df: pd.DataFrame) -> str | None:
    """Key of the largest single subnet at the protocol's own step count (the paper's SNED-B, an anchor
    of every study): the reference a schedule must match."""
    single = df[(trajectory_kind(df) == "single subnet") & df["steps"].isna()] if "steps" in df else df
    if single.empty:
        return None
    return str(single.sort_values("params", ascending=False, kind="stable").iloc[0]["candidate_key"])


def study_comparison(
    frames: dict[str, pd.DataFrame], objectives: Objectives, z: float = 1.0, draws: int = 200
) -> dict:
    """Studies searched with the same budget, compared on one reference point (over all their rows):
    per study its hypervolume and spread, the per-kind table (:func:`compare_trajectories`), and the
    cheapest candidate matching its largest single subnet's quality within ``z`` SEs."""
    objectives = resolve_objectives(objectives)
    everything = pd.concat(list(frames.values()), ignore_index=True)
    _, _, ref = _prepare(everything, objectives, None, None)
    out: dict = {"reference": tuple(map(float, ref)), "objectives": objectives, "studies": {}}
    for study, df in frames.items():
        volume, spread = hypervolume_spread(df, objectives, ref, None, draws)
        key = largest_single_subnet(df)
        match = cheapest_matching(df, key, objectives[1], objectives[0], z) if key else None
        pool = df[(trajectory_kind(df) == "schedule") | (df["candidate_key"] == key)]
        schedule = cheapest_matching(pool, key, objectives[1], objectives[0], z) if key else None
        if schedule is not None and schedule["candidate_key"] == key:
            schedule = None  # no schedule is within noise of the largest subnet
        out["studies"][study] = {
            "n_candidates": df["candidate_key"].nunique(),
            "hypervolume": volume,
            "hypervolume_spread": spread,
            "kinds": compare_trajectories(df, objectives, ref, None, draws),
            "largest": df[df["candidate_key"] == key].iloc[0] if key else None,
            "match": match,
            "schedule_match": schedule,
        }
    return out


def format_study_comparison(result: dict, z: float = 1.0) -> str:
    x, y = result["objectives"][:2]
    lines = [
        f"reference point {tuple(round(v, 4) for v in result['reference'])} over ({', '.join(result['objectives'])})"
    ]
    for study, r in result["studies"].items():
        lines.append(
            f"\n{study}: {r['n_candidates']} candidates, hypervolume {r['hypervolume']:.4g} ± "
            f"{r['hypervolume_spread']:.2g} (spread over redraws within the SEs)"
        )
        for _, row in r["kinds"].iterrows():
            lines.append(
                f"  {row['kind']:>13}: {row['n_candidates']:3d} candidates, front {row['front_size']:2d} "
                f"({row['on_overall_front']} on the study's front), hypervolume {row['hypervolume']:.4g} ± "
                f"{row['hypervolume_spread']:.2g}"
            )
        largest, match = r["largest"], r["match"]
        if largest is None or match is None:
            continue
        lines.append(
            f"  largest single subnet: {y} {largest[y]:.4g} ± {largest.get(f'{y}_std', float('nan')):.2g}, "
            f"{x} {largest[x]:.4g} ({largest['description']})"
        )
        for what, row in (("cheapest", match), ("cheapest schedule", r["schedule_match"])):
            if row is None:
                continue
            lines.append(
                f"  {what} within {z:g} SE of its {y}: {row['description']}: {y} {row[y]:.4g} ± "
                f"{row.get(f'{y}_std', float('nan')):.2g} (gap {row['quality_gap']:+.3g} ± {row['gap_se']:.2g}"
                f" paired where replicates allow), {x} {row[x]:.4g} = {row['cost_ratio']:.3f}x the largest's"
            )
        if r["schedule_match"] is None and (r["kinds"]["kind"] == "schedule").any():
            lines.append(f"  no schedule is within {z:g} SE of the largest single subnet's {y}")
    return "\n".join(lines)
