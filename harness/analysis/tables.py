"""Tables of results: the paper's Table 1 and the ``value ± standard error`` and floor formatting every
printed table shares (``harness.report``'s front, ``harness.evaluate``'s table, the reproduce table).

A value is printed with its standard error; a noisy value without one prints ``± n/a`` (never ``± 0``:
an SE of 0 would claim an exact figure), an exact count prints alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from harness.analysis.loading import FLOOR_METRICS, check_comparable
from harness.metric_names import COUNT_METRICS, METRICS

FRACTIONS = (0.4, 0.6, 0.8, 1.0)
MODEL_NAMES = {0.4: "SNED-S", 0.6: "SNED-M", 0.8: "SNED-L", 1.0: "SNED-B"}


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float | np.floating) and math.isnan(x)) or pd.isna(x)


def format_estimate(value: float | None, se: float | None, metric: str | None = None) -> str:
    """``"12.3 ± 0.41"``: the value (the metric's scale and decimals when ``metric`` is given, else 4
    significant digits), its SE to 2 significant digits; ``"n/a"`` when not measured, ``"12.3 ± n/a"``
    when a noisy metric has no SE (or a legacy 0), the value alone for an exact count."""
    if _missing(value):
        return "n/a"
    spec = METRICS.get(metric) if metric else None
    scale = spec.scale if spec else 1.0
    text = spec.format(float(value)) if spec else f"{float(value):.4g}"
    if metric in COUNT_METRICS:
        return text
    if _missing(se) or float(se) <= 0:
        return f"{text} ± n/a"
    return f"{text} ± {float(se) / scale:.2g}"


def floor_text(df: pd.DataFrame, metric: str = "fvd") -> str | None:
    """``"3.1 ± 0.2"`` for the floor of ``metric``'s protocol among ``df``'s rows (one per distinct
    protocol, joined by ``"; "``), or ``None`` when no row carries one."""
    if f"{metric}_floor" not in df:
        return None
    rows = df.dropna(subset=[f"{metric}_floor"])
    if rows.empty:
        return None
    unique = rows.drop_duplicates(f"{metric}_protocol")
    return "; ".join(format_estimate(f, s, metric) for f, s in zip(unique[f"{metric}_floor"],
                                                                    unique[f"{metric}_floor_se"]))  # fmt: skip


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
    """The paper's Table 1: Model, #Params, FLOPs, latency, FVD and KVD, each noisy figure as
    ``value ± standard error`` (of one run, or of the mean over repeats), with the protocol's floor.

    Rows are :func:`fraction_subnets`; ``df`` must hold one device and one extractor (see :func:`select`).
    Columns ``Model, target, param fraction, key, resolution, #Params, FLOPs, Latency (ms), FVD, KVD,
    FVD floor, KVD floor`` (a floor: held-out real videos scored in place of generated ones; ``n/a``
    when the store holds none).
    """
    check_comparable(df, ("latency_ms", "fvd", "kvd"))
    picked = fraction_subnets(df, fractions, total_params)
    for column in ("latency_ms_std", *(c for m in FLOOR_METRICS for c in (f"{m}_floor", f"{m}_floor_se"))):
        if column not in picked:
            picked[column] = np.nan

    def estimates(metric: str, suffix: str = "", se: str = "_std") -> list[str]:
        return [format_estimate(v, s) for v, s in zip(picked[metric + suffix], picked[metric + suffix + se])]

    return pd.DataFrame({
        "Model": picked["model"], "target": picked["target"],
        "param fraction": picked["param_fraction"].round(3), "key": picked["candidate_key"].str.slice(0, 12),
        "resolution": picked["resolution"], "#Params": picked["params"].astype("int64"),
        "FLOPs": picked["flops"].round().astype("Int64"), "Latency (ms)": estimates("latency_ms"),
        "FVD": estimates("fvd"), "KVD": estimates("kvd"),
        "FVD floor": estimates("fvd", "_floor", "_se"), "KVD floor": estimates("kvd", "_floor", "_se"),
    })  # fmt: skip
