"""Loading the store's measurements as one results table, keeping one setting, and the studies' attributes.

**Rows.** :func:`load_results` pivots the measurements (one store row per metric) to one row per
candidate x trial link x *setting*. Measurements are grouped by ``device`` and never combined across
devices, except the counted ``params`` and ``flops`` (device ``"any"``), which join every device's row,
and a *modelled* device's rows (``harness.roofline``: latency of a GPU that is not here), which also join
each measuring device's quality as a row of the modelled device whose ``quality_device`` names the host;
a metric held under several protocols on one device repeats the row per combination, and FVD and KVD
of one row share their extractor. ``device``, ``extractor`` and ``<metric>_protocol`` name a row's
setting; the analysis raises ``ValueError`` on rows that mix devices (or extractors, for quality
objectives) instead of comparing them silently: keep one setting with :func:`select`.

**Fidelities.** A study created by ``python -m harness.search`` names its protocols per fidelity in the
user attribute ``fidelity_protocols`` (``{"full": {metric: protocol}, "screen-<n>": {...}}``), and each
``python -m harness.analysis reproduce --offset k`` run records its re-measurement protocols as
``reproduce-<k>`` (fidelity ``rerun-<k>``). A row's ``fidelity`` is the first of these (``full`` first)
that none of its protocols contradicts; by default only ``full`` rows of such a study are returned, so
fronts, tables and plots never show a screened or re-measured value (``fidelity=None`` returns them all).
A study without these attributes keeps every row (``fidelity`` NaN).

**Standard errors.** ``<metric>_std`` is the standard error of the value (contract of the measurement
layer); a stored 0 for a noisy metric is a legacy single run whose spread was never estimated, and reads
as NaN ("n/a"), never as an exact value.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from optuna.trial import TrialState
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
from harness.store._models import MeasurementModel, SupernetModel

METRICS = tuple(metric_names.METRICS)
LINK_COLUMNS = ("study", "searcher", "trial_number")
CANDIDATE_COLUMNS = ("candidate_key", "candidate_id", "supernet_id", "family", "kind", "resolution",
                     "steps", "segments", "description", "params", "supernet_params",
                     "param_fraction")  # fmt: skip
FLOOR_METRICS = ("fvd", "kvd")  # metrics whose protocol has a floor (real videos scored as generated)
BOOTSTRAP_METRICS = ("fvd", "kvd")  # metrics whose measurement may carry bootstrap replicates
FULL = "full"
RERUN_PREFIX = "reproduce-"  # study attribute of a reproduce run: "reproduce-<offset>"

Objectives = Sequence[str]
Minimize = bool | Sequence[bool] | None


# Studies.


def study_attributes(url: str, studies: Iterable[str]) -> dict[str, dict[str, Any]]:
    """User attributes of the named Optuna studies in the store (``{}`` for a study not there)."""
    with Store.open_existing(url) as store:
        return _study_info(store, studies).attributes


@dataclass
class _StudyInfo:
    """What the analysis reads from Optuna: ``param_fraction`` per ``(study, trial number)``, the trials
    never told (running, waiting, or failed without a measurement error: abandoned or stale; their links
    are not shown, see ``_candidate_rows``) and user attributes per study."""

    fractions: dict[tuple[str, int], float] = field(default_factory=dict)
    unfinished: set[tuple[str, int]] = field(default_factory=set)
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)


def _study_info(store: Store, studies: Iterable[str]) -> _StudyInfo:
    """The named studies' trials and attributes, from Optuna (empty when the store has no Optuna tables)."""
    info = _StudyInfo()
    with store.session() as session:
        if not inspect(session.connection()).has_table("studies"):
            return info  # no Optuna tables: never create them from an analysis
    storage = optuna_storage(store.url)
    try:
        for name in studies:
            try:
                study_id = storage.get_study_id_from_name(name)
            except KeyError:
                continue
            info.attributes[name] = dict(storage.get_study_user_attrs(study_id))
            for trial in storage.get_all_trials(study_id, deepcopy=False):
                if trial.user_attrs.get("param_fraction") is not None:
                    info.fractions[(name, trial.number)] = float(trial.user_attrs["param_fraction"])
                told = trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                    trial.state == TrialState.FAIL and trial.user_attrs.get("measurement_failed")
                )
                if not told:
                    info.unfinished.add((name, trial.number))
    finally:
        storage.remove_session()
        storage.engine.dispose()
    return info


