"""Pareto analysis of the store: results table, fronts, hypervolume, searcher comparison, Table 1.
Used by ``notebooks/pareto_analysis.ipynb`` and ``python -m harness.plot``.

**Rows.** :func:`load_results` pivots the measurements (one store row per metric) to one row per
candidate x trial link x *setting*. Measurements are grouped by ``device`` and never combined across
devices, except the counted ``params`` and ``flops`` (device ``"any"``), which join every device's row;
a metric held under several protocols on one device repeats the row per combination, and FVD and KVD
of one row share their extractor. ``device``, ``extractor`` and ``<metric>_protocol`` name a row's
setting; the functions below raise ``ValueError`` on rows that mix devices (or extractors, for quality
objectives) instead of comparing them silently: keep one setting with :func:`select`.

**Directions.** ``minimize`` is ``True`` (all minimised), one flag per objective, or ``None`` for the
convention :data:`MINIMIZE` (everything but ``text_alignment`` is minimised).

**Reference point.** :func:`reference_point`: the worst value of each objective over the rows given,
10 % further out (``max x 1.1`` for positive minimised values). To compare searchers or resolutions use
one reference over all of them (``compare_*`` and ``hypervolume_over_trials`` do by default).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from typing import Any

import moocore
import numpy as np
import pandas as pd
from sqlalchemy import inspect
from sqlalchemy import select as sql_select

from harness import metric_names
from harness.metric_names import (
    ALIASES,
    ANY_DEVICE,
    COUNT_METRICS,
    MINIMIZE,
    NOT_APPLICABLE,
    QUALITY_METRICS,
)
from harness.store import Store, optuna_storage
from harness.store._models import SupernetModel

METRICS = tuple(metric_names.METRICS)
FRACTIONS = (0.4, 0.6, 0.8, 1.0)
MODEL_NAMES = {0.4: "SNED-S", 0.6: "SNED-M", 0.8: "SNED-L", 1.0: "SNED-B"}
LINK_COLUMNS = ("study", "searcher", "trial_number")
CANDIDATE_COLUMNS = ("candidate_key", "candidate_id", "supernet_id", "family", "kind", "resolution",
                     "description", "params", "supernet_params", "param_fraction")  # fmt: skip

Objectives = Sequence[str]
Minimize = bool | Sequence[bool] | None
Reference = Sequence[float] | np.ndarray | None


# Loading.


def load_results(url: str, study: str | Sequence[str] | None = None) -> pd.DataFrame:
    """The store's measurements, one row per candidate x trial link x setting (see the module docstring).

    Columns: ``study, searcher, trial_number`` (missing without a trial link); ``candidate_key,
    candidate_id, supernet_id, family, kind`` (subnet/chain), ``resolution`` (px), ``description``,
    ``params``, ``supernet_params`` (of the supernet(s) cut from; NaN if unknown), ``param_fraction``
    (the trial's user attribute, else params / supernet_params); per metric its value (``flops``: FLOP,
    one multiply-add = one FLOP, per video; ``latency_ms``: ms per video; ``fvd``, ``kvd``,
    ``text_alignment``), ``<metric>_std`` (not for counts) and ``<metric>_protocol``; ``device``,
    ``extractor``, ``status`` (``ok`` when all the row's measurements are; failed values are NaN) and
    ``error``. ``study`` keeps that study's (or studies') rows. Raises ``ValueError`` for a bad URL, a
    missing or empty store and an unknown study; messages never show the URL's password.
    """
    with Store(url) as store:
        frame = store.measurements_frame()
        if frame.empty:
            raise ValueError(f"store {store.redacted_url} holds no measurements")
        totals = _supernet_totals(store)
        fractions = _trial_fractions(store, {s for names in frame["study_names"] for s in names})
        known = sorted({s for names in frame["study_names"] for s in names})
        wanted = [study] if isinstance(study, str) else list(study or [])
        unknown = [s for s in wanted if s not in known]
        if unknown:
            names = ", ".join(known) or "none"
            raise ValueError(f"unknown study {unknown[0]!r} in {store.redacted_url}; studies: {names}")
    rows = [row for _, group in frame.groupby("candidate_id", sort=True)
            for row in _candidate_rows(group, totals, fractions)]  # fmt: skip
    results = _order_columns(pd.DataFrame.from_records(rows))
    results["trial_number"] = results["trial_number"].astype("Int64")
    if wanted:
        results = results[results["study"].isin(wanted)]
    results = results.sort_values(["study", "trial_number", "candidate_id"], na_position="last")
    return results.reset_index(drop=True)


def _supernet_totals(store: Store) -> dict[int, dict[str, int]]:
    """``{supernet_id: {"base": total params, "ssr": ...}}`` from the supernets' metadata (may be empty)."""
    with store.session() as session:
        supernets = session.scalars(sql_select(SupernetModel)).all()
    totals: dict[int, dict[str, int]] = {}
    for supernet in supernets:
        parts = {k: v for k, v in json.loads(supernet.metadata_json or "{}").items() if isinstance(v, dict)}
        totals[supernet.id] = {k: int(v["total_params"]) for k, v in parts.items() if "total_params" in v}
    return totals


