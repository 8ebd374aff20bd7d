"""Figures of a search's results: fronts per resolution, hypervolume over trials, latency against FLOPs,
training loss (``python -m harness.plot`` draws them from a store).

The library functions build ``matplotlib.figure.Figure`` objects without pyplot (so they render with
the Agg canvas anywhere and leave a notebook's backend alone), save them when ``path`` is given, and
return them (a notebook displays a returned figure inline).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from harness import analysis
from harness.analysis import Minimize, Objectives
from harness.analysis.trajectories import trajectory_kind
from harness.analysis.uncertainty import standard_errors
from harness.metric_names import COUNT_METRICS, METRICS

DEFAULT_OBJECTIVES = ("latency_ms", "fvd")
LABELS = {name: metric.axis for name, metric in METRICS.items()}
DPI = 120


def _save(figure: Figure, path: str | Path | None) -> Figure:
    """Save ``figure`` as ``path`` (parents created) when given; return it."""
    if path is not None:  # written beside, then renamed: a reader never sees half a PNG
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        figure.savefig(tmp, dpi=DPI, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    return figure


def _label(objective: str) -> str:
    """Axis label of an objective column."""
    return LABELS.get(objective, objective)


def _use_log(values: pd.Series) -> bool:
    """Log axis for positive values spanning more than 20x."""
    values = values.dropna()
    return len(values) > 1 and values.min() > 0 and values.max() / values.min() > 20


def _bars(rows: pd.DataFrame, objective: str, z: float) -> np.ndarray | None:
    """Half-lengths ``z * SE`` of the rows' error bars in ``objective`` (``None`` for an exact count;
    a missing SE draws no bar)."""
    se = standard_errors(rows, [objective])[:, 0]
    return None if objective in COUNT_METRICS else z * se


MARKERS = {"single subnet": "o", "schedule": "s"}  # trajectory schedules (issue 20) drawn as squares


def _by_kind(rows: pd.DataFrame):
    """``(kind, marker, rows of that kind)`` for each kind present (single subnets, then schedules)."""
    kinds = trajectory_kind(rows)
    for kind, marker in MARKERS.items():
        part = rows[kinds == kind]
        if len(part):
            yield kind, marker, part


def _draw_front(
    ax: Axes, rows: pd.DataFrame, front: pd.DataFrame, objectives: Sequence[str], flags: list[bool], z: float
) -> None:
    """All ``rows`` faint, ``front`` highlighted and joined by its attainment staircase, every point with
    its ``± z SE`` error bars in both axes; statistically tied front points hollow. Single subnets are
    circles, trajectory schedules squares (labelled only when a panel has both)."""
    x, y = objectives
    mixed = len(set(trajectory_kind(rows))) > 1
    for kind, marker, part in _by_kind(rows):
        label = f"{kind} candidates ({len(part)})" if mixed else f"candidates ({len(part)})"
        ax.errorbar(part[x], part[y], xerr=_bars(part, x, z), yerr=_bars(part, y, z), fmt=marker, ms=3.5,
                    color="0.6", alpha=0.35, elinewidth=0.6, label=label)  # fmt: skip
    tied = front["tied"].to_numpy(bool) if "tied" in front else np.zeros(len(front), bool)
    strict = front[~tied].sort_values(x)
    # Staircase of the region the strict front dominates: "post" when the x objective is minimised.
    ax.step(strict[x], strict[y], where="post" if flags[0] else "pre", color="C0", linewidth=1.2)
    for kind, marker, part in _by_kind(strict):
        label = f"Pareto front{f' {kind}s' if mixed else ''} ({len(part)}); bars ±{z:g} SE"
        ax.errorbar(part[x], part[y], xerr=_bars(part, x, z), yerr=_bars(part, y, z), fmt=marker, ms=5,
                    color="C0", elinewidth=1.0, capsize=2, zorder=3, label=label)  # fmt: skip
    for kind, marker, part in _by_kind(front[tied]):
        label = f"statistically tied{f' {kind}s' if mixed else ''} ({len(part)})"
        ax.errorbar(part[x], part[y], xerr=_bars(part, x, z), yerr=_bars(part, y, z), fmt=marker,
                    ms=5, mfc="none", color="C0", elinewidth=0.8, capsize=2, zorder=3, label=label)  # fmt: skip
    _draw_floors(ax, rows, objectives)
    for column, setter in ((x, ax.set_xscale), (y, ax.set_yscale)):
        if _use_log(rows[column]):
            setter("log")
    ax.set_xlabel(_label(x))
    ax.set_ylabel(_label(y))
    ax.grid(alpha=0.3)


def _draw_floors(ax: Axes, rows: pd.DataFrame, objectives: Sequence[str]) -> None:
    """The protocol's floor (real videos scored as generated) of a quality axis, as a line and band."""
    for axis, objective in zip(("x", "y"), objectives):
        column = f"{objective}_floor"
        if column not in rows or rows[column].dropna().empty:
            continue
        floor = float(rows[column].dropna().iloc[0])
        se = rows[f"{objective}_floor_se"].dropna()
        se = float(se.iloc[0]) if len(se) else 0.0
        line, band = (ax.axhline, ax.axhspan) if axis == "y" else (ax.axvline, ax.axvspan)
        label = f"{_label(objective)} floor {analysis.format_estimate(floor, se or None, objective)}"
        line(floor, color="C2", linestyle="--", linewidth=1.0, label=label)
        if se > 0:
            band(floor - 1.96 * se, floor + 1.96 * se, color="C2", alpha=0.12)