def fidelity_definitions(attrs: Mapping[str, Any]) -> dict[str, dict[str, list[str]]]:
    """``{fidelity: {metric: [protocols]}}`` of one study's attributes, ``full`` first (see the module
    docstring); a study without ``fidelity_protocols`` takes its first reproduce run's stored protocols
    as ``full``. Empty when the study names no protocols."""

    def as_lists(protocols: Mapping[str, Any]) -> dict[str, list[str]]:
        out = {m: [p] if isinstance(p, str) else list(p) for m, p in protocols.items()}
        # FVD, KVD and text alignment are one measurement under one protocol: one named names all three,
        # so that no row pairs one fidelity's FVD with another's KVD.
        shared = next((out[m] for m in QUALITY_METRICS if m in out), None)
        return out if shared is None else {**{m: shared for m in QUALITY_METRICS}, **out}

    named = {name: as_lists(p) for name, p in (attrs.get("fidelity_protocols") or {}).items()}
    reruns = sorted((k for k in attrs if k.startswith(RERUN_PREFIX)), key=lambda k: int(k.split("-")[-1]))
    if FULL not in named and reruns:
        named[FULL] = as_lists(attrs[reruns[0]]["stored"])
    for key in reruns:
        named[f"rerun-{key.removeprefix(RERUN_PREFIX)}"] = as_lists(attrs[key]["new"])
    return dict(sorted(named.items(), key=lambda item: item[0] != FULL))


def row_fidelity(row: Mapping[str, Any], definitions: Mapping[str, Mapping[str, list[str]]]) -> str | None:
    """The first fidelity none of whose protocols the row contradicts (a metric the row lacks agrees)."""
    for name, protocols in definitions.items():
        present = {m: row.get(f"{m}_protocol") for m in protocols}
        if all(p is None or (isinstance(p, float) and np.isnan(p)) or p in protocols[m]
               for m, p in present.items()):  # fmt: skip
            return name
    return None


# Loading.


def load_results(
    url: str, study: str | Sequence[str] | None = None, fidelity: str | None = FULL
) -> pd.DataFrame:
    """The store's measurements, one row per candidate x trial link x setting (see the module docstring).

    Columns: ``study, searcher, trial_number`` (missing without a trial link); ``candidate_key,
    candidate_id, supernet_id, family, kind`` (subnet/chain/schedule), ``resolution`` (px), ``steps``
    (a trajectory candidate's own step count; NaN: the protocol's), ``segments`` (base subnets over the
    trajectory: 1 unless a schedule), ``description``,
    ``params``, ``supernet_params`` (of the supernet(s) cut from; NaN if unknown), ``param_fraction``
    (the trial's user attribute, else params / supernet_params); per metric its value (``flops``: FLOP,
    one multiply-add = one FLOP, per video; ``latency_ms``: ms per video; ``fvd``, ``kvd``,
    ``text_alignment``), ``<metric>_std`` (its standard error; not for counts), ``<metric>_protocol``
    and ``<metric>_measurement_id``; ``fvd_floor, fvd_floor_se, kvd_floor, kvd_floor_se`` (the protocol's
    floor: held-out real videos scored in place of generated ones; NaN when not recorded); ``device``,
    ``extractor``, ``fidelity``, ``status`` (``ok`` when all the row's measurements are; failed values
    are NaN) and ``error``. ``study`` keeps that study's (or studies') rows; ``fidelity`` keeps, for a
    study that names its fidelities, only that fidelity's rows (``None``: every row). Raises
    ``ValueError`` for a bad URL, a missing or empty store and an unknown study; messages never show the
    URL's password.
    """
    with Store.open_existing(url) as store:
        frame = store.measurements_frame()
        if frame.empty:
            raise ValueError(f"store {store.redacted_url} holds no measurements")
        totals = _supernet_totals(store)
        known = sorted({s for names in frame["study_names"] for s in names})
        info = _study_info(store, known)
        wanted = [study] if isinstance(study, str) else list(study or [])
        unknown = [s for s in wanted if s not in known]
        if unknown:
            names = ", ".join(known) or "none"
            raise ValueError(f"unknown study {unknown[0]!r} in {store.redacted_url}; studies: {names}")
    rows = [row for _, group in frame.groupby("candidate_id", sort=True)
            for row in _candidate_rows(group, totals, info)]  # fmt: skip
    definitions = {name: fidelity_definitions(attrs) for name, attrs in info.attributes.items()}
    for row in rows:
        own = definitions.get(row["study"]) or {}
        row["fidelity"] = row_fidelity(row, own) if own else None
        row["_filtered"] = bool(own)
    results = pd.DataFrame.from_records(rows)
    if fidelity is not None:  # studies without named fidelities keep every row
        results = results[~results["_filtered"] | (results["fidelity"] == fidelity)]
    results = _order_columns(results.drop(columns="_filtered"))
    results["trial_number"] = results["trial_number"].astype("Int64")
    if wanted:
        results = results[results["study"].isin(wanted)]
    results = results.sort_values(["study", "trial_number", "candidate_id"], na_position="last")
    return results.reset_index(drop=True)


