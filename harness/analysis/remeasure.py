"""Re-measuring a study's front and its nearest neighbours with fresh noise (``python -m harness.analysis
reproduce``); the statistics are :mod:`harness.analysis.reproduce`'s.

The study's attributes give everything: ``settings`` (its full-fidelity ``MeasureSettings``), the
checkpoints and resolution (``harness.models.load_chain``), ``objectives``; its trials' ``candidate``
attribute gives the candidates. The re-measurement runs under the same settings with ``seed + offset``
(new generated videos, the real set fixed) and ``rerun = offset`` (latency timed again, not read from the
cache), through ``Measurer.measure``, which records every value in the store as it is measured: an
interrupted run keeps what it finished, and the same command continues from there (the plan, recorded
first as the study attribute ``reproduce-<offset>``, fixes the candidates).
"""

from __future__ import annotations

import os
import socket
from dataclasses import fields
from typing import Any

from tqdm import tqdm

from harness.analysis.fronts import pareto_front
from harness.analysis.loading import RERUN_PREFIX, load_bootstrap, load_results, resolve_objectives
from harness.analysis.reproduce import (
    Reproduction,
    default_neighbours,
    matching,
    nearest_neighbours,
    reproduction,
)
from harness.analysis.uncertainty import DEFAULT_Z
from harness.metric_names import COUNT_METRICS, metric_name
from harness.store import Store, optuna_storage


def _study(url: str, name: str) -> tuple[Any, int, dict[str, Any], dict[str, str]]:
    """The Optuna storage, study id, user attributes and ``{candidate_key: candidate JSON}`` of ``name``."""
    storage = optuna_storage(url, create=False)  # a mistyped --storage fails, creating nothing
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        storage.remove_session()
        storage.engine.dispose()
        raise ValueError(f"no study {name!r} in the store; pass --study with one of its studies") from None
    attrs = dict(storage.get_study_user_attrs(study_id))
    candidates = {t.user_attrs["candidate_key"]: t.user_attrs["candidate"]
                  for t in storage.get_all_trials(study_id, deepcopy=False)
                  if "candidate" in t.user_attrs and "candidate_key" in t.user_attrs}  # fmt: skip
    return storage, study_id, attrs, candidates


def _settings(stored: dict[str, Any], **changes: Any):
    """``MeasureSettings`` from a study's ``settings`` attribute (JSON: tuples came back as lists)."""
    from harness.measurement import MeasureSettings

    known = {f.name for f in fields(MeasureSettings)}
    missing = [name for name in changes if name not in known]
    if missing:
        raise ValueError(
            f"this harness's MeasureSettings has no {missing[0]!r}; update the measurement layer"
        )
    unknown = [name for name in stored if name not in known]
    if unknown:
        raise ValueError(f"the study's settings name {unknown[0]!r}, which this harness does not know")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    return MeasureSettings(**{**values, **changes})


def _protocols(measurer, cand, metrics: list[str]) -> dict[str, str]:
    """The protocol string under which ``measurer`` records each of ``metrics`` for ``cand``."""
    every = measurer.protocols(cand)
    return {m: every[m] for m in metrics}