def _trial_fractions(store: Store, studies: Iterable[str]) -> dict[tuple[str, int], float]:
    """``param_fraction`` user attribute per ``(study, trial number)`` of the Optuna studies in the store."""
    with store.session() as session:
        if not inspect(session.connection()).has_table("studies"):
            return {}  # no Optuna tables: never create them from an analysis
    storage = optuna_storage(store.url)
    fractions: dict[tuple[str, int], float] = {}
    try:
        for name in studies:
            try:
                study_id = storage.get_study_id_from_name(name)
            except KeyError:
                continue
            for trial in storage.get_all_trials(study_id, deepcopy=False):
                if trial.user_attrs.get("param_fraction") is not None:
                    fractions[(name, trial.number)] = float(trial.user_attrs["param_fraction"])
    finally:
        storage.remove_session()
        storage.engine.dispose()
    return fractions


def _candidate_rows(
    group: pd.DataFrame, totals: dict[int, dict[str, int]], fractions: dict[tuple[str, int], float]
) -> list[dict[str, Any]]:
    """Rows of one candidate: settings (device groups x metric variants) x trial links."""
    first = group.iloc[0]
    config = first["config"] if isinstance(first["config"], dict) else {}
    kind = "chain" if config.get("format") == "sned-chain/1" else "subnet"
    total = totals.get(int(first["supernet_id"]), {})
    parts = ("base", "ssr") if kind == "chain" else ("base",)
    supernet_params = float(sum(total[p] for p in parts)) if all(p in total for p in parts) else np.nan
    candidate = {"candidate_key": first["candidate_key"], "candidate_id": int(first["candidate_id"]),
                 "supernet_id": int(first["supernet_id"]), "family": first["family"], "kind": kind,
                 "resolution": int(first["resolution"]), "description": first["description"],
                 "params": float(first["params"]), "supernet_params": supernet_params}  # fmt: skip
    links = list(zip(first["study_names"], first["searchers"], first["trial_numbers"]))
    rows = []
    for setting in _settings(group.to_dict("records")):
        for study, searcher, number in links or [(None, None, None)]:
            fraction = fractions.get((study, number), candidate["params"] / supernet_params)
            link = {"study": study, "searcher": searcher, "trial_number": number, "param_fraction": fraction}
            rows.append({**link, **candidate, **setting})
    return rows