def load_bootstrap(url: str, df: pd.DataFrame, metrics: Sequence[str] = BOOTSTRAP_METRICS) -> pd.DataFrame:
    """``df`` with ``<metric>_bootstrap`` (the measurement's bootstrap replicates as a float array, or
    ``None``) and ``<metric>_bootstrap_key`` (protocol, method, B, seed and n: rows with equal keys were
    resampled with the same indices and can be compared *paired*) for each of ``metrics``.

    Read from the store only for the measurements of ``df``'s rows (``<metric>_measurement_id``)."""
    ids = {int(i) for m in metrics if f"{m}_measurement_id" in df for i in df[f"{m}_measurement_id"].dropna()}
    extras: dict[int, dict[str, Any]] = {}
    if ids:
        with Store.open_existing(url) as store, store.session() as session:
            for chunk in _chunks(sorted(ids), 500):
                query = sql_select(MeasurementModel.id, MeasurementModel.protocol,
                                   MeasurementModel.extra).where(MeasurementModel.id.in_(chunk))  # fmt: skip
                for mid, protocol, extra in session.execute(query):
                    extras[mid] = {
                        "bootstrap": json.loads(extra or "{}").get("bootstrap"),
                        "protocol": protocol,
                    }
    out = df.copy()
    for metric in metrics:
        column = out.get(f"{metric}_measurement_id", pd.Series(np.nan, index=out.index))
        replicates, keys = [], []
        for mid in column:
            extra = extras.get(int(mid)) if pd.notna(mid) else None
            boot = (extra or {}).get("bootstrap") or {}
            values = boot.get(metric)
            if values is None:
                replicates.append(None)
                keys.append(None)
                continue
            replicates.append(np.asarray(values, dtype=float))
            identity = (extra["protocol"], boot.get("method"), boot.get("B"), boot.get("seed"), boot.get("n"))
            keys.append(json.dumps(identity))
        out[f"{metric}_bootstrap"] = pd.Series(replicates, index=out.index, dtype=object)
        out[f"{metric}_bootstrap_key"] = pd.Series(keys, index=out.index, dtype=object)
    return out


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _supernet_totals(store: Store) -> dict[int, dict[str, int]]:
    """``{supernet_id: {"base": total params, "ssr": ...}}`` from the supernets' metadata (may be empty)."""
    with store.session() as session:
        supernets = session.scalars(sql_select(SupernetModel)).all()
    totals: dict[int, dict[str, int]] = {}
    for supernet in supernets:
        parts = {k: v for k, v in json.loads(supernet.metadata_json or "{}").items() if isinstance(v, dict)}
        totals[supernet.id] = {k: int(v["total_params"]) for k, v in parts.items() if "total_params" in v}
    return totals