def remeasure(
    url: str,
    study: str,
    offset: int = 1,
    neighbours: int | None = None,
    noise_z: float = DEFAULT_Z,
    progress: bool = True,
) -> Reproduction:
    """Re-measure ``study``'s noise-aware front and its ``neighbours`` nearest candidates (default
    :func:`~harness.analysis.reproduce.default_neighbours`) with fresh noise; returns the statistics.

    ``ValueError`` for a study without ``settings`` (made before studies recorded them), an ``offset``
    below 1, a study measured on another device, or a checkpoint that changed since."""
    import torch

    from harness.candidates import Candidate
    from harness.measurement import MeasurementFailed, Measurer
    from harness.measurement.predictors import load_predictors
    from harness.metrics.fvd import resolve_extractor
    from harness.models import load_chain

    if offset < 1:
        raise ValueError(f"--offset must be at least 1 (0 is the stored measurement), got {offset}")
    if not noise_z >= 0:
        raise ValueError(f"--noise-z must be a number of standard errors >= 0, got {noise_z}")
    storage, study_id, attrs, candidates = _study(url, study)
    failed: list[str] = []
    try:
        if "settings" not in attrs:
            raise ValueError(
                f"study {study!r} records no measurement settings (made before studies did); "
                "re-measure it with python -m harness.evaluate instead"
            )
        stored_settings = _settings(attrs["settings"])
        settings = _settings(attrs["settings"], seed=stored_settings.seed + offset, rerun=offset)
        objectives = list(resolve_objectives(metric_name(o) for o in attrs["objectives"]))
        metrics = sorted(set(objectives) | {"params", "flops", "latency_ms"})
        torch.set_num_threads(settings.threads)
        settings.policy.apply()  # the study's device and numerics, as its search set them
        base, ssr, _ = load_chain(attrs["checkpoint"], attrs.get("ssr_checkpoint"), attrs["resolution"])
        settings.policy.place(base)
        settings.policy.place(ssr)
        text = base.text_encoder.load(settings.device) if base.text_encoder else None
        extractor = resolve_extractor(settings.fvd_weights, settings.device)
        predictors = load_predictors(base, ssr) if settings.latency == "predicted" else None
        store = Store.open(url)
        worker = f"{socket.gethostname()}:{os.getpid()}:reproduce"
        measurer = Measurer(base, ssr, text, settings, store, worker=worker, predictors=predictors,
                            extractor=extractor)  # fmt: skip
        # Only for the protocol strings the study's own values were recorded under.
        original = Measurer(base, ssr, text, stored_settings, store, worker=worker, predictors=predictors,
                            extractor=extractor)  # fmt: skip
        key = f"{RERUN_PREFIX}{offset}"
        plan = attrs.get(key) or _plan(url, study, original, measurer, candidates, objectives, metrics,
                                       neighbours, noise_z)  # fmt: skip
        if key not in attrs:
            storage.set_study_user_attr(study_id, key, plan)
        elif neighbours is not None and neighbours != plan.get("neighbours"):
            raise ValueError(
                f"offset {offset} of study {study!r} was planned with --neighbours {plan.get('neighbours')}; "
                f"rerun with that to continue it, or pass --offset {offset + 1} for a new re-measurement"
            )
        chosen = [Candidate.from_json(candidates[k]) for k in plan["candidates"]]
        for cand in tqdm(chosen, desc=f"reproduce {study} (offset {offset})", disable=not progress):
            try:
                measurer.measure(cand, metrics)
            except MeasurementFailed as e:  # recorded as failed; the statistics leave it out
                failed.append(cand.key)
                tqdm.write(f"candidate {cand.key[:12]}: measurement failed ({e}); continuing")
    finally:
        storage.remove_session()
        storage.engine.dispose()
    result = reproduction(url, study, offset)
    result.meta["failed"] = failed
    return result


def _plan(url, study, original, measurer, candidates, objectives, metrics, neighbours, noise_z) -> dict:
    """The candidates to re-measure (stored noise-aware front first, then nearest neighbours) and the
    protocols that identify the stored and the new rows."""
    from harness.candidates import Candidate

    rows = load_results(url, study, fidelity=None)
    rows = rows[rows["candidate_key"].isin(candidates)]
    cands = {k: Candidate.from_json(candidates[k]) for k in rows["candidate_key"].unique()}
    # Every metric the measurer records, so that no row mixes a stored and a new value of one group.
    recorded = (
        sorted(set(metrics) | set(measurer.quality.metrics))
        if any(m in measurer.quality.metrics for m in metrics)
        else metrics
    )
    stored = {k: _protocols(original, c, recorded) for k, c in cands.items()}
    device = measurer.device_name if any(m not in COUNT_METRICS for m in metrics) else None
    stored_protocols = {m: sorted({p[m] for p in stored.values()}) for m in recorded}
    candidates_rows = matching(rows, stored_protocols, device).dropna(subset=objectives)
    if candidates_rows.empty:
        devices = ", ".join(sorted(rows["device"].dropna().unique())) or "none"
        raise ValueError(
            f"study {study!r} holds no values measured on this machine ({device}) under its settings "
            f"(devices: {devices}); run reproduce on the machine that measured it"
        )
    ids = set(candidates_rows["candidate_id"])
    if measurer.candidate_id(cands[candidates_rows["candidate_key"].iloc[0]]) not in ids:
        raise ValueError("the study's checkpoint changed since it was measured (its hash differs); "
                         "restore the checkpoint the study names")  # fmt: skip
    candidates_rows = load_bootstrap(url, candidates_rows.drop_duplicates("candidate_key"))
    front = list(pareto_front(candidates_rows, objectives, None, noise_z)["candidate_key"])
    k = default_neighbours(len(front)) if neighbours is None else neighbours
    if k < 0:
        raise ValueError(f"--neighbours must be at least 0, got {k}")
    near = nearest_neighbours(candidates_rows, front, objectives, k)
    new = {key: _protocols(measurer, cands[key], recorded) for key in front + near}
    return {
        "objectives": objectives, "device": device, "noise_z": noise_z, "neighbours": k,
        "front": front, "candidates": front + near, "stored": stored_protocols,
        "new": {m: sorted({p[m] for p in new.values()}) for m in recorded},
        "seed": measurer.settings.seed, "rerun": getattr(measurer.settings, "rerun", None),
    }  # fmt: skip