def _settings(measurements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measurement columns of each setting: per device, every combination of the metrics' variants."""
    shared = [m for m in measurements if m["device"] == ANY_DEVICE or m["metric"] in COUNT_METRICS]
    shared_ids = {m["measurement_id"] for m in shared}
    by_device: dict[str | None, list[dict[str, Any]]] = {}
    for m in measurements:
        if m["measurement_id"] not in shared_ids:
            by_device.setdefault(m["device"], []).append(m)
    settings = []
    for device, own in (by_device or {None: []}).items():
        variants: dict[str, list[dict[str, Any]]] = {}
        for m in shared + own:
            variants.setdefault(m["metric"], []).append(m)
        for combination in itertools.product(*variants.values()):
            extractors = {m["extractor"] for m in combination if m["metric"] in ("fvd", "kvd")}
            if len(extractors - {None}) <= 1:
                settings.append(_setting_columns(device, combination))
    return settings


def _setting_columns(device: str | None, combination: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Value, std and protocol columns of one combination of measurements (one per metric)."""
    columns: dict[str, Any] = {"device": device, "extractor": None}
    errors = []
    for m in combination:
        metric, value = m["metric"], m["value"] if m["status"] == "ok" else None
        if metric == "text_alignment" and value == NOT_APPLICABLE:
            value = None
        if metric != "params":  # the candidate's own count is authoritative
            columns[metric] = np.nan if value is None else float(value)
        if metric not in COUNT_METRICS:
            columns[f"{metric}_std"] = np.nan if m["std"] is None else float(m["std"])
        columns[f"{metric}_protocol"] = m["protocol"]
        if m["extractor"] and (metric in ("fvd", "kvd") or columns["extractor"] is None):
            columns["extractor"] = m["extractor"]
        if m["status"] != "ok":
            errors.append(f"{metric}: {m['error']}")
    columns["status"] = "failed" if errors else "ok"
    columns["error"] = "; ".join(errors) or None
    return columns


def _order_columns(results: pd.DataFrame) -> pd.DataFrame:
    """Known columns first (always present, NaN when never measured), then any other metric's columns."""
    values = [c for m in METRICS[1:] for c in ((m,) if m in COUNT_METRICS else (m, f"{m}_std"))]
    protocols = [f"{m}_protocol" for m in METRICS]
    known = [*LINK_COLUMNS, *CANDIDATE_COLUMNS, *values, "device", "extractor", *protocols, "status", "error"]
    for column in known:
        if column not in results:
            results[column] = np.nan
    return results[known + [c for c in results.columns if c not in known]]


# Selecting and checking.


def resolve_objectives(objectives: Iterable[str]) -> tuple[str, ...]:
    """Column names of ``objectives`` (aliases: ``latency`` -> ``latency_ms``); ``ValueError`` if unknown."""
    resolved = tuple(ALIASES.get(o, o) for o in objectives)
    for name, column in zip(objectives, resolved):
        if column not in MINIMIZE:
            raise ValueError(f"unknown objective {name!r}; choose from {', '.join([*MINIMIZE, *ALIASES])}")
    return resolved


def select(
    df: pd.DataFrame, *, device: str | None = None, extractor: str | None = None,
    study: str | Sequence[str] | None = None, resolution: int | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Rows of one setting. ``None`` keeps every value of that column; device/extractor must then be unique.

    Raises ``ValueError`` when ``device`` or ``extractor`` is not in ``df``, or is ``None`` while ``df``
    holds several (naming the choices), so that one device and one extractor remain.
    """
    if study is not None:
        df = df[df["study"].isin([study] if isinstance(study, str) else list(study))]
    if resolution is not None:
        df = df[df["resolution"] == resolution]
    for column, wanted in (("device", device), ("extractor", extractor)):
        present = sorted(df[column].dropna().unique())
        names = ", ".join(present) or "none"
        if wanted is None and len(present) > 1:
            raise ValueError(f"results hold several {column}s ({names}); pick one: {column}=... (--{column})")
        if wanted is not None and wanted not in present:
            raise ValueError(f"no results for {column} {wanted!r}; present: {names}")
        if wanted is not None:
            df = df[df[column].isna() | (df[column] == wanted)]
    return df


def _check_comparable(df: pd.DataFrame, objectives: Objectives) -> None:
    """Raise ``ValueError`` when the rows with all ``objectives`` mix devices or (quality) extractors."""
    rows = df.dropna(subset=list(objectives))
    checks = [("device", any(o not in COUNT_METRICS for o in objectives)),
              ("extractor", any(o in QUALITY_METRICS for o in objectives))]  # fmt: skip
    for column, matters in checks:
        present = sorted(rows[column].dropna().unique()) if column in rows else []
        if matters and len(present) > 1:
            raise ValueError(
                f"rows mix {column}s ({', '.join(present)}): keep one with select(df, {column}=...)"
            )


def minimize_flags(objectives: Objectives, minimize: Minimize) -> list[bool]:
    """One flag per objective: ``True`` minimises (``None``: :data:`MINIMIZE`'s convention)."""
    if minimize is None:
        return [MINIMIZE[o] for o in objectives]
    if isinstance(minimize, bool):
        return [minimize] * len(objectives)
    if len(minimize) != len(objectives):
        raise ValueError(f"minimize has {len(minimize)} flags for {len(objectives)} objectives")
    return [bool(m) for m in minimize]


def _points(df: pd.DataFrame, objectives: Objectives) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows with every objective measured, and their ``(N, len(objectives))`` objective matrix."""
    missing = [o for o in objectives if o not in df]
    if missing:
        raise ValueError(f"no column {missing[0]!r} in the results")
    rows = df.dropna(subset=list(objectives))
    return rows, rows[list(objectives)].to_numpy(dtype=float).reshape(len(rows), len(objectives))


# Fronts and hypervolume.


def pareto_front(
    df: pd.DataFrame, objectives: Objectives = ("latency_ms", "fvd"), minimize: Minimize = True
) -> pd.DataFrame:
    """Non-dominated rows (``moocore.is_nondominated``, duplicates kept once), sorted by the objectives."""
    objectives = resolve_objectives(objectives)
    _check_comparable(df, objectives)
    rows, points = _points(df, objectives)
    if len(rows) == 0:
        return rows
    maximise = [not m for m in minimize_flags(objectives, minimize)]
    return rows[moocore.is_nondominated(points, maximise=maximise)].sort_values(list(objectives))


def fronts_by_resolution(
    df: pd.DataFrame, objectives: Objectives = ("latency_ms", "fvd"), minimize: Minimize = True
) -> dict[int, pd.DataFrame]:
    """:func:`pareto_front` of each resolution's rows, keyed by resolution (pixels), ascending."""
    groups = df.groupby("resolution", sort=True)
    return {int(resolution): pareto_front(rows, objectives, minimize) for resolution, rows in groups}


def reference_point(df: pd.DataFrame, objectives: Objectives, minimize: Minimize = True) -> np.ndarray:
    """Worst value of each objective over ``df``, 10 % of its magnitude further out (``max x 1.1``)."""
    objectives = resolve_objectives(objectives)
    _, points = _points(df, objectives)
    if len(points) == 0:
        raise ValueError(f"no rows with every objective measured ({', '.join(objectives)})")
    flags = np.array(minimize_flags(objectives, minimize))
    worst = np.where(flags, points.max(axis=0), points.min(axis=0))
    return worst + np.where(flags, 1.0, -1.0) * 0.1 * np.abs(worst)


def _prepare(
    df: pd.DataFrame, objectives: Objectives, reference: Reference, minimize: Minimize
) -> tuple[tuple[str, ...], list[bool], np.ndarray]:
    """Checked objectives, moocore's ``maximise`` flags and the reference (default: over all of ``df``)."""
    objectives = resolve_objectives(objectives)
    _check_comparable(df, objectives)
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
    _, points = _points(df, objectives)
    return float(moocore.hypervolume(points, ref=ref, maximise=maximise)) if len(points) else 0.0


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
            front = np.vstack([front, _points(trial_rows, objectives)[1]])
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
        n_measured = len(_points(rows, objectives)[0])
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

    _check_comparable(df, ("latency_ms", "flops"))
    rows, points = _points(df.drop_duplicates(["candidate_key", "latency_ms"]), ("flops", "latency_ms"))
    if len(rows) < 3:
        return {"n": float(len(rows)), "pearson": np.nan, "spearman": np.nan}
    pearson = stats.pearsonr(points[:, 0], points[:, 1]).statistic
    spearman = stats.spearmanr(points[:, 0], points[:, 1]).statistic
    return {"n": float(len(rows)), "pearson": float(pearson), "spearman": float(spearman)}


# Table 1.


def fraction_subnets(
    df: pd.DataFrame, fractions: Sequence[float] = FRACTIONS, total_params: float | None = None
) -> pd.DataFrame:
    """The candidate nearest each fraction of the supernet's parameters (the paper's S/M/L/B subnets).

    The fraction of a row is ``params / total_params`` when ``total_params`` is given, else its
    ``param_fraction`` (the trial's attribute or the supernet metadata's count), else ``params`` over the
    largest ``params`` in ``df``. A candidate whose description names the model (``"SNED-S"``, ...) is
    taken first; ties go to the lower FVD, then latency. Returns the chosen rows with ``model`` and
    ``target`` columns, in the order of ``fractions``.
    """
    if df.empty:
        raise ValueError("no results to pick subnets from")
    rows = df.sort_values(["fvd", "latency_ms"], na_position="last").drop_duplicates("candidate_key")
    if total_params is not None:
        fraction = rows["params"] / float(total_params)
    else:
        fraction = rows["param_fraction"].fillna(rows["params"] / rows["params"].max())
    rows = rows.assign(param_fraction=fraction)
    picked = []
    for target in fractions:
        name = MODEL_NAMES.get(round(float(target), 2), f"SNED-{float(target):.0%}")
        tagged = rows[rows["description"].fillna("").str.contains(name, regex=False)]
        pool = tagged if len(tagged) else rows
        distance = (pool["param_fraction"] - float(target)).abs()
        chosen = pool.assign(_distance=distance).sort_values("_distance", kind="stable").iloc[0]
        picked.append(chosen.drop("_distance").to_dict() | {"model": name, "target": float(target)})
    return pd.DataFrame.from_records(picked)


def table1(
    df: pd.DataFrame, fractions: Sequence[float] = FRACTIONS, total_params: float | None = None
) -> pd.DataFrame:
    """The paper's Table 1: Model, #Params, FLOPs, latency, FVD and KVD (mean ± std over repeats).

    Rows are :func:`fraction_subnets`; ``df`` must hold one device and one extractor (see :func:`select`).
    Columns ``Model, target, param fraction, key, resolution, #Params, FLOPs, Latency (ms), FVD, KVD``.
    """
    _check_comparable(df, ("latency_ms", "fvd", "kvd"))
    picked = fraction_subnets(df, fractions, total_params)
    return pd.DataFrame({
        "Model": picked["model"], "target": picked["target"],
        "param fraction": picked["param_fraction"].round(3), "key": picked["candidate_key"].str.slice(0, 12),
        "resolution": picked["resolution"], "#Params": picked["params"].astype("int64"),
        "FLOPs": picked["flops"].round().astype("Int64"), "Latency (ms)": picked["latency_ms"],
        "FVD": [_mean_std(m, s) for m, s in zip(picked["fvd"], picked["fvd_std"])],
        "KVD": [_mean_std(m, s) for m, s in zip(picked["kvd"], picked["kvd_std"])],
    })  # fmt: skip


def _mean_std(mean: float, std: float) -> str:
    """``"mean ± std"`` with 4 significant digits (``"n/a"`` when not measured)."""
    if mean is None or pd.isna(mean):
        return "n/a"
    return f"{mean:.4g}" if std is None or pd.isna(std) else f"{mean:.4g} ± {std:.2g}"
