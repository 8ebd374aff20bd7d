"""The search's closing report: the Pareto front as a table, and its plot on disk, from one query of the
store (``harness.analysis.load_results``), so the printed front and the drawn front are the same rows."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from harness import analysis
from harness.metric_names import METRICS, metric_name
from harness.paths import RESULTS
from harness.store import redact_url

FRONT_COLUMNS = ("params", "flops", "latency_ms", "fvd", "kvd")


def study_results(
    url: str, study: str, device: str, extractor: str | None, limits: Mapping[str, float | None] | None = None
) -> pd.DataFrame:
    """The study's rows measured on ``device`` with ``extractor``, without the candidates that break a
    limit (``{"params": 5e5, "latency_ms": None, ...}``; ``None`` = no limit)."""
    df = analysis.select(analysis.load_results(url, study), device=device, extractor=extractor)
    for metric, limit in (limits or {}).items():
        if limit is not None:
            df = df[df[metric] <= limit]
    return df


def format_front(front: pd.DataFrame) -> str:
    header = f"{'trial':>5}  " + "  ".join(f"{METRICS[c].label:>10}" for c in FRONT_COLUMNS) + "  subnet"
    lines = [header, "-" * len(header)]
    for _, row in front.iterrows():
        trial = "-" if pd.isna(row.get("trial_number")) else str(int(row["trial_number"]))
        cells = "  ".join(f"{METRICS[c].format(row.get(c)):>10}" for c in FRONT_COLUMNS)
        lines.append(f"{trial:>5}  {cells}  {row.get('description', '')}")
    return "\n".join(lines)


def report_front(
    df: pd.DataFrame, url: str, study: str, objectives: list[str], plot: bool = True
) -> Path | None:
    """Print the front of ``df`` (see :func:`study_results`) over ``objectives`` and draw its plot."""
    columns = [metric_name(o) for o in objectives]
    front = analysis.pareto_front(df, columns) if not df.empty else df
    n_done = df["trial_number"].nunique() if not df.empty else 0
    print(
        f"\nPareto front of '{study}' ({len(front)} of {n_done} completed trials; "
        f"objectives: {', '.join(objectives)}):"
    )
    print(format_front(front))
    print(
        "FVD/KVD from the offline proxy extractor unless --fvd-weights was given; latency per generated "
        "video on this machine (see the store for the full provenance)."
    )
    if not plot or front.empty:
        return None
    from harness.figures import plot_front

    out = RESULTS / "plots" / f"{study}-front.png"
    plot_front(df, tuple(columns[:2]), out, title=f"{study} ({redact_url(url)})")
    print(f"front plot written to {out}")
    return out