def _candidate_rows(group: pd.DataFrame, totals: dict[int, dict[str, int]], info: _StudyInfo) -> list[dict]:
    """Rows of one candidate: settings (device groups x metric variants) x trial links, where a link
    that names its setting (``Store.link_trial``) joins only that setting's rows, and a link to a trial
    never told (running, or failed as stale after a kill between link and tell) joins none: the tell is
    the commit point of a trial's link."""
    first = group.iloc[0]
    config = first["config"] if isinstance(first["config"], dict) else {}
    kind, steps, segments = _candidate_kind(config)
    total = totals.get(int(first["supernet_id"]), {})
    parts = ("base", "ssr") if config.get("ssr") is not None else ("base",)
    supernet_params = float(sum(total[p] for p in parts)) if all(p in total for p in parts) else np.nan
    candidate = {"candidate_key": first["candidate_key"], "candidate_id": int(first["candidate_id"]),
                 "supernet_id": int(first["supernet_id"]), "family": first["family"], "kind": kind,
                 "resolution": int(first["resolution"]), "steps": steps, "segments": segments,
                 "description": first["description"],
                 "params": float(first["params"]), "supernet_params": supernet_params}  # fmt: skip
    links = [(study, searcher, number, linked)
             for study, searcher, number, linked in zip(first["study_names"], first["searchers"],
                                                        first["trial_numbers"], first["link_settings"])
             if (study, number) not in info.unfinished]  # fmt: skip
    rows = []
    for setting in _settings(group.to_dict("records")):
        # A setting none of the candidate's trials was told from (another device's evaluation, say)
        # is a row of no study.
        joined = [link for link in links if _link_joins(link[3], setting)]
        for study, searcher, number, _ in joined or [(None, None, None, None)]:
            fraction = info.fractions.get((study, number), candidate["params"] / supernet_params)
            link = {"study": study, "searcher": searcher, "trial_number": number, "param_fraction": fraction}
            rows.append({**link, **candidate, **setting})
    return rows


def _candidate_kind(config: Mapping[str, Any]) -> tuple[str, float, int]:
    """``(kind, steps, segments)`` of a stored candidate config: ``kind`` is ``"schedule"`` for a
    trajectory of several subnets (issue 20), else ``"chain"`` (base + SSR) or ``"subnet"``; ``steps``
    the candidate's own step count (NaN: the protocol's); ``segments`` the number of base subnets."""
    fmt = config.get("format")
    if fmt == "sned-trajectory/1":
        segments = len(config.get("segments") or ()) or 1
        kind = "schedule" if segments > 1 else ("chain" if config.get("ssr") is not None else "subnet")
        return kind, float(config.get("steps", np.nan)), segments
    return ("chain" if fmt == "sned-chain/1" else "subnet"), np.nan, 1


def _link_joins(linked: Mapping[str, Any] | None, setting: Mapping[str, Any]) -> bool:
    """Whether a trial link's recorded setting admits a row's setting: same device (rows of counted
    metrics only have no device), the same quality device (the link's own device when it names none:
    a modelled device's row joined with a host's quality joins only a link that names that host) and,
    when both name one, the same extractor. Protocols are the fidelities' business (``row_fidelity``),
    so a reproduce run's rows stay beside the study's."""
    if not linked:
        return True
    device_ok = setting["device"] in (None, linked.get("device"))
    quality_device = linked.get("quality_device", linked.get("device"))
    quality_ok = setting["quality_device"] in (None, quality_device)
    extractor_ok = setting["extractor"] is None or linked.get("extractor") in (None, setting["extractor"])
    return device_ok and quality_ok and extractor_ok


def is_modelled_protocol(protocol: str | None) -> bool:
    """Whether a measurement's protocol is a model's (``harness.roofline``: ``...:modelled-roofline-v1:...``)
    rather than a reading on the device its row names."""
    return bool(protocol) and ":modelled-" in protocol


