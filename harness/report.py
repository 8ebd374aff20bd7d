"""The search's closing report: the Pareto front as a table, and its plot on disk."""

from __future__ import annotations

from pathlib import Path

import moocore
import numpy as np
import optuna
from optuna.trial import TrialState

from harness.checkpoints import RESULTS
from harness.measure import OBJECTIVES
from harness.store import optuna_storage, redact_url


def front_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed, feasible trials on the Pareto front (minimisation), sorted by the first objective."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if all(v <= 0 for k, v in t.system_attrs.items() if k.startswith("constraints:"))
            and all(c <= 0 for c in t.system_attrs.get("constraints", []))]
    if not done:
        return []
    values = np.array([t.values for t in done], dtype=float)
    mask = moocore.is_nondominated(values, maximise=False, keep_weakly=False)
    return sorted((t for t, keep in zip(done, mask) if keep), key=lambda t: t.values[0])


def format_front(trials: list[optuna.trial.FrozenTrial]) -> str:
    header = f"{'trial':>5}  {'params':>9}  {'GFLOPs':>8}  {'latency ms':>10}  {'FVD':>8}  {'KVD':>8}  subnet"
    lines = [header, "-" * len(header)]
    for t in trials:
        m = t.user_attrs.get("metrics", {})
        lines.append(f"{t.number:>5}  {m.get('params', float('nan')) / 1e6:>8.3f}M  "
                     f"{m.get('flops', float('nan')) / 1e9:>8.2f}  {m.get('latency_ms', float('nan')):>10.1f}  "
                     f"{m.get('fvd', float('nan')):>8.1f}  {m.get('kvd', float('nan')):>8.3f}  "
                     f"{t.user_attrs.get('description', '')}")
    return "\n".join(lines)


def report_front(url: str, study_name: str, objectives: list[str], base, ssr, plot: bool = True) -> Path | None:
    study = optuna.load_study(study_name=study_name, storage=optuna_storage(url))
    front = front_trials(study)
    n_done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    print(f"\nPareto front of '{study_name}' ({len(front)} of {n_done} completed trials; "
          f"objectives: {', '.join(objectives)}):")
    print(format_front(front))
    print("FVD/KVD from the offline proxy extractor unless --fvd-weights was given; latency per generated "
          "video on this machine (see the store for the full provenance).")
    if not plot or not front:
        return None
    from harness.analysis import load_results
    from harness.plot import plot_front

    out = RESULTS / "plots" / f"{study_name}-front.png"
    df = load_results(url, study_name)
    plot_front(df, tuple(OBJECTIVES[o] for o in objectives[:2]), out,
               title=f"{study_name} ({redact_url(url)})")
    print(f"front plot written to {out}")
    return out