def _mark_subnets(ax: Axes, subnets: pd.DataFrame, objectives: Sequence[str]) -> None:
    """Mark and label the 40/60/80/100 %-parameter subnets (rows of ``analysis.fraction_subnets``)."""
    x, y = objectives
    for _, row in subnets.dropna(subset=[x, y]).iterrows():
        ax.scatter([row[x]], [row[y]], marker="*", s=140, color="C3", edgecolor="k", linewidth=0.5, zorder=4)
        ax.annotate(f"{row['model']} ({row['param_fraction']:.0%})", (row[x], row[y]), xytext=(6, 6),
                    textcoords="offset points", fontsize=8)  # fmt: skip


def plot_front(
    df: pd.DataFrame,
    objectives: Objectives = DEFAULT_OBJECTIVES,
    path: str | Path | None = None,
    title: str | None = None,
    minimize: Minimize = None,  # None: analysis.MINIMIZE's direction per objective
    noise_z: float | None = analysis.DEFAULT_Z,
) -> Figure:
    """One panel per resolution: every candidate faint, its Pareto front highlighted and connected, and
    the candidates nearest 40/60/80/100 % of the supernet's parameters (over all resolutions) marked.

    Every point carries error bars of ``± noise_z`` standard errors in both axes (none for an exact
    count); the front is the noise-aware one (``analysis.pareto_front(..., noise_z=...)``: paired SEs
    where ``df`` carries ``analysis.load_bootstrap``'s columns), its statistically tied points hollow;
    ``noise_z=None`` draws the strict front with 95 % (±1.96 SE) bars. A quality axis shows its floor."""
    objectives = analysis.resolve_objectives(objectives)
    if len(objectives) != 2:
        raise ValueError(f"a front plot draws two objectives, got {len(objectives)}")
    flags = analysis.minimize_flags(objectives, minimize)
    fronts = analysis.fronts_by_resolution(df, objectives, flags, noise_z)
    z = analysis.DEFAULT_Z if noise_z is None else float(noise_z)
    if not fronts or all(front.empty for front in fronts.values()):
        raise ValueError(f"no candidate has both {objectives[0]} and {objectives[1]} measured")
    subnets = analysis.fraction_subnets(df)
    columns = min(len(fronts), 3)
    rows_count = math.ceil(len(fronts) / columns)
    figure = Figure(figsize=(5.0 * columns, 4.0 * rows_count), layout="constrained")
    axes = figure.subplots(rows_count, columns, squeeze=False).ravel()
    for ax, (resolution, front) in zip(axes, fronts.items()):
        rows = df[df["resolution"] == resolution].dropna(subset=list(objectives))
        _draw_front(ax, rows, front, objectives, flags, z)
        _mark_subnets(ax, subnets[subnets["resolution"] == resolution], objectives)
        ax.set_title(f"{resolution}px")
        ax.legend(fontsize=8)
    for ax in axes[len(fronts) :]:
        ax.set_visible(False)
    figure.suptitle(title or f"{_label(objectives[1])} against {_label(objectives[0])}")
    return _save(figure, path)