def _settings(measurements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measurement columns of each setting: per device, every combination of the metrics' variants."""
    shared = [m for m in measurements if m["device"] == ANY_DEVICE or m["metric"] in COUNT_METRICS]
    shared_ids = {m["measurement_id"] for m in shared}
    by_device: dict[str | None, list[dict[str, Any]]] = {}
    for m in measurements:
        if m["measurement_id"] not in shared_ids:
            by_device.setdefault(m["device"], []).append(m)
    groups = [(device, device, own) for device, own in (by_device or {None: []}).items()]
    # A modelled device (its rows are a model's, not readings on it) has no quality of its own: its
    # metrics also join each measuring device's other metrics (FVD generated on the host, say) as one
    # setting named after the modelled device, with the measuring one as its quality device.
    modelled = {d for d, own in by_device.items() if all(is_modelled_protocol(m["protocol"]) for m in own)}
    for model_device in sorted(modelled):
        model_metrics = {m["metric"] for m in by_device[model_device]}
        for device in sorted(set(by_device) - modelled):
            rest = [m for m in by_device[device] if m["metric"] not in model_metrics]
            if rest:
                groups.append((model_device, device, by_device[model_device] + rest))
    settings = []
    for device, quality_device, own in groups:
        variants: dict[str, list[dict[str, Any]]] = {}
        for m in shared + own:
            variants.setdefault(m["metric"], []).append(m)
        for combination in itertools.product(*variants.values()):
            extractors = {m["extractor"] for m in combination if m["metric"] in ("fvd", "kvd")}
            if len(extractors - {None}) <= 1:
                settings.append({**_setting_columns(device, combination), "quality_device": quality_device})
    return settings


def _setting_columns(device: str | None, combination: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Value, standard error, protocol and floor columns of one combination (one measurement per metric)."""
    columns: dict[str, Any] = {"device": device, "extractor": None}
    errors = []
    for m in combination:
        metric, value = m["metric"], m["value"] if m["status"] == "ok" else None
        if metric == "text_alignment" and value == NOT_APPLICABLE:
            value = None
        if metric != "params":  # the candidate's own count is authoritative
            columns[metric] = np.nan if value is None else float(value)
        if metric not in COUNT_METRICS:  # a stored 0 is a legacy run without a spread (module docstring)
            std = m["std"]
            columns[f"{metric}_std"] = np.nan if std is None or float(std) <= 0 else float(std)
        columns[f"{metric}_protocol"] = m["protocol"]
        columns[f"{metric}_measurement_id"] = int(m["measurement_id"])
        if metric in FLOOR_METRICS:
            floor = (m["extra"] or {}).get("floor") if isinstance(m["extra"], dict) else None
            floor = floor or {}
            columns[f"{metric}_floor"] = float(floor[metric]) if metric in floor else np.nan
            se = floor.get(f"{metric}_se")
            columns[f"{metric}_floor_se"] = np.nan if se is None else float(se)
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
    floors = [c for m in FLOOR_METRICS for c in (f"{m}_floor", f"{m}_floor_se")]
    protocols = [f"{m}_protocol" for m in METRICS]
    known = [*LINK_COLUMNS, *CANDIDATE_COLUMNS, *values, *floors, "device", "quality_device", "extractor", "fidelity",
             *protocols, "status", "error"]  # fmt: skip
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


def check_comparable(df: pd.DataFrame, objectives: Objectives) -> None:
    """Raise ``ValueError`` when the rows with all ``objectives`` mix devices or (quality) extractors."""
    rows = df.dropna(subset=list(objectives))
    checks = [("device", any(o not in COUNT_METRICS for o in objectives)),
              ("quality_device", any(o in QUALITY_METRICS for o in objectives)),
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


def points(df: pd.DataFrame, objectives: Objectives) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows with every objective measured, and their ``(N, len(objectives))`` objective matrix."""
    missing = [o for o in objectives if o not in df]
    if missing:
        raise ValueError(f"no column {missing[0]!r} in the results")
    rows = df.dropna(subset=list(objectives))
    return rows, rows[list(objectives)].to_numpy(dtype=float).reshape(len(rows), len(objectives))
