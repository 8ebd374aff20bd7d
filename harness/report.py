"""The search's closing report: the noise-aware Pareto front as a table (``value ± standard error``, the
protocol's floor beside FVD and KVD) and its plot on disk, from one query of the store
(``harness.analysis.load_results``: full-fidelity rows only), so the printed front and the drawn front are
the same rows."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from harness import analysis
from harness.analysis.loading import FLOOR_METRICS, is_modelled_protocol
from harness.metric_names import COUNT_METRICS, METRICS, metric_name
from harness.paths import RESULTS
from harness.store import redact_url

FRONT_COLUMNS = ("params", "flops", "latency_ms", "fvd", "kvd")
CELL = 16  # width of a "value ± SE" cell
RULE = (
    "front rule: a point is dominated only by one no worse in every objective and better in one by more "
    "than {z:g} standard errors of the difference; * = statistically tied (beaten, but within the noise)"
)


def study_results(
    url: str, study: str, device: str, extractor: str | None, limits: Mapping[str, float | None] | None = None
) -> pd.DataFrame:
    """The study's full-fidelity rows measured on ``device`` with ``extractor``, without the candidates
    that break a limit (``{"params": 5e5, "latency_ms": None, ...}``; ``None`` = no limit), with their
    bootstrap replicates (``analysis.load_bootstrap``) for paired comparisons."""
    df = analysis.select(analysis.load_results(url, study), device=device, extractor=extractor)
    for metric, limit in (limits or {}).items():
        if limit is not None:
            df = df[df[metric] <= limit]
    return analysis.load_bootstrap(url, df)


def _cell(row: Mapping, column: str) -> str:
    if column in COUNT_METRICS:
        return METRICS[column].format(row.get(column))
    if is_modelled_protocol(row.get(f"{column}_protocol")) and not pd.isna(row.get(column)):
        return f"{METRICS[column].format(row.get(column))} (model)"  # deterministic: no sampling error
    return analysis.format_estimate(row.get(column), row.get(f"{column}_std"), column)


def format_front(front: pd.DataFrame) -> str:
    """The front as a table: trial (``*`` when statistically tied), counts, ``value ± SE`` of the noisy
    figures, the subnet; and a ``floor`` row per FVD protocol (real videos scored as generated)."""
    widths = [10 if c in COUNT_METRICS else CELL for c in FRONT_COLUMNS]
    header = f"{'trial':>6}  " + "  ".join(f"{METRICS[c].label:>{w}}" for c, w in zip(FRONT_COLUMNS, widths))
    header += "  subnet"
    lines = [header, "-" * len(header)]
    for _, row in front.iterrows():
        trial = "-" if pd.isna(row.get("trial_number")) else str(int(row["trial_number"]))
        trial += "*" if bool(row.get("tied", False)) else " "
        cells = "  ".join(f"{_cell(row, c):>{w}}" for c, w in zip(FRONT_COLUMNS, widths))
        lines.append(f"{trial:>6}  {cells}  {row.get('description', '')}")
    floors = front.dropna(subset=["fvd_floor"]) if "fvd_floor" in front else front.iloc[0:0]
    for _, row in floors.drop_duplicates("fvd_protocol").iterrows():
        cells = []
        for c, w in zip(FRONT_COLUMNS, widths):
            floor = analysis.format_estimate(row.get(f"{c}_floor"), row.get(f"{c}_floor_se"), c)
            cells.append(f"{floor if c in FLOOR_METRICS else '':>{w}}")
        lines.append(f"{'floor':>6}  " + "  ".join(cells) + "  held-out real videos scored as generated "
                     f"({row.get('fvd_protocol')})")  # fmt: skip
    return "\n".join(lines)


def format_trajectory_comparison(table: pd.DataFrame) -> str:
    """``compare_trajectories``' table as lines: hypervolume ± spread per kind on one reference."""
    reference = tuple(round(v, 4) for v in table["reference"].iloc[0])
    head = f"single subnets against trajectory schedules (one reference point {reference}; "
    lines = [head + "± = spread over redraws of every point within its SEs):"]
    for _, row in table.iterrows():
        lines.append(
            f"  {row['kind']:>13}: {row['n_candidates']:3d} candidates, front {row['front_size']:2d} "
            f"({row['on_overall_front']} on the front of all), hypervolume "
            f"{row['hypervolume']:.4g} ± {row['hypervolume_spread']:.2g}"
        )
    return "\n".join(lines)


def report_front(
    df: pd.DataFrame,
    url: str,
    study: str,
    objectives: list[str],
    plot: bool = True,
    noise_z: float = analysis.DEFAULT_Z,
) -> Path | None:
    """Print the noise-aware front of ``df`` (see :func:`study_results`) over ``objectives``, how many of
    its points are statistically tied, and draw its plot."""
    columns = [metric_name(o) for o in objectives]
    front = analysis.pareto_front(df, columns, noise_z=noise_z) if not df.empty else df
    n_done = df["trial_number"].nunique() if not df.empty else 0
    tied = analysis.tied_count(front)
    print(
        f"\nPareto front of '{study}' ({len(front)} of {n_done} full-fidelity trials, {tied} of them "
        f"statistically tied; objectives: {', '.join(objectives)}):"
    )
    print(format_front(front))
    print(RULE.format(z=noise_z))
    if not df.empty and (analysis.trajectory_kind(df) == "schedule").any():
        print(format_trajectory_comparison(analysis.compare_trajectories(df, columns)))
    devices = ", ".join(sorted(df["device"].dropna().unique())) if not df.empty else "this machine"
    print(
        "± = standard error. FVD/KVD from the offline proxy extractor unless --fvd-weights was given; "
        f"latency per generated video on {devices} (see the store for the full provenance)."
    )
    if not plot or front.empty:
        return None
    from harness.figures import plot_front

    out = RESULTS / "plots" / f"{study}-front.png"
    plot_front(df, tuple(columns[:2]), out, title=f"{study} ({redact_url(url)})", noise_z=noise_z)
    print(f"front plot written to {out}")
    return out