def plot_hypervolume(
    df: pd.DataFrame,
    objectives: Objectives = DEFAULT_OBJECTIVES,
    path: str | Path | None = None,
    title: str | None = None,
    minimize: Minimize = None,  # None: analysis.MINIMIZE's direction per objective
) -> Figure:
    """Hypervolume over trial numbers, one curve per study/searcher, all with one common reference."""
    objectives = analysis.resolve_objectives(objectives)
    flags = analysis.minimize_flags(objectives, minimize)
    reference = analysis.reference_point(df, objectives, flags)
    curves = analysis.hypervolume_over_trials(df, objectives, reference, flags)
    if curves.empty:
        raise ValueError("no trial-linked candidates to draw hypervolume over trials")
    figure = Figure(figsize=(6.5, 4.0), layout="constrained")
    ax = figure.subplots()
    for (study, searcher), curve in curves.groupby(["study", "searcher"], sort=True):
        ax.step(curve["trial_number"], curve["hypervolume"], where="post", label=f"{study} ({searcher})")
    ax.set_xlabel("trial number")
    ax.set_ylabel("hypervolume")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    point = ", ".join(f"{o}={v:.4g}" for o, v in zip(objectives, reference))
    ax.set_title(title or f"hypervolume of ({', '.join(objectives)}), reference ({point})", fontsize=9)
    return _save(figure, path)


def plot_latency_vs_flops(
    df: pd.DataFrame, path: str | Path | None = None, title: str | None = None
) -> Figure:
    """Latency against FLOPs per resolution, titled with the Pearson and Spearman correlations."""
    correlation = analysis.latency_flops_correlation(df)
    rows = df.dropna(subset=["flops", "latency_ms"]).drop_duplicates(["candidate_key", "latency_ms"])
    if rows.empty:
        raise ValueError("no candidate has both flops and latency_ms measured")
    figure = Figure(figsize=(6.0, 4.5), layout="constrained")
    ax = figure.subplots()
    for index, (resolution, group) in enumerate(rows.groupby("resolution", sort=True)):
        ax.scatter(
            group["flops"], group["latency_ms"], s=16, color=f"C{index}", alpha=0.7, label=f"{resolution}px"
        )
    for column, setter in (("flops", ax.set_xscale), ("latency_ms", ax.set_yscale)):
        if _use_log(rows[column]):
            setter("log")
    ax.set_xlabel(_label("flops"))
    ax.set_ylabel(_label("latency_ms"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    device = ", ".join(sorted(rows["device"].dropna().unique()))
    stats = f"Pearson r = {correlation['pearson']:.3f}, Spearman rho = {correlation['spearman']:.3f}"
    ax.set_title(title or f"{device}\n{stats} (n = {int(correlation['n'])})", fontsize=9)
    return _save(figure, path)


def write_plots(
    df: pd.DataFrame, objectives: Objectives, out: str | Path, noise_z: float | None = analysis.DEFAULT_Z
) -> list[Path]:
    """Write the three plots into ``out``; returns the written paths (latency/FLOPs only when measured)."""
    objectives = analysis.resolve_objectives(objectives)
    out = Path(out)
    names = "_vs_".join(objectives)
    jobs = [(out / f"front_{names}.png", lambda p: plot_front(df, objectives, p, noise_z=noise_z)),
            (out / f"hypervolume_{names}.png", lambda p: plot_hypervolume(df, objectives, p))]  # fmt: skip
    if not df.dropna(subset=["flops", "latency_ms"]).empty:
        jobs.append((out / "latency_vs_flops.png", lambda p: plot_latency_vs_flops(df, p)))
    for path, draw in jobs:
        draw(path)
    return [path for path, _ in jobs]


def plot_training_logs(logs: Sequence[str | Path], path: str | Path) -> Path:
    """Training loss against step for one or more ``log.jsonl`` files (raw, and a 50-point running mean)."""
    import json

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for log in logs:
        log = Path(log)
        if not log.is_file():
            raise ValueError(f"training log {log} does not exist; pass a run's log.jsonl")
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["Loss/train"] for r in rows])
        (line,) = ax.plot(steps, loss, alpha=0.25, lw=0.8)
        k = min(50, len(loss))
        ax.plot(
            steps[k - 1 :],
            np.convolve(loss, np.ones(k) / k, mode="valid"),
            color=line.get_color(),
            label=f"{log.parent.name} (running mean of {k})",
        )
    ax.set(
        xlabel="step",
        ylabel="training loss (MSE to the run's target: eps, v or teacher)",
        yscale="log",
        title="supernet training loss",
    )
    ax.legend(fontsize=8)
    _save(fig, path)
    return Path(path)
